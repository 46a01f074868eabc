"""The maildir store: the shared contract, plus what only a filesystem backend can show.

Everything runs on the real filesystem. Failures are real kernel errors: a tmpfs that is
full or remounted read-only (skipped where mounting is not permitted), an immutable
directory (chattr +i, skipped where unsupported), RLIMIT_FSIZE, a path under a regular file.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import resource
import signal
import sqlite3
import stat
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import pytest_twisted

from msgrelay.store.interface import Delivery, IStore, QuotaExceeded, StoreUnavailable
from msgrelay.store.maildir import MaildirFiles, MaildirStore
from msgrelay.store.maildir_layout import MESSAGE_NAME, ArrivalClock, MessageName
from store_contract import ALICE, BIG, BOB, HOUR, MESSAGE_ID, NOW, StoreContract, message, token, user


class TestMaildirStore(StoreContract):
    @pytest.fixture(params=["log", "files"])
    def store(self, tmp_path, request):
        return MaildirStore(tmp_path / "state", log_messages=request.param == "log")


@pytest.fixture
def files(tmp_path) -> MaildirFiles:
    files = MaildirFiles.open(tmp_path / "state")
    files.add_user(user(ALICE))
    return files


def new_dir(files: MaildirFiles, uid: str = ALICE) -> Path:
    return files.users / uid / "new"


# -- real failing filesystems ----------------------------------------------------------------

@contextmanager
def small_tmpfs(where: Path, size: str = "512k") -> Iterator[Path]:
    """A private tmpfs of `size`, or skip the test where mounting is not permitted."""
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def remount(where: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True, capture_output=True)


def fill(path: Path) -> int:
    """Write zeros to `path` until the filesystem is full; returns the bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    written = 0
    try:
        while True:
            written += os.write(fd, bytes(65536 if written < 1 << 20 else 4096))
    except OSError as e:
        assert e.errno == errno.ENOSPC
    try:
        while True:  # top up the last partial chunk page by page
            written += os.write(fd, bytes(4096))
    except OSError:
        pass
    finally:
        os.close(fd)
    return written


@contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """chattr +i: even root cannot create, rename or remove entries in these directories."""
    done = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i not supported here: {done.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True)


def contents(files: MaildirFiles, uid: str = ALICE) -> list[str]:
    return [m.data for m in files.fetch(uid, NOW, 1000)[0]]


# -- layout, names, durability -------------------------------------------------------------

def test_layout_and_permissions(files):
    files.add_token(ALICE, token("t"))
    files.deliver(ALICE, "k", message(), BIG, NOW)
    files.remember_signature(b"digest", NOW + 60, NOW)
    assert (files.root / "FORMAT").read_text() == "msgrelay-maildir 2\n"
    for path in files.root.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path
    udir = files.users / ALICE
    assert sorted(p.name for p in udir.iterdir()) == ["dedup", "generation", "log", "new", "tmp", "tokens", "user.json"]
    assert list((udir / "tmp").iterdir()) == [] and list(files.tmp.iterdir()) == []
    assert list((udir / "dedup").iterdir()) == []  # earlier versions' records only
    assert {p.name for p in files.root.glob("dedup.sqlite*")} >= {"dedup.sqlite"}  # each 0600, checked above
    # Only the digest is kept for a token, and the dedup key is stored hashed.
    assert (udir / "tokens" / f"{token('t').id}.json").read_text().count(token("t").digest) == 1
    with sqlite3.connect(files.dedup.path) as table:
        assert table.execute("SELECT user_id, key FROM dedup").fetchall() == [(ALICE, hashlib.sha256(b"k").hexdigest())]
    # A committed record survives a crash (WAL, synchronous=FULL), in a bounded page cache.
    connection = files.dedup._connection()
    settings = [connection.execute(f"PRAGMA {name}").fetchone()[0] for name in ("journal_mode", "synchronous", "cache_size")]
    assert settings == ["wal", 2, -512]


