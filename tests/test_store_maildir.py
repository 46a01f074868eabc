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
import stat
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import pytest_twisted

from msgrelay.store.interface import IStore, QuotaExceeded, StoreUnavailable
from msgrelay.store.maildir import MaildirFiles, MaildirStore
from msgrelay.store.maildir_layout import MESSAGE_NAME, ArrivalClock, MessageName
from store_contract import ALICE, BIG, BOB, HOUR, MESSAGE_ID, NOW, StoreContract, message, token, user


class TestMaildirStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path):
        return MaildirStore(tmp_path / "state")


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
    assert (files.root / "FORMAT").read_text() == "msgrelay-maildir 1\n"
    for path in files.root.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path
    udir = files.users / ALICE
    assert sorted(p.name for p in udir.iterdir()) == ["dedup", "generation", "new", "tmp", "tokens", "user.json"]
    assert list((udir / "tmp").iterdir()) == [] and list(files.tmp.iterdir()) == []
    # Only the digest is kept for a token, and the dedup key is stored hashed.
    assert (udir / "tokens" / f"{token('t').id}.json").read_text().count(token("t").digest) == 1
    assert [p.name for p in (udir / "dedup").iterdir()] == [hashlib.sha256(b"k").hexdigest()]


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
    """Copies that reset mtimes must not shorten dedup or replay: the file content decides."""
    first = files.deliver(ALICE, "k", message(expires=NOW + HOUR), BIG, NOW)
    assert files.remember_signature(b"sig", NOW + 300, NOW) is True
    dedup = next((files.users / ALICE / "dedup").iterdir())
    replay = files.replay / hashlib.sha256(b"sig").hexdigest()[:2] / hashlib.sha256(b"sig").hexdigest()
    assert dedup.stat().st_mtime == NOW + HOUR and replay.stat().st_mtime == NOW + 300
    for path in (dedup, replay):
        os.utime(path, (0, 0))
    files.expire(NOW + 10)
    assert files.deliver(ALICE, "k", message(), BIG, NOW + 10).message_id == first.message_id
    assert files.remember_signature(b"sig", NOW + 300, NOW + 10) is False
    assert dedup.exists() and replay.exists()


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
    with pytest.raises(StoreUnavailable, match="not a msgrelay-maildir 1 directory"):
        MaildirFiles.open(foreign)


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


def test_message_rolled_back_when_its_dedup_record_cannot_be_written(tmp_path):
    """Room for the body but not the dedup record: answer 503 and keep no copy."""
    with small_tmpfs(tmp_path / "fs") as fs:
        files = MaildirFiles.open(fs / "state")
        files.add_user(user(ALICE))
        filler = fs / "filler"
        size = fill(filler)
        os.truncate(filler, size - 4096)  # exactly one free page: the body's
        with pytest.raises(StoreUnavailable, match="ENOSPC"):
            files.deliver(ALICE, "k", message(data="small"), BIG, NOW)
        assert files.fetch(ALICE, NOW, 10) == ([], 0)
        assert os.listdir(new_dir(files)) == [] and os.listdir(files.users / ALICE / "dedup") == []
        os.unlink(filler)
        assert files.deliver(ALICE, "k", message(data="small"), BIG, NOW).duplicate is False
        assert contents(files) == ["small"]


def test_read_only_filesystem(tmp_path):
    with small_tmpfs(tmp_path / "fs") as fs:
        files = MaildirFiles.open(fs / "state")
        files.add_user(user(ALICE))
        kept = files.deliver(ALICE, "k", message(data="kept"), BIG, NOW).message_id
        remount(fs, "ro")
        try:
            with pytest.raises(StoreUnavailable, match="EROFS"):
                files.check_writable()
            with pytest.raises(StoreUnavailable, match="EROFS"):
                files.deliver(ALICE, "k2", message(), BIG, NOW)
            with pytest.raises(StoreUnavailable, match="EROFS"):
                files.acknowledge(ALICE, [kept])
            with pytest.raises(StoreUnavailable, match="EROFS"):
                files.remember_signature(b"sig", NOW + 60, NOW)
            with pytest.raises(StoreUnavailable, match="state directory"):
                MaildirFiles.open(fs / "state")
            assert contents(files) == ["kept"]
            assert files.deliver(ALICE, "k", message(), BIG, NOW).duplicate is True  # answered from disk
        finally:
            remount(fs, "rw")
        files.check_writable()
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

    def __init__(self, root):
        super().__init__(root)
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


REPLAY_WORKER = """
import hashlib, sys
from msgrelay.store.maildir_files import MaildirFiles
files = MaildirFiles.open(sys.argv[1])
until, now = int(sys.argv[2]), int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()
won = [i for i in range(80) if files.remember_signature(hashlib.sha256(b"%d" % i).digest(), until, now)]
print(" ".join(map(str, won)), flush=True)
"""


def race_processes(root: Path, until: int, now: int, count: int = 6) -> list[int]:
    """Start `count` processes, release them together, return every digest index each won."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", REPLAY_WORKER, str(root), str(until), str(now)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        for _ in range(count)
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    wins: list[int] = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        wins += [int(i) for i in out.split()]
    return wins


def test_replay_cache_is_atomic_across_processes(files):
    assert sorted(race_processes(files.root, NOW + 300, NOW)) == list(range(80))
    # Every entry is now stale: replacing stale entries is raced too, and one still wins.
    assert sorted(race_processes(files.root, NOW + 900, NOW + 301)) == list(range(80))
    assert not any(files.remember_signature(hashlib.sha256(b"%d" % i).digest(), NOW + 900, NOW + 302) for i in range(80))
