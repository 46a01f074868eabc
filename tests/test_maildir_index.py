"""The maildir's in-memory index: never the truth, always rebuilt from the files.

Covers: a crash (SIGKILL) mid-stream, after which a fresh index and a long-lived one both
match what the files say; fsck findings winning over a stale index; changes by another
instance (another process) seen at once; folders from before indexes; the cost of fetch
and quota not growing with the mailbox (counted in directory listings, not in time); and
group commit of folder fsyncs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer

from msgrelay.store import maildir_index
from msgrelay.store.dirsync import DirSync
from msgrelay.store.interface import NewMessage, Quota, QuotaExceeded, UserRecord
from msgrelay.store.maildir import MaildirFiles, MaildirStore
from msgrelay.store.maildir_fsck import MaildirFsck
from msgrelay.store.maildir_layout import MessageName
from msgrelay.wire.keys import public_key_pem, user_id_for_key
from store_contract import ALICE, BIG, BOB, NOW, message, user


def truth(files: MaildirFiles, uid: str, now: int) -> list[tuple[str, int]]:
    """(id, size) of every live message, from the files alone: listed, opened and parsed."""
    found = []
    for name in sorted(os.listdir(files.users / uid / "new")):
        parsed = MessageName.parse(name)
        if parsed is None or parsed.expires <= now:
            continue
        try:
            obj = json.loads((files.users / uid / "new" / name).read_bytes())
        except (ValueError, FileNotFoundError):
            continue
        size = NewMessage(obj["token_id"], obj["data"], obj["algorithm"], obj["password"], obj["signature"],
                          obj["received"], obj["expires"]).size
        found.append((name, size))
    return found


def seen(files: MaildirFiles, uid: str, now: int) -> list[tuple[str, int]]:
    """(id, size) of every message as the index answers fetch, checked against its stats."""
    messages, remaining = files.fetch(uid, now, 100_000)
    assert remaining == 0
    result = [(m.message_id, MessageName.parse(m.message_id).size) for m in messages]
    return result


CRASH_WORKER = """
import sys
from msgrelay.store.maildir_files import MaildirFiles
from store_contract import BIG, NOW, message
files = MaildirFiles.open(sys.argv[1])
users = sys.argv[2:]
i = 0
while True:
    uid = users[i % len(users)]
    d = files.deliver(uid, f"k{i}", message(data="x" * (i % 97 + 1), expires=NOW + 10 + i % 50), BIG, NOW)
    if i % 5 == 0:
        files.acknowledge(uid, [d.message_id])
    i += 1
    print(i, flush=True)