def test_message_file_name_is_the_id_and_encodes_expiry_and_size(files):
    m = message(data="d" * 33, password="p" * 7, signature="s", received=NOW - 3, expires=NOW + 77)
    delivery = files.deliver(ALICE, "k", m, BIG, NOW)
    assert MESSAGE_ID.match(delivery.message_id) and MESSAGE_NAME.match(delivery.message_id)
    assert os.listdir(new_dir(files)) == [delivery.message_id]
    name = MessageName.parse(delivery.message_id)
    assert (name.received, name.expires, name.size) == (NOW - 3, NOW + 77, 41)
    assert str(name) == delivery.message_id


def test_reopening_finds_everything(files, tmp_path):
    files.add_token(ALICE, token("t"))
    first = files.deliver(ALICE, "k", message(data="kept"), BIG, NOW)
    assert files.remember_signature(b"sig", NOW + 60, NOW) is True
    again = MaildirFiles.open(tmp_path / "state")
    assert again.get_user(ALICE) == user(ALICE)
    assert again.list_tokens(ALICE) == [token("t")]
    assert contents(again) == ["kept"]
    assert again.deliver(ALICE, "k", message(), BIG, NOW).message_id == first.message_id
    assert again.remember_signature(b"sig", NOW + 60, NOW + 1) is False
    # New ids still sort after the old ones.
    assert again.deliver(ALICE, "k2", message(), BIG, NOW).message_id > first.message_id


def test_arrival_clock_is_strictly_increasing_and_unique_across_threads():
    clock = ArrivalClock()
    far = 10**19
    assert clock.next(after=far) == far + 1 and clock.next() == far + 2  # clock stepped back
    seen: list[list[str]] = [[] for _ in range(8)]

    def work(bucket: list[str]) -> None:
        for _ in range(500):
            bucket.append(str(clock.message_name(NOW, NOW + 1, 10)))

    threads = [threading.Thread(target=work, args=(bucket,)) for bucket in seen]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [name for bucket in seen for name in bucket]
    assert len(set(every)) == 4000
    assert all(bucket == sorted(bucket) for bucket in seen)
    assert all(MESSAGE_ID.match(name) for name in every)


# -- crash windows ---------------------------------------------------------------------------

def test_half_written_message_in_tmp_is_never_visible(files):
    kept = files.deliver(ALICE, "k", message(data="whole"), BIG, NOW)
    # A crash mid-write leaves a partial file, named like a message, in the user's tmp/.
    leftover = files.users / ALICE / "tmp" / str(MessageName(time.time_ns(), "00000000", NOW, NOW + HOUR, 5))
    leftover.write_bytes(b'{"data": "trunc')
    assert contents(files) == ["whole"]
    assert files.fetch(ALICE, NOW, 10)[1] == 0
    assert files.stats(NOW)["messages"] == 1
    assert files.acknowledge(ALICE, [leftover.name]) == 0 and leftover.exists()
    # Young leftovers might be a write in progress; old ones are swept.
    real_now = int(time.time())
    files.expire(real_now)
    assert leftover.exists()
    os.utime(leftover, (real_now - 2 * HOUR, real_now - 2 * HOUR))
    assert leftover in files.orphans(real_now)
    files.expire(real_now)
    assert not leftover.exists()
    assert [m.message_id for m in files.fetch(ALICE, NOW, 10)[0]] == [kept.message_id]


def test_stale_staging_tmp_and_trash_are_swept(files, tmp_path):
    real_now = int(time.time())
    stage = files.tmp / "user-deadbeef"  # an add_user interrupted before its rename
    (stage / "tmp").mkdir(parents=True)
    (stage / "user.json").write_text("{}")
    fresh = files.tmp / "fresh.tmp"
    fresh.write_text("in progress")
    os.utime(stage, (real_now - 2 * HOUR, real_now - 2 * HOUR))
    doomed = files.trash / f"{BOB}-0011223344556677"  # an erasure interrupted before removal
    (doomed / "new").mkdir(parents=True)
    (doomed / "new" / "m").write_text("secret")
    assert set(files.orphans(real_now)) == {stage, doomed}
    assert set(files.orphans()) == {stage, fresh, doomed}
    files.expire(real_now)
    assert not stage.exists() and not doomed.exists() and fresh.exists()
    # Trash is also emptied when the store is opened.
    (files.trash / "x" / "y").mkdir(parents=True)
    MaildirFiles.open(tmp_path / "state")
    assert list(files.trash.iterdir()) == []


