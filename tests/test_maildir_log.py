"""The maildir's message logs: records and scans (pure), and the store over real files.

Covers: record vectors and what a scan makes of torn and damaged bytes; a delivery as one
append (no new file) that a fresh process reads back; acknowledgements that survive a
restart; dedup keys that outlive acknowledgement, restart and compaction; compaction that
copies pending records forward and removes segments; logs and files of earlier versions
side by side; a torn tail; a failed fdatasync answered as "not stored"; fdatasyncs shared
by concurrent deliveries; and fsck reporting damage without moving anything.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
import zlib

import pytest
import pytest_twisted
from hypothesis import given, settings, strategies as st
from twisted.internet import defer

from apiclient import SyncClient
from msgrelay.store import maildir_log, maildir_logwriter
from msgrelay.store.interface import StoreUnavailable
from msgrelay.store.maildir import MaildirFiles, MaildirStore
from msgrelay.store.maildir_fsck import MaildirFsck
from msgrelay.store.maildir_layout import MessageName
from msgrelay.store.maildir_log import (
    ACKNOWLEDGEMENT, HEADER, MAGIC, MESSAGE, acknowledgement_record, decode_message, message_record, scan,
)
from relayproc import RelayProcess
from store_contract import ALICE, BIG, BOB, HOUR, NOW, message, user
from test_maildir_expiry import plant_old_dedup
from test_maildir_index import real_user

NAME = "00000001800000000000-0badf00d-r1800000000-e1800003600-s14"
DEDUP = hashlib.sha256(b"k").hexdigest()


def logged(root, uid=ALICE) -> list[str]:
    return sorted(os.listdir(root / "users" / uid / "log"))


def open_files(root, **kwargs) -> MaildirFiles:
    kwargs.setdefault("log_messages", True)
    kwargs.setdefault("compact_logs", True)
    files = MaildirFiles.open(root, **kwargs)
    files.add_user(user(ALICE))
    files.add_user(user(BOB))
    return files


def checkable(root) -> tuple[MaildirFiles, str]:
    """A store with one user whose key fsck accepts, and nothing else."""
    files = MaildirFiles.open(root, log_messages=True, compact_logs=True)
    record = real_user()
    files.add_user(record)
    return files, record.user_id


def ids(files: MaildirFiles, uid=ALICE, now=NOW) -> list[str]:
    return [m.message_id for m in files.fetch(uid, now, 1000)[0]]


# -- records and scans (no I/O) -------------------------------------------------------------

def test_record_vectors():
    body = b'{"a":1}'
    record = message_record(NAME, DEDUP, body)
    name = NAME.encode()
    expected_body = bytes((len(name),)) + name + bytes.fromhex(DEDUP) + body
    crc = zlib.crc32(expected_body, zlib.crc32(bytes((MESSAGE,))))
    assert record == MAGIC + bytes((MESSAGE,)) + len(expected_body).to_bytes(4, "big") + crc.to_bytes(4, "big") + expected_body
    assert record[:4] == b"MRL1" and HEADER.size == 13
    parsed = decode_message(record)
    assert parsed is not None and str(parsed[0]) == NAME and parsed[1] == body
    ack = acknowledgement_record([NAME, NAME.replace("0badf00d", "00c0ffee")])
    assert ack[4] == ACKNOWLEDGEMENT and ack.endswith(NAME.encode() + b"\n" + NAME.replace("0badf00d", "00c0ffee").encode())
    assert decode_message(ack) is None  # not a message
    assert decode_message(record[:-1]) is None and decode_message(record + b"x") is None
    flipped = bytearray(record)
    flipped[-1] ^= 1
    assert decode_message(bytes(flipped)) is None  # CRC


def test_scan_reads_records_and_sorts_torn_tails_from_damage():
    first = message_record(NAME, DEDUP, b"{}")
    other = NAME.replace("0badf00d", "00c0ffee")
    second = message_record(other, DEDUP, b"{}")
    ack = acknowledgement_record([NAME])
    whole = first + ack + second
    found = scan(whole, 7)
    assert [str(e.name) for e in found.messages] == [NAME, other]
    assert found.messages[1].location == (7, len(first) + len(ack), len(second))
    assert found.messages[0].dedup == bytes.fromhex(DEDUP)
    assert found.acknowledged == {NAME} and found.damage == []
    # A write a crash cut short: the tail, nothing else lost.
    torn = scan(whole + second[:20], 7)
    assert len(torn.messages) == 2 and [(d.offset, d.length, d.tail) for d in torn.damage] == [(len(whole), 20, True)]
    # Damage in the middle: skipped, and the scan finds the next record by its magic.
    broken = bytearray(whole)
    broken[len(first) + 20] ^= 0xFF  # inside the acknowledgement
    damaged = scan(bytes(broken), 7)
    assert [str(e.name) for e in damaged.messages] == [NAME, other] and damaged.acknowledged == set()
    assert [(d.offset, d.length, d.tail) for d in damaged.damage] == [(len(first), len(ack), False)]
    assert scan(b"", 1).messages == [] and scan(b"garbage", 1).damage[0].tail


names = st.builds(lambda ns, nonce, size: str(MessageName(ns, nonce, NOW, NOW + HOUR, size)),
                  st.integers(0, 10**19), st.text("0123456789abcdef", min_size=8, max_size=8), st.integers(0, 10**6))
records = st.one_of(
    st.tuples(names, st.binary(max_size=300)).map(lambda r: ("m", r[0], message_record(r[0], DEDUP, r[1]))),
    st.lists(names, min_size=1, max_size=3).map(lambda n: ("a", n, acknowledgement_record(n))),
)


@settings(max_examples=200)
@given(st.lists(records, max_size=8), st.data())
def test_a_scan_finds_every_record_that_damage_did_not_touch(written, data):
    """Whatever bytes are flipped or cut, a scan never fails, reports the damage, and finds
    each whole record outside it where it was written."""
    segment = b"".join(r[2] for r in written)
    starts = [sum(len(r[2]) for r in written[:i]) for i in range(len(written))]
    damaged = bytearray(segment)
    flips = data.draw(st.lists(st.integers(0, max(0, len(segment) - 1)), max_size=3)) if segment else []
    for at in flips:
        damaged[at] ^= 0x5A
    cut = data.draw(st.integers(0, len(segment)))
    found = scan(bytes(damaged[:cut]), 3)
    flipped = {at for at in flips if flips.count(at) % 2}  # flipped twice is untouched
    hit = flipped | set(range(cut, len(segment)))
    intact = [(kind, what, start) for (kind, what, raw), start in zip(written, starts)
              if not hit & set(range(start, start + len(raw)))]
    assert {(str(e.name), e.location[1]) for e in found.messages} >= {(w, s) for k, w, s in intact if k == "m"}
    for kind, what, _ in intact:
        if kind == "a":
            assert set(what) <= found.acknowledged
    assert all(e.location[0] == 3 for e in found.messages)
    # Damage is reported exactly when a kept byte changed or a record was cut short.
    assert bool(found.damage) == (any(at < cut for at in flipped) or cut not in starts + [len(segment)])


# -- the store over real files -----------------------------------------------------------

def test_a_delivery_is_an_append_read_back_by_another_process(tmp_path):
    files = open_files(tmp_path / "s")
    sent = [files.deliver(ALICE, f"k{i}", message(data=f"m{i}"), BIG, NOW) for i in range(5)]
    assert os.listdir(files.users / ALICE / "new") == []
    assert logged(files.root) == ["0000000001.log"]
    log_dir = files.users / ALICE / "log"
    assert [stat.S_IMODE(p.stat().st_mode) for p in (log_dir, log_dir / "0000000001.log")] == [0o700, 0o600]
    assert ids(files) == [d.message_id for d in sent]
    fresh = MaildirFiles(tmp_path / "s")  # as msgrelay-admin sees it
    got = fresh.fetch(ALICE, NOW, 10)[0]
    assert [m.message_id for m in got] == [d.message_id for d in sent] and [m.data for m in got] == [f"m{i}" for i in range(5)]
    assert fresh.usage(ALICE, NOW) == (5, 5 * message(data="m0").size)
    assert fresh.stats(NOW)["messages"] == 5


def test_acknowledgements_and_dedup_keys_survive_a_restart(tmp_path):
    files = open_files(tmp_path / "s")
    first = files.deliver(ALICE, "k1", message(data="one"), BIG, NOW)
    second = files.deliver(ALICE, "k2", message(data="two"), BIG, NOW)
    assert files.acknowledge(ALICE, [first.message_id, first.message_id, "nope"]) == 1
    assert files.acknowledge(ALICE, [first.message_id]) == 0
    fresh = open_files(tmp_path / "s")
    assert ids(fresh) == [second.message_id]
    again = fresh.deliver(ALICE, "k1", message(data="one"), BIG, NOW)  # resent after acknowledgement
    assert again.duplicate and again.message_id == first.message_id and ids(fresh) == [second.message_id]
    assert fresh.deliver(ALICE, "k1", message(), BIG, NOW + HOUR).duplicate is False  # its key expired with it


def test_compaction_copies_pending_records_and_keeps_acknowledged_keys(tmp_path, monkeypatch):
    monkeypatch.setattr(maildir_logwriter, "SEGMENT_BYTES", 4096)  # a few records a segment
    files = open_files(tmp_path / "s")
    sent = [files.deliver(ALICE, f"k{i}", message(data="x" * 500), BIG, NOW) for i in range(24)]
    segments = logged(files.root)
    assert len(segments) > 4
    keep = [d.message_id for d in sent[::6]]  # one pending record in each of several segments
    assert files.acknowledge(ALICE, [d.message_id for d in sent if d.message_id not in keep]) == 24 - len(keep)
    files.expire(NOW)
    after = logged(files.root)
    assert len(after) < len(segments) and segments[0] not in after
    assert ids(files) == keep
    for fresh in (files, open_files(tmp_path / "s")):  # its index, and one read back from disk
        assert ids(fresh) == keep
        for i, d in enumerate(sent):  # every key still answers with its first copy's id
            assert fresh.deliver(ALICE, f"k{i}", message(data="x" * 500), BIG, NOW) .message_id == d.message_id
    # Acknowledge the rest: every segment but the head goes.
    assert files.acknowledge(ALICE, keep) == len(keep)
    files.expire(NOW)
    assert len(logged(files.root)) == 1 and ids(open_files(tmp_path / "s")) == []
    # Expired records need no acknowledgement, and their keys end with them.
    files.deliver(ALICE, "late", message(data="y" * 3000, expires=NOW + 10), BIG, NOW)
    files.deliver(ALICE, "later", message(data="y" * 3000, expires=NOW + 10), BIG, NOW)
    assert files.expire(NOW + 10) == 2
    assert len(logged(files.root)) == 1 and ids(open_files(tmp_path / "s"), now=NOW + 10) == []


def test_a_compaction_cut_short_leaves_each_message_once(tmp_path, monkeypatch):
    monkeypatch.setattr(maildir_logwriter, "SEGMENT_BYTES", 4096)
    files = open_files(tmp_path / "s")
    sent = [files.deliver(ALICE, f"k{i}", message(data="x" * 500), BIG, NOW) for i in range(24)]
    keep = [d.message_id for d in sent[::6]]
    files.acknowledge(ALICE, [d.message_id for d in sent if d.message_id not in keep])
    before = logged(files.root)

    def crash(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(maildir_logwriter.os, "unlink", crash)  # copies durable, old segment not yet gone
    with pytest.raises(StoreUnavailable):
        files.expire(NOW)
    monkeypatch.undo()
    assert before[0] in logged(files.root)  # its pending record now in the log twice
    copies = [str(e.name) for name in logged(files.root)
              for e in scan((files.users / ALICE / "log" / name).read_bytes(), 0).messages]
    assert copies.count(keep[0]) == 2
    for fresh in (files, open_files(tmp_path / "s")):
        assert ids(fresh) == keep
        assert fresh.stats(NOW)["messages"] == len(keep)
    files.expire(NOW)
    assert before[0] not in logged(files.root) and ids(open_files(tmp_path / "s")) == keep


def test_files_of_earlier_versions_and_logs_side_by_side(tmp_path):
    old = open_files(tmp_path / "s", log_messages=False)
    as_files = [old.deliver(ALICE, f"f{i}", message(data=f"f{i}"), BIG, NOW).message_id for i in range(3)]
    assert len(os.listdir(old.users / ALICE / "new")) == 3
    files = open_files(tmp_path / "s")
    in_log = [files.deliver(ALICE, f"l{i}", message(data=f"l{i}"), BIG, NOW).message_id for i in range(3)]
    assert ids(files) == as_files + in_log  # one mailbox, arrival order
    assert files.deliver(ALICE, "f1", message(), BIG, NOW).message_id == as_files[1]  # old dedup rows hold
    assert files.acknowledge(ALICE, [as_files[0], in_log[0]]) == 2
    assert len(os.listdir(files.users / ALICE / "new")) == 2
    assert ids(open_files(tmp_path / "s", log_messages=False)) == as_files[1:] + in_log[1:]


def test_keys_of_earlier_versions_hold_and_a_logged_mailbox_asks_the_table_once(tmp_path, monkeypatch):
    files = open_files(tmp_path / "s")
    plant_old_dedup(files, ALICE, hashlib.sha256(b"old").hexdigest(), NOW + HOUR)  # a file, as before the table
    again = files.deliver(ALICE, "old", message(), BIG, NOW)
    assert again.duplicate and again.message_id == "old-" + hashlib.sha256(b"old").hexdigest()
    asked: list[str] = []
    real = files.dedup.find
    monkeypatch.setattr(files.dedup, "find", lambda *a: asked.append(a[1]) or real(*a))
    for i in range(5):
        files.deliver(BOB, f"b{i}", message(), BIG, NOW)
    assert asked == []  # nothing of Bob's outside his log
    assert files.deliver(BOB, "b1", message(), BIG, NOW).duplicate and asked == []


def test_a_torn_tail_loses_nothing_and_is_never_written_after(tmp_path):
    files, uid = checkable(tmp_path / "s")
    sent = [files.deliver(uid, f"k{i}", message(), BIG, NOW).message_id for i in range(3)]
    head = files.users / uid / "log" / "0000000001.log"
    with open(head, "ab") as f:
        f.write(message_record(NAME, DEDUP, b"{}")[:30])  # a crash mid-write
    restarted = MaildirFiles.open(tmp_path / "s", log_messages=True, compact_logs=True)
    assert ids(restarted, uid) == sent
    late = restarted.deliver(uid, "late", message(), BIG, NOW).message_id
    assert logged(restarted.root, uid) == ["0000000001.log", "0000000002.log"]
    assert ids(MaildirFiles(tmp_path / "s"), uid) == sent + [late]
    report = MaildirFsck(tmp_path / "s").run()
    assert report.findings == [] and report.checked["log_segments"] == 2 and report.checked["messages"] == 4


def test_a_failed_fdatasync_is_not_stored(tmp_path, monkeypatch):
    files = open_files(tmp_path / "s")
    kept = files.deliver(ALICE, "k0", message(), BIG, NOW).message_id

    def failing(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(maildir_log, "sync_file", failing)
    with pytest.raises(StoreUnavailable, match="Input/output error"):
        files.deliver(ALICE, "k1", message(data="lost"), BIG, NOW)
    assert ids(files) == [kept]
    monkeypatch.undo()
    # Not stored, also for a process reading the log back: the record was acknowledged.
    assert ids(open_files(tmp_path / "s")) == [kept]
    retried = files.deliver(ALICE, "k1", message(data="lost"), BIG, NOW)
    assert not retried.duplicate and ids(open_files(tmp_path / "s")) == [kept, retried.message_id]


@pytest_twisted.ensureDeferred
async def test_concurrent_deliveries_to_one_user_share_fdatasyncs(tmp_path, monkeypatch):
    from twisted.python.threadpool import ThreadPool

    syncs: list[str] = []
    real = maildir_log.sync_file

    def counted(path):
        syncs.append(path.name)
        real(path)

    monkeypatch.setattr(maildir_log, "sync_file", counted)
    pool = ThreadPool(8, 8, "test-maildir-log")
    pool.start()
    try:
        store = MaildirStore(tmp_path / "state", threadpool=pool)
        await store.add_user(user(ALICE))
        results = await defer.gatherResults(
            [store.deliver(ALICE, f"k{i}", message(data=str(i)), BIG, NOW) for i in range(200)])
    finally:
        pool.stop()
    assert len({r.message_id for r in results}) == 200
    assert ids(store.files) == sorted(r.message_id for r in results)
    assert 1 <= len(syncs) < 200 and set(syncs) == {"0000000001.log"}


def test_fsck_reports_damage_in_a_segment_and_moves_nothing(tmp_path):
    files, uid = checkable(tmp_path / "s")
    sent = [files.deliver(uid, f"k{i}", message(), BIG, NOW).message_id for i in range(3)]
    head = files.users / uid / "log" / "0000000001.log"
    data = bytearray(head.read_bytes())
    record = len(data) // 3
    data[record + 40] ^= 0xFF  # inside the second record
    head.write_bytes(bytes(data))
    report = MaildirFsck(tmp_path / "s").run()
    assert [f.problem for f in report.findings] == [f"log segment has {record} unreadable bytes at offset {record}"]
    assert report.findings[0].path == f"users/{uid}/log/0000000001.log"
    assert head.read_bytes() == bytes(data)  # left in place
    assert ids(MaildirFiles(tmp_path / "s"), uid) == [sent[0], sent[2]]


# -- a real relay ------------------------------------------------------------------------------

def test_twistd_relay_compacts_its_logs_and_keeps_its_promises(tmp_path, users):
    """Over HTTP against `twistd msgrelay`: big packets roll the log over; once the first
    segment's messages are acknowledged the expiry sweep removes it; acknowledged packets
    sent again are still duplicates, before and after a restart."""
    config = tmp_path / "msgrelay.toml"
    config.write_text('[store]\nexpire_interval = 1\n[rate_limits]\nexempt = ["127.0.0.1"]\n')
    state = tmp_path / "state"
    relay = RelayProcess(state, extra_args=["--config", str(config)]).start()
    try:
        client = SyncClient.connect(relay.url)
        alice = users[0]
        assert client.call("POST", "/api/v1/user", {"key": alice.pem}).status == 200
        token = client.mint(alice, expires_in=0)
        sent = {}
        for _ in range(8):  # about 700 KB each: two segments
            envelope = client.packet_envelope(alice, token, body=os.urandom(256 * 1024).hex().encode())
            answer = client.call("POST", "/api/v1/message", envelope, timeout=30)
            assert answer.status == 200, answer.body
            sent[answer.body["message_id"]] = envelope
        log_dir = next(state.glob(f"**/users/{alice.user_id}/log"))
        assert len(list(log_dir.glob("*.log"))) == 2
        ids = list(sent)
        ack = client.signed(alice, "DELETE", "/api/v1/message", ids=ids[:-1])
        assert ack.body == {"deleted": 7}
        deadline = time.monotonic() + 30
        while len(list(log_dir.glob("*.log"))) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p.name for p in log_dir.glob("*.log")] == ["0000000002.log"]
        for attempt in range(2):
            answer, messages = client.fetch(alice, limit=10)
            assert [m["id"] for m in messages] == ids[-1:] and answer.body["remaining"] == 0
            for message_id, envelope in sent.items():
                again = client.call("POST", "/api/v1/message", envelope, timeout=30)
                assert again.status == 200 and again.body["message_id"] == message_id
            if attempt == 0:
                relay.kill()
                relay = RelayProcess(state, port=relay.port, extra_args=["--config", str(config)]).start()
    finally:
        relay.stop()