"""


def test_sigkill_mid_write_then_every_index_matches_the_files(tmp_path):
    root = tmp_path / "state"
    files = MaildirFiles.open(root)
    uids = [ALICE, BOB]
    for uid in uids:
        files.add_user(user(uid))
    files.deliver(ALICE, "before", message(data="before"), BIG, NOW)
    assert seen(files, ALICE, NOW) == truth(files, ALICE, NOW)  # this instance's index is built
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    worker = subprocess.Popen([sys.executable, "-c", CRASH_WORKER, str(root), *uids],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(300):  # killed in the middle of its stream, at no particular point
            assert worker.stdout.readline(), "the writer died early"
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    fresh = MaildirFiles.open(root)
    for now in (NOW, NOW + 30, NOW + 60):
        for uid in uids:
            expected = truth(fresh, uid, now)
            assert seen(fresh, uid, now) == expected
            assert seen(files, uid, now) == expected  # the long-lived index caught up too
        stats = fresh.stats(now)
        everything = [m for uid in uids for m in truth(fresh, uid, now)]
        assert (stats["messages"], stats["bytes"]) == (len(everything), sum(s for _, s in everything))
        assert files.stats(now) == stats
    # Quota decisions follow the files too: exactly full is refused, one less is not.
    live = len(truth(fresh, ALICE, NOW))
    with pytest.raises(QuotaExceeded):
        fresh.deliver(ALICE, "q1", message(), Quota(live, 10**9), NOW)
    assert fresh.deliver(ALICE, "q1", message(), Quota(live + 1, 10**9), NOW).duplicate is False
    assert seen(files, ALICE, NOW) == truth(files, ALICE, NOW)


def real_user() -> UserRecord:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return UserRecord(user_id_for_key(key.public_key()), public_key_pem(key.public_key()), None, NOW)


def test_fsck_finding_wins_over_a_stale_index(tmp_path):
    files = MaildirFiles.open(tmp_path / "state")
    alice = real_user()
    files.add_user(alice)
    uid = alice.user_id
    ids = [files.deliver(uid, f"k{i}", message(data=f"m{i}"), BIG, NOW).message_id for i in range(4)]
    assert files.fetch(uid, NOW, 2)[1] == 2 and files.stats(NOW)["messages"] == 4
    # Damage one body and plant a file the index never heard of, behind the relay's back.
    (files.users / uid / "new" / ids[1]).write_bytes(b"\xff not json")
    planted = files.users / uid / "new" / str(MessageName(10**19, "00000000", NOW, NOW + 99, 5))
    planted.write_text("{}")
    report = MaildirFsck(files.root, now=NOW).run()
    assert {f.path.rsplit("/", 1)[-1] for f in report.findings} == {ids[1], planted.name}
    # The relay's index now agrees with fsck: counts, quota and pages.
    messages, remaining = files.fetch(uid, NOW, 2)
    assert [m.message_id for m in messages] == [ids[0], ids[2]] and remaining == 1
    assert files.stats(NOW)["messages"] == 3
    assert files.deliver(uid, "k9", message(), Quota(4, 10**9), NOW).duplicate is False
    with pytest.raises(QuotaExceeded):
        files.deliver(uid, "k10", message(), Quota(4, 10**9), NOW)


def test_changes_by_another_instance_are_seen_at_once(tmp_path):
    relay = MaildirFiles.open(tmp_path / "state")
    admin = MaildirFiles.open(tmp_path / "state")  # as msgrelay-admin in another process
    relay.add_user(user(ALICE))
    first = relay.deliver(ALICE, "k1", message(expires=NOW + 10), BIG, NOW)
    second = admin.deliver(ALICE, "k2", message(), BIG, NOW)
    assert [m.message_id for m in relay.fetch(ALICE, NOW, 10)[0]] == [first.message_id, second.message_id]
    assert admin.expire(NOW + 10) == 1
    assert relay.stats(NOW)["messages"] == 1 and relay.fetch(ALICE, NOW, 10)[1] == 0
    assert admin.delete_user(ALICE) is True
    assert relay.fetch(ALICE, NOW, 10) == ([], 0)
    with pytest.raises(LookupError):
        relay.deliver(ALICE, "k3", message(), BIG, NOW)
    admin.add_user(user(ALICE))  # the same id again: a new, empty folder
    assert relay.fetch(ALICE, NOW, 10) == ([], 0)
    assert relay.deliver(ALICE, "k1", message(), BIG, NOW).duplicate is False


def test_a_folder_from_before_indexes_is_read_and_upgraded(files_with_old_folder):
    files, uid, ids = files_with_old_folder
    assert [m.message_id for m in files.fetch(uid, NOW, 10)[0]] == ids
    files.deliver(uid, "k-new", message(), BIG, NOW)
    assert (files.users / uid / maildir_index.GENERATION).exists()
    assert len(files.fetch(uid, NOW, 10)[0]) == 3


@pytest.fixture
def files_with_old_folder(tmp_path):
    files = MaildirFiles.open(tmp_path / "state")
    files.add_user(user(ALICE))
    ids = [files.deliver(ALICE, f"k{i}", message(), BIG, NOW).message_id for i in range(2)]
    os.unlink(files.users / ALICE / maildir_index.GENERATION)
    return MaildirFiles.open(tmp_path / "state"), ALICE, ids


def test_fetch_and_quota_do_not_list_the_folder_once_indexed(tmp_path, monkeypatch):
    files = MaildirFiles.open(tmp_path / "state")
    files.add_user(user(ALICE))
    for i in range(300):
        files.deliver(ALICE, f"k{i}", message(expires=NOW + 100 + i), BIG, NOW)
    listed: list[str] = []
    real_listdir = os.listdir

    def counting_listdir(path):
        listed.append(str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", counting_listdir)
    for i in range(20):
        files.deliver(ALICE, f"more{i}", message(), BIG, NOW)
        messages, remaining = files.fetch(ALICE, NOW + 150, 10)
        assert len(messages) == 10 and remaining == 249 + (i + 1) - i - 10  # 51 expired, i acknowledged
        files.acknowledge(ALICE, [messages[0].message_id])
    assert [p for p in listed if p.endswith("/new")] == []
    # A reclaimed message is found from the expiry heap, not by listing new/.
    assert files.expire(NOW + 150) == 51  # expires <= NOW + 150; the acknowledged were live ones
    assert [p for p in listed if p.endswith("/new")] == []


def test_dir_sync_shares_fsyncs_and_never_returns_before_one_started_after_the_call(tmp_path):
    started: list[int] = []
    gate = threading.Event()
    order: list[str] = []

    def slow_fsync(path):
        started.append(len(order))
        order.append("fsync-start")
        gate.wait(10)
        order.append("fsync-end")

    sync = DirSync(tmp_path, slow_fsync)
    first = threading.Thread(target=sync.sync)
    first.start()
    while not started:
        threading.Event().wait(0.001)
    # Six writers arrive while the first fsync runs: one more fsync covers all six.
    others = [threading.Thread(target=lambda: (sync.sync(), order.append("returned"))) for _ in range(6)]
    for t in others:
        t.start()
    gate.set()
    first.join(10)
    for t in others:
        t.join(10)
    assert order.count("fsync-start") == 2
    second_end = [i for i, what in enumerate(order) if what == "fsync-end"][1]
    assert all(i > second_end for i, what in enumerate(order) if what == "returned")


def test_dir_sync_hands_its_error_to_every_writer_of_the_round(tmp_path):
    calls = []

    def failing(path):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")

    sync = DirSync(tmp_path, failing)
    with pytest.raises(OSError):
        sync.sync()
    sync.sync()  # the next round succeeds
    assert len(calls) == 2


@pytest_twisted.ensureDeferred
async def test_concurrent_deliveries_to_one_user_share_folder_fsyncs(tmp_path, monkeypatch):
    from twisted.python.threadpool import ThreadPool

    from msgrelay.store import dirsync

    entered: list[str] = []
    fsyncs: list[str] = []
    real_sync, real_fsync = DirSync.sync, dirsync.fsync_dir

    def counted_sync(self):
        entered.append(self.path.name)
        return real_sync(self)

    def gated_fsync(path):
        fsyncs.append(path.name)
        if fsyncs == ["new"]:  # hold the first one until all 8 threads wait behind it (bounded)
            deadline = time.monotonic() + 10
            while entered.count("new") < 8 and time.monotonic() < deadline:
                time.sleep(0.001)
        real_fsync(path)

    monkeypatch.setattr(DirSync, "sync", counted_sync)
    monkeypatch.setattr(dirsync, "fsync_dir", gated_fsync)
    pool = ThreadPool(8, 8, "test-maildir")
    pool.start()
    try:
        store = MaildirStore(tmp_path / "state", threadpool=pool, log_messages=False)
        await store.add_user(user(ALICE))
        results = await defer.gatherResults(
            [store.deliver(ALICE, f"k{i}", message(data=str(i)), BIG, NOW) for i in range(40)])
    finally:
        pool.stop()
    assert len({r.message_id for r in results}) == 40
    messages, remaining = store.files.fetch(ALICE, NOW, 100)
    assert [m.message_id for m in messages] == sorted(r.message_id for r in results) and remaining == 0
    assert entered.count("new") == 40 and set(entered) == {"new"}  # each waited for a sync
    # The 8 writers of the first round shared two fsyncs (6 saved); later rounds may share
    # more, but only when fsyncs are slow enough to overlap, which tmpfs's are not.
    assert fsyncs.count("new") <= 40 - 6


def test_erasure_during_a_delivery_is_no_such_user_and_stores_nothing(tmp_path, monkeypatch):
    from msgrelay.store import maildir_files

    files = MaildirFiles.open(tmp_path / "state")
    files.add_user(user(ALICE))
    files.deliver(ALICE, "k0", message(), BIG, NOW)
    real_write = maildir_files.write_new_file
    erased = []

    def erase_first(path, data, *args, **kwargs):
        if not erased:  # the user erases the account after the reservation, before the write
            erased.append(files.delete_user(ALICE))
        return real_write(path, data, *args, **kwargs)

    monkeypatch.setattr(maildir_files, "write_new_file", erase_first)
    with pytest.raises(LookupError):
        files.deliver(ALICE, "k1", message(), BIG, NOW)
    assert erased == [True]
    assert files.fetch(ALICE, NOW, 10) == ([], 0) and files.stats(NOW)["messages"] == 0
    assert list(files.trash.iterdir()) == [] and list(files.tmp.iterdir()) == []
    files.add_user(user(ALICE))  # registering again starts empty, and delivers
    assert files.deliver(ALICE, "k1", message(), BIG, NOW).duplicate is False
    assert len(files.fetch(ALICE, NOW, 10)[0]) == 1