def test_delete_user_leaves_no_folder_behind(files):
    files.deliver(ALICE, "k", message(), BIG, NOW)
    assert files.delete_user(ALICE) is True
    assert not (files.users / ALICE).exists()
    assert list(files.trash.iterdir()) == []
    assert files.user_ids() == []


# -- expiry never opens message bodies ---------------------------------------------------------

def test_expire_fetch_and_stats_never_open_expired_bodies(files):
    garbage = files.deliver(ALICE, "k1", message(expires=NOW + 10), BIG, NOW).message_id
    fifo = files.deliver(ALICE, "k2", message(expires=NOW + 10), BIG, NOW).message_id
    files.deliver(ALICE, "k3", message(data="live", expires=NOW + HOUR), BIG, NOW)
    (new_dir(files) / garbage).write_bytes(b"\xff\x00 not json at all")
    # Opening a FIFO for reading blocks until a writer comes: any read of this body hangs.
    os.unlink(new_dir(files) / fifo)
    os.mkfifo(new_dir(files) / fifo, 0o600)
    results: dict[str, object] = {}

    def work() -> None:
        results["fetch"] = [m.data for m in files.fetch(ALICE, NOW + 10, 100)[0]]
        results["stats"] = files.stats(NOW + 10)["messages"]
        results["expired"] = files.expire(NOW + 10)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():
        os.close(os.open(new_dir(files) / fifo, os.O_WRONLY | os.O_NONBLOCK))  # release it
        worker.join(timeout=5)
        pytest.fail("an expired message body was opened")
    assert results == {"fetch": ["live"], "stats": 1, "expired": 2}
    assert len(os.listdir(new_dir(files))) == 1


def test_corrupt_live_body_is_skipped_not_fatal(files):
    bad = files.deliver(ALICE, "k1", message(data="bad"), BIG, NOW).message_id
    files.deliver(ALICE, "k2", message(data="good"), BIG, NOW)
    (new_dir(files) / bad).write_bytes(b"\xff garbage")
    assert contents(files) == ["good"]


def test_expiry_hints_in_mtimes_are_only_hints(files):
    """Copies that reset mtimes must not shorten dedup or replay: the file content decides.
    Both records are of earlier layouts (a dedup file per key, a replay file per digest), as
    an upgrade finds them."""
    dedup = files.users / ALICE / "dedup" / hashlib.sha256(b"k").hexdigest()
    dedup.write_text('{"expires": %d, "message_id": "earlier-id"}' % (NOW + HOUR))
    os.utime(dedup, (NOW + HOUR, NOW + HOUR))
    name = hashlib.sha256(b"sig").hexdigest()
    (files.replay / name[:2]).mkdir()
    replay = files.replay / name[:2] / name
    replay.write_bytes(b"%d\n" % (NOW + 300))
    assert dedup.stat().st_mtime == NOW + HOUR
    for path in (dedup, replay):
        os.utime(path, (0, 0))
    files.expire(NOW + 10)
    assert files.deliver(ALICE, "k", message(), BIG, NOW + 10).message_id == "earlier-id"
    assert files.remember_signature(b"sig", NOW + 300, NOW + 10) is False
    assert dedup.exists() and replay.exists()
    files.expire(NOW + 300)
    assert not replay.exists() and files.remember_signature(b"sig", NOW + 900, NOW + 300) is True


# -- ids and names cannot escape -------------------------------------------------------------

def test_ids_cannot_reach_outside_their_folder(files):
    files.add_user(user(BOB))
    files.deliver(BOB, "k", message(data="bob's"), BIG, NOW)
    sneaky = ["../user.json", f"../../{BOB}/new", "/etc/passwd", ".", "..", "new/../user.json", "\x00"]
    assert files.acknowledge(ALICE, sneaky) == 0
    assert files.get_user(ALICE) == user(ALICE) and contents(files, BOB) == ["bob's"]
    for bad in ("..", "../users", "a/b", "", ".hidden", "x" * 200):
        assert files.get_user(bad) is None
        assert files.set_push_endpoint(bad, None) is False
        assert files.delete_user(bad) is False
        assert files.get_token(ALICE, bad) is None and files.revoke_token(ALICE, bad) is False
        assert files.fetch(bad, NOW, 10) == ([], 0)
        with pytest.raises(ValueError):
            files.add_user(user(bad))
        with pytest.raises(LookupError):
            files.deliver(bad, "k", message(), BIG, NOW)
    assert files.user_ids() == sorted([ALICE, BOB])


# -- unusable disks --------------------------------------------------------------------------

def test_open_refuses_unusable_roots(tmp_path):
    regular = tmp_path / "file"
    regular.write_text("not a directory")
    for root in (regular, regular / "state"):
        with pytest.raises(StoreUnavailable, match="state directory"):
            MaildirFiles.open(root)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "FORMAT").write_text("something else 7\n")
    with pytest.raises(StoreUnavailable, match="not a msgrelay-maildir 2 directory"):
        MaildirFiles.open(foreign)


def test_a_directory_of_an_earlier_version_is_marked_as_this_ones(tmp_path):
    """Earlier versions wrote `msgrelay-maildir 1`: opened, it says 2, which those versions
    refuse, since they would not see the messages in the logs."""
    earlier = MaildirFiles.open(tmp_path / "state")
    earlier.add_user(user(ALICE))
    kept = earlier.deliver(ALICE, "k", message(data="old"), BIG, NOW).message_id
    (earlier.root / "FORMAT").write_text("msgrelay-maildir 1\n")
    files = MaildirFiles.open(tmp_path / "state", log_messages=True)
    assert (files.root / "FORMAT").read_text() == "msgrelay-maildir 2\n"
    assert [m.message_id for m in files.fetch(ALICE, NOW, 10)[0]] == [kept]
    assert files.deliver(ALICE, "k", message(data="old"), BIG, NOW).duplicate


def test_immutable_state_directory(files, tmp_path):
    """As root, permissions do not stop writes; an immutable inode does."""
    files.deliver(ALICE, "k1", message(data="old"), BIG, NOW)
    udir = files.users / ALICE
    with immutable(files.tmp, udir / "tmp", udir / "new", udir / "dedup"):
        with pytest.raises(StoreUnavailable) as caught:
            files.check_writable()
        assert "EPERM" in str(caught.value) and str(tmp_path) not in str(caught.value)
        with pytest.raises(StoreUnavailable, match="store a message"):
            files.deliver(ALICE, "k2", message(), BIG, NOW)
        with pytest.raises(StoreUnavailable):
            MaildirFiles.open(files.root)
        assert contents(files) == ["old"]
    files.check_writable()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with immutable(fresh):
        with pytest.raises(StoreUnavailable, match="state directory"):
            MaildirFiles.open(fresh)


def test_disk_full_loses_nothing_and_recovers(tmp_path):
    with small_tmpfs(tmp_path / "fs") as fs:
        files = MaildirFiles.open(fs / "state")
        files.add_user(user(ALICE, push="https://push.example/a"))
        files.add_token(ALICE, token("t"))
        stored = [files.deliver(ALICE, f"k{i}", message(data=f"m{i}"), BIG, NOW).message_id for i in range(3)]
        fill(fs / "filler")
        with pytest.raises(StoreUnavailable, match="ENOSPC"):
            files.deliver(ALICE, "k-new", message(data="x" * 20000), BIG, NOW)
        with pytest.raises(StoreUnavailable, match="ENOSPC"):
            files.check_writable()
        with pytest.raises(StoreUnavailable, match="ENOSPC"):
            files.set_push_endpoint(ALICE, "https://push.example/" + "b" * 9000)
        # Everything stored before is intact, nothing half-written is visible.
        assert [m.message_id for m in files.fetch(ALICE, NOW, 10)[0]] == stored
        assert contents(files) == ["m0", "m1", "m2"]
        assert files.get_user(ALICE) == user(ALICE, push="https://push.example/a")
        assert files.list_tokens(ALICE) == [token("t")]
        assert list((files.users / ALICE / "tmp").iterdir()) == []
        # Acknowledging still works on a full disk (it frees space).
        assert files.acknowledge(ALICE, stored[:1]) == 1
        os.unlink(fs / "filler")
        files.check_writable()
        # The refused packet left no dedup record: its retry is stored.
        retry = files.deliver(ALICE, "k-new", message(data="x" * 20000), BIG, NOW)
        assert retry.duplicate is False and contents(files) == ["m1", "m2", "x" * 20000]


def refuse_dedup(files: MaildirFiles, *events: str) -> sqlite3.Connection:
    """Make SQLite itself fail statements on the dedup table ("BEFORE INSERT": refused, nothing
    written; "AFTER INSERT": failed after the row was written, as a commit whose sync failed;
    "BEFORE DELETE"), on this thread's connection (the one the synchronous store uses here):
    a real failure of the real table, through temporary triggers."""
    connection = files.dedup._connection()
    for event in events:
        when, what = event.split()
        connection.execute(f"CREATE TEMP TRIGGER refuse_{when}_{what} {event} ON dedup BEGIN "
                           f"SELECT RAISE({'FAIL' if when == 'AFTER' else 'ABORT'}, 'refused by the test'); END")
    return connection


def test_message_rolled_back_when_its_dedup_record_cannot_be_written(files):
    """The body is durable but its dedup record is refused: answer 503 and keep no copy."""
    files.deliver(ALICE, "k0", message(data="first"), BIG, NOW)
    connection = refuse_dedup(files, "BEFORE INSERT")
    with pytest.raises(StoreUnavailable, match="store a dedup record: dedup table: refused by the test"):
        files.deliver(ALICE, "k", message(data="small"), BIG, NOW)
    assert contents(files) == ["first"] and len(os.listdir(new_dir(files))) == 1
    assert list((files.users / ALICE / "tmp").iterdir()) == []
    connection.execute("DROP TRIGGER refuse_BEFORE_INSERT")
    assert files.deliver(ALICE, "k", message(data="small"), BIG, NOW).duplicate is False
    assert contents(files) == ["first", "small"]


def test_message_kept_when_its_dedup_record_may_have_landed(files):
    """An insert that failed after its row landed, and whose removal fails too: the message
    stays, because the record names it and must never name a message that is not there."""
    files.deliver(ALICE, "k0", message(data="first"), BIG, NOW)
    connection = refuse_dedup(files, "AFTER INSERT", "BEFORE DELETE")
    with pytest.raises(StoreUnavailable, match="store a dedup record"):
        files.deliver(ALICE, "k", message(data="small"), BIG, NOW)
    connection.execute("DROP TRIGGER refuse_BEFORE_DELETE")
    assert contents(files) == ["first", "small"]
    kept = files.fetch(ALICE, NOW, 10)[0][1].message_id
    assert files.deliver(ALICE, "k", message(data="small"), BIG, NOW) == Delivery(kept, NOW + HOUR, True)


def test_read_only_filesystem(tmp_path):
    with small_tmpfs(tmp_path / "fs") as fs:
        files = MaildirFiles.open(fs / "state")
        files.add_user(user(ALICE))
        kept = files.deliver(ALICE, "k", message(data="kept"), BIG, NOW).message_id
        files.dedup.close()  # an open SQLite file keeps the filesystem from being remounted read-only
        remount(fs, "ro")
        try:
            with pytest.raises(StoreUnavailable, match="EROFS"):
                files.check_writable()
            # The dedup table cannot be opened on a read-only filesystem: every delivery is
            # refused, a resend of a stored packet too (the client retries after the outage).
            for key in ("k2", "k"):
                with pytest.raises(StoreUnavailable, match=r"read a dedup record: dedup table: .*\(SQLITE_CANTOPEN\)"):
                    files.deliver(ALICE, key, message(), BIG, NOW)
            with pytest.raises(StoreUnavailable, match="EROFS"):
                files.acknowledge(ALICE, [kept])
            with pytest.raises(StoreUnavailable, match="EROFS"):
                files.remember_signature(b"sig", NOW + 60, NOW)
            with pytest.raises(StoreUnavailable, match="state directory"):
                MaildirFiles.open(fs / "state")
            assert contents(files) == ["kept"]
        finally:
            remount(fs, "rw")
        files.check_writable()
        assert files.deliver(ALICE, "k", message(), BIG, NOW).duplicate is True
        assert files.acknowledge(ALICE, [kept]) == 1


def test_file_size_limit_is_an_outage_not_a_half_message(files):
    """RLIMIT_FSIZE gives a real EFBIG mid-write, on any filesystem and without privileges."""
    files.deliver(ALICE, "k1", message(data="small"), BIG, NOW)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, hard))
    try:
        with pytest.raises(StoreUnavailable, match="EFBIG"):
            files.deliver(ALICE, "k2", message(data="x" * 200_000), BIG, NOW)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert contents(files) == ["small"]
    assert list((files.users / ALICE / "tmp").iterdir()) == []
    assert files.deliver(ALICE, "k2", message(data="x" * 200_000), BIG, NOW).duplicate is False


def test_quota_refusal_is_not_an_outage(files):
    files.deliver(ALICE, "k1", message(), BIG, NOW)
    with pytest.raises(QuotaExceeded) as caught:
        files.deliver(ALICE, "k2", message(), type(BIG)(1, 10**6), NOW)
    assert not isinstance(caught.value, StoreUnavailable)


# -- threads and processes -------------------------------------------------------------------

class RecordingFiles(MaildirFiles):
    """Notes which thread runs each IStore method; the work itself is unchanged."""

    calls: list[tuple[str, threading.Thread]] = []

    def __init__(self, root, *args):
        super().__init__(root, *args)
        for name in IStore.names():
            method = getattr(self, name, None)
            if callable(method):
                setattr(self, name, self._recorded(name, method))

    def _recorded(self, name, method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            self.calls.append((name, threading.current_thread()))
            return method(*args, **kwargs)

        return wrapper


class RecordingStore(MaildirStore):
    files_class = RecordingFiles


@pytest_twisted.ensureDeferred
async def test_blocking_work_runs_off_the_reactor_thread(tmp_path):
    store = RecordingStore(tmp_path / "state")
    RecordingFiles.calls.clear()
    t = token("t")
    await store.add_user(user(ALICE))
    await store.get_user(ALICE)
    await store.set_push_endpoint(ALICE, None)
    await store.add_token(ALICE, t)
    await store.get_token(ALICE, t.id)
    await store.list_tokens(ALICE)
    await store.revoke_token(ALICE, t.id)
    delivery = await store.deliver(ALICE, "k", message(), BIG, NOW)
    await store.add_token(ALICE, t)
    await store.deliver_checked(ALICE, t.digest, "k2", message(token_id=t.id), BIG, NOW)
    await store.fetch(ALICE, NOW, 10)
    await store.usage(ALICE, NOW)
    await store.acknowledge(ALICE, [delivery.message_id])
    await store.remember_signature(b"sig", NOW + 60, NOW)
    await store.remember_and_fetch(b"sig2", NOW + 60, NOW, ALICE, 10, None)
    await store.remember_and_acknowledge(b"sig3", NOW + 60, NOW, ALICE, [delivery.message_id])
    await store.check_writable()
    await store.stats(NOW)
    await store.expire(NOW)
    await store.delete_user(ALICE)
    assert threading.current_thread() is threading.main_thread()
    expected = {name for name in IStore.names() if name != "name"}
    assert {name for name, _ in RecordingFiles.calls} == expected
    assert all(thread is not threading.main_thread() for _, thread in RecordingFiles.calls)


@pytest_twisted.ensureDeferred
async def test_outage_reaches_the_caller_as_store_unavailable(tmp_path):
    store = MaildirStore(tmp_path / "state")
    await store.add_user(user(ALICE))
    with immutable(store.files.tmp):
        with pytest.raises(StoreUnavailable):
            await store.check_writable()
    assert await store.check_writable() is None


def digests(count: int, tag: bytes = b"") -> list[bytes]:
    return [hashlib.sha256(tag + b"%d" % i).digest() for i in range(count)]


def test_replay_journal_is_read_back_after_a_restart_and_skips_a_torn_line(files):
    assert all(files.remember_signature(d, NOW + 300, NOW) for d in digests(50))
    (segment,) = files.replay.glob("*.journal")
    files.replay_journal().close()
    # A crash in the middle of a write leaves part of a line: it was never answered.
    with open(segment, "ab") as f:
        f.write(b"0123456789abcdef")
    again = MaildirFiles(files.root)  # a restart: only the files are left
    assert len(again.replay_journal()) == 50
    assert not any(again.remember_signature(d, NOW + 300, NOW + 1) for d in digests(50))
    assert again.remember_signature(b"new", NOW + 300, NOW + 1)
    # Each process appends to a segment of its own, never after a torn tail.
    assert len(list(files.replay.glob("*.journal"))) == 2
    third = MaildirFiles(files.root)
    assert not third.remember_signature(b"new", NOW + 300, NOW + 2)


def test_concurrent_signatures_share_one_fdatasync(files, monkeypatch):
    """Group commit: while one flush runs, the entries that arrive wait for the next one,
    and nobody returns before an fdatasync that wrote its entry."""
    journal = files.replay_journal()
    assert files.remember_signature(b"first", NOW + 300, NOW)  # the segment exists now
    real = os.fdatasync
    synced: list[int] = []

    def held_fdatasync(fd: int) -> None:
        if not synced:  # the first flush waits until the 15 others have queued behind it
            deadline = time.monotonic() + 30
            while len(journal._pending) < 15 and time.monotonic() < deadline:
                time.sleep(0.001)
        real(fd)
        synced.append(fd)

    monkeypatch.setattr(os, "fdatasync", held_fdatasync)
    rounds = journal.rounds
    results: list[bool] = []
    threads = [threading.Thread(target=lambda d=d: results.append(files.remember_signature(d, NOW + 300, NOW)))
               for d in digests(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [True] * 16
    assert journal.rounds - rounds == 2 and len(synced) == 2
    segment = next(files.replay.glob("*.journal")).read_text().splitlines()
    assert len(segment) == 17


def test_a_failed_journal_write_is_refused_and_not_remembered(files, monkeypatch):
    assert files.remember_signature(b"before", NOW + 300, NOW)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", full)
    with pytest.raises(StoreUnavailable, match="record a signature"):
        files.remember_signature(b"sig", NOW + 300, NOW)
    monkeypatch.undo()
    # The client's retry of the same request is not a replay; the next write opens a new segment.
    assert files.remember_signature(b"sig", NOW + 300, NOW + 1)
    assert not files.remember_signature(b"before", NOW + 300, NOW + 1)
    assert len(list(files.replay.glob("*.journal"))) == 2
    assert not MaildirFiles(files.root).remember_signature(b"sig", NOW + 300, NOW + 2)


def test_replay_segments_rotate_and_go_once_all_their_entries_expired(files):
    for minute in range(5):
        assert files.remember_signature(b"m%d" % minute, NOW + minute * 60 + 300, NOW + minute * 60)
    assert len(list(files.replay.glob("*.journal"))) == 5
    files.expire(NOW + 2 * 60 + 300)  # the first three have expired
    assert len(list(files.replay.glob("*.journal"))) == 2 and len(files.replay_journal()) == 2
    assert files.remember_signature(b"m0", NOW + 900, NOW + 2 * 60 + 300)
    assert not files.remember_signature(b"m4", NOW + 900, NOW + 2 * 60 + 300)


# -- message cache ---------------------------------------------------------------------------

def reads_of_messages(monkeypatch) -> list[str]:
    """Paths of message files read from now on."""
    from msgrelay.store import maildir_records

    seen: list[str] = []
    real = maildir_records.read_whole

    def counting(path):
        if path.parent.name == "new":
            seen.append(path.name)
        return real(path)

    monkeypatch.setattr(maildir_records, "read_whole", counting)
    return seen


def test_cached_bodies_spare_reading_and_are_the_files(tmp_path, monkeypatch):
    cached = MaildirFiles.open(tmp_path / "s", message_cache_bytes=1 << 20)
    cached.add_user(user(ALICE))
    ids = [cached.deliver(ALICE, f"k{i}", message(data=f"m{i}"), BIG, NOW).message_id for i in range(5)]
    reads = reads_of_messages(monkeypatch)
    page, remaining = cached.fetch(ALICE, NOW, 10)
    assert reads == [] and [m.message_id for m in page] == ids and remaining == 0
    uncached = MaildirFiles(tmp_path / "s")  # what the files say, field by field
    assert uncached.fetch(ALICE, NOW, 10) == (page, 0) and len(reads) == 5
    # Acknowledged: gone from the answer and from memory.
    assert cached.acknowledge(ALICE, ids[:2]) == 2
    assert [m.message_id for m in cached.fetch(ALICE, NOW, 10)[0]] == ids[2:]
    assert len(cached.cache) == 3
    # Another process (fsck, msgrelay-admin) removes one: the index decides, not the cache.
    assert uncached.acknowledge(ALICE, [ids[2]]) == 1
    assert [m.message_id for m in cached.fetch(ALICE, NOW, 10)[0]] == ids[3:]
    assert cached.delete_user(ALICE) and len(cached.cache) == 0


def test_the_cache_keeps_to_its_budget_and_reads_what_it_dropped(tmp_path, monkeypatch):
    from msgrelay.store.maildir_cache import cost

    files = MaildirFiles.open(tmp_path / "s", message_cache_bytes=3 * (2048 + 600))
    files.add_user(user(ALICE))
    ids = [files.deliver(ALICE, f"k{i}", message(data="x" * 2048), BIG, NOW).message_id for i in range(6)]
    assert len(files.cache) == 3 and files.cache.bytes <= files.cache.max_bytes
    reads = reads_of_messages(monkeypatch)
    page, _ = files.fetch(ALICE, NOW, 3)
    assert [m.message_id for m in page] == ids[:3] and reads == ids[:3]  # the oldest were dropped
    assert files.cache.bytes == sum(cost(m) for m in page)  # what was read took their place
    assert files.fetch(ALICE, NOW, 3)[0] == page and reads == ids[:3]


def test_user_and_token_records_are_read_once_and_follow_other_processes(files, monkeypatch):
    files.add_user(user(ALICE))
    t1 = token("t1", expires=NOW + HOUR).id
    files.add_token(ALICE, token("t1", expires=NOW + HOUR))
    assert files.get_user(ALICE).push_endpoint is None and files.get_token(ALICE, t1) is not None
    from msgrelay.store import maildir_records

    reads: list[str] = []
    real = maildir_records.read_whole
    monkeypatch.setattr(maildir_records, "read_whole", lambda path: reads.append(path.name) or real(path))
    for _ in range(3):
        assert files.get_user(ALICE).user_id == ALICE and files.get_token(ALICE, t1).id == t1
    assert reads == []  # a stat each, no read
    other = MaildirFiles(files.root)  # msgrelay-admin, or any other process
    assert other.set_push_endpoint(ALICE, "https://push.example/new")
    assert files.get_user(ALICE).push_endpoint == "https://push.example/new" and reads.count("user.json") == 2
    assert other.revoke_token(ALICE, t1)
    assert files.get_token(ALICE, t1) is None
    assert other.delete_user(ALICE)
    assert files.get_user(ALICE) is None
