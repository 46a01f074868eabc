"""The maildir store's blocking half: one state directory, synchronous methods.

Layout under the root (dirs 0700, files 0600)::

    FORMAT                          "msgrelay-maildir 2" (1 before message logs; read alike)
    users/<user_id>/user.json       the UserRecord
    users/<user_id>/generation      one byte appended per change of new/ (see maildir_index)
    users/<user_id>/tokens/<id>.json  TokenRecords (digest only; mtime = expiry hint)
    users/<user_id>/log/<n>.log     pending messages appended to the user's log (maildir_log),
                                    with their dedup keys, and acknowledgements
    users/<user_id>/new/<message_id>  pending messages as a file each (store.maildir_messages =
                                    "files", and earlier versions); the name encodes expiry and size
    users/<user_id>/dedup/<sha256(dedup_key)>  {"message_id", "expires"}; mtime = expires (earlier
                                    versions' dedup records, read and swept until they expire)
    users/<user_id>/tmp/            half-written files of this user (never read back)
    replay/<started>-<hex>.journal  used signature digests, appended (see maildir_replay)
    replay/<2 hex>/<sha256(digest)>  the same, as written before the journal; read and swept
    tmp/                            staging for new user folders and probes
    trash/                          erased user folders awaiting removal
    dedup.sqlite                    dedup records: user, sha256(dedup_key), message id, expiry
                                    (see maildir_dedup; with SQLite's -wal and -shm files)

Expiry hints kept in mtimes are never later than the truth in the file. The relay keeps them
in memory too (`maildir_expiry`, built from the files at the first sweep), so a sweep reads
only the records whose hint says they may have expired.
Quota, fetch and expiry use a per-user in-memory index (`maildir_index`), rebuilt from the
folder after a crash or whenever another process changed it.
The relay wraps this class in `maildir.MaildirStore`; `msgrelay-admin` uses it directly.
"""

from __future__ import annotations

import errno
import hmac
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar, Union

from twisted.logger import Logger

from . import maildir_records as records
from .dirsync import DirSync
from .interface import (
    Accepted, Delivery, MessageRecord, NewMessage, Quota, QuotaExceeded, StoreUnavailable, TokenRecord,
    TokenRefused, UserRecord,
)
from ..durable import fsync_dir, remove_durably, unlink_quietly, write_durably, write_new_file
from .maildir_expiry import USER_RECORD_FOLDERS, ExpiryIndex
from .maildir_cache import MessageCache
from .maildir_dedup import DedupTable
from .maildir_index import DEDUP_PREFIX, GENERATION, UserIndex, generation_key, note_change
from .maildir_log import (
    LOG_DIR, Location, acknowledgement_record, message_record, read_records, segment_path, sync_file,
)
from .maildir_logwriter import append_record, compact_oldest, worth_compacting
from .maildir_replay import ReplayJournal
from .maildir_layout import (
    DIR_MODE, SAFE_NAME, ArrivalClock, MessageName, describe_os_error, disk_operation, is_older, list_dir,
    locked_directory, remove_tree,
)

log = Logger(namespace="msgrelay.store.maildir")

FORMAT = "msgrelay-maildir 2\n"
#: What earlier versions wrote: the same layout without message logs, which they would not see.
FORMATS = (FORMAT, "msgrelay-maildir 1\n")
#: Leftover temporary files younger than this may belong to a write in progress.
TMP_GRACE_SECONDS = 3600
#: mtime hint for records that never expire (year 9999); clamped filesystems only lower it.
NEVER = 253402300799
USER_SUBDIRS = ("tokens", "new", "dedup", "tmp", LOG_DIR)


T = TypeVar("T")


class UnknownUser(LookupError):
    """The user folder does not exist (never added, or erased meanwhile)."""


class MaildirFiles:
    """A maildir state directory. Thread-safe; other processes (`msgrelay-admin`) may work on
    it meanwhile. Quota and dedup are exact within one process, whose deliveries to one user
    are reserved under that user's index mutex; several relay processes on one directory
    could each admit the deliveries they have in flight, so they use PostgreSQL instead."""

    def __init__(self, root: Union[str, Path], message_cache_bytes: int = 0, log_messages: bool = False,
                 compact_logs: bool = False):
        """Use `MaildirFiles.open`, which creates and checks the layout. With
        `message_cache_bytes`, that much memory keeps recent message bodies (`maildir_cache`).
        `log_messages` appends new messages to their user's log instead of writing a file each;
        `compact_logs` is for the relay process only, which alone appends to the logs."""
        self.root = Path(root)
        self.log_messages = log_messages
        self.compact_logs = compact_logs
        self.cache = MessageCache(message_cache_bytes) if message_cache_bytes > 0 else None
        self.users = self.root / "users"
        self.replay = self.root / "replay"
        self.tmp = self.root / "tmp"
        self.trash = self.root / "trash"
        self._clock = ArrivalClock()
        self._indexes: dict[str, UserIndex] = {}
        self._indexes_lock = threading.Lock()
        self.expiry = ExpiryIndex(NEVER)
        self.dedup = DedupTable(self.root)
        self._user_records = records.RecordCache(records.read_user)
        self._token_records = records.RecordCache(records.read_token)
        self._replay: Optional[ReplayJournal] = None
        self._replay_lock = threading.Lock()

    @classmethod
    def open(cls, root: Union[str, Path], message_cache_bytes: int = 0, log_messages: bool = False,
             compact_logs: bool = False) -> "MaildirFiles":
        """Open (creating if needed) the state directory at start-up, or raise StoreUnavailable.
        A directory an earlier version wrote is marked as this version's, so that an earlier
        version, which would not see the message logs, refuses it instead."""
        root = Path(root)
        try:
            os.makedirs(root, mode=DIR_MODE, exist_ok=True)
            marker = root / "FORMAT"
            try:
                found = marker.read_text("utf-8")
            except FileNotFoundError:
                found = None
            if found is not None and found not in FORMATS:
                raise StoreUnavailable(f"{root} is not a {FORMAT.strip()} directory (FORMAT says {found.strip()!r})")
            files = cls(root, message_cache_bytes, log_messages, compact_logs)
            for path in (files.users, files.replay, files.tmp, files.trash):
                os.makedirs(path, mode=DIR_MODE, exist_ok=True)
            if found != FORMAT:
                write_durably(files.tmp, marker, FORMAT.encode("utf-8"))
            files._sweep_trash()
            files._probe()
        except OSError as e:
            raise StoreUnavailable(f"{describe_os_error('use its state directory', e)}: {root}") from e
        return files

    # -- paths ---------------------------------------------------------------------------

    def _user_dir(self, user_id: str) -> Optional[Path]:
        """The user's folder, or None if the id could not be a user id (so nothing exists)."""
        if not isinstance(user_id, str) or not SAFE_NAME.fullmatch(user_id):
            return None
        return self.users / user_id

    def _existing_user_dir(self, user_id: str) -> Optional[Path]:
        udir = self._user_dir(user_id)
        return udir if udir is not None and udir.is_dir() else None

    def user_ids(self) -> list[str]:
        """Ids of all users, sorted."""
        return sorted(name for name in list_dir(self.users) if SAFE_NAME.fullmatch(name))

    # -- users ---------------------------------------------------------------------------

    @disk_operation("add a user")
    def add_user(self, user: UserRecord) -> bool:
        """Build the whole user folder under tmp/, then rename it into place: all or nothing."""
        final = self._user_dir(user.user_id)
        if final is None:
            raise ValueError("user_id is not a safe file name")
        if os.path.lexists(final):
            return False
        stage = self.tmp / f"user-{os.urandom(8).hex()}"
        os.mkdir(stage, DIR_MODE)
        try:
            for sub in USER_SUBDIRS:
                os.mkdir(stage / sub, DIR_MODE)
            os.close(os.open(stage / GENERATION, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            write_durably(stage / "tmp", stage / "user.json", records.encode(records.user_json(user)))
            try:
                os.rename(stage, final)
            except OSError as e:
                if isinstance(e, FileExistsError) or e.errno == errno.ENOTEMPTY:  # added concurrently
                    return False
                raise
            fsync_dir(self.users)
            return True
        finally:
            if stage.exists():
                remove_tree(stage)

    @disk_operation("read a user")
    def get_user(self, user_id: str) -> Optional[UserRecord]:
        udir = self._user_dir(user_id)
        if udir is None:
            return None
        return self._user_records.read(udir / "user.json")

    @disk_operation("change a push endpoint")
    def set_push_endpoint(self, user_id: str, endpoint: Optional[str]) -> bool:
        udir = self._user_dir(user_id)
        if udir is None:
            return False
        with locked_directory(udir) as exists:
            user = self.get_user(user_id) if exists else None
            if user is None:
                return False
            changed = UserRecord(user.user_id, user.key_pem, endpoint, user.created)
            write_durably(udir / "tmp", udir / "user.json", records.encode(records.user_json(changed)))
            return True

    @disk_operation("erase a user")
    def delete_user(self, user_id: str) -> bool:
        """Rename the folder into trash/ (atomic erasure), then remove it."""
        udir = self._user_dir(user_id)
        if udir is None:
            return False
        with locked_directory(udir) as exists:
            if not exists:
                return False
            doomed = self.trash / f"{user_id}-{os.urandom(8).hex()}"
            os.rename(udir, doomed)
            fsync_dir(self.users)
            fsync_dir(self.trash)
        self._forget(user_id)
        if self.cache is not None:
            self.cache.forget_user(user_id)
        try:
            self.dedup.forget_user(user_id)
        except StoreUnavailable as e:  # harmless when left: each key holds a token digest, and the tokens are gone
            log.warn("erased user's dedup records left until they expire: {reason}", reason=str(e))
        try:
            remove_tree(doomed)
        except OSError as e:
            log.warn("erased user folder left in trash: {reason}", reason=describe_os_error("empty trash", e))
        return True

    # -- tokens --------------------------------------------------------------------------

    def _token_path(self, user_id: str, token_id: str) -> Optional[Path]:
        udir = self._user_dir(user_id)
        if udir is None or not isinstance(token_id, str) or not SAFE_NAME.fullmatch(token_id):
            return None
        return udir / "tokens" / f"{token_id}.json"

    @disk_operation("store a token")
    def add_token(self, user_id: str, token: TokenRecord) -> None:
        udir = self._user_dir(user_id)
        if udir is None:
            raise UnknownUser(user_id)
        if not SAFE_NAME.fullmatch(token.id):
            raise ValueError("token id is not a safe file name")
        with locked_directory(udir) as exists:
            if not exists:
                raise UnknownUser(user_id)
            hint = NEVER if token.expires is None else token.expires
            body = records.encode(records.token_json(token))
            write_durably(udir / "tmp", udir / "tokens" / f"{token.id}.json", body, hint)
            self.expiry.add(udir / "tokens", f"{token.id}.json", hint)

    @disk_operation("read a token")
    def get_token(self, user_id: str, token_id: str) -> Optional[TokenRecord]:
        path = self._token_path(user_id, token_id)
        return None if path is None else self._token_records.read(path)

    @disk_operation("list tokens")
    def list_tokens(self, user_id: str) -> list[TokenRecord]:
        udir = self._existing_user_dir(user_id)
        if udir is None:
            return []
        tokens = []
        for name in list_dir(udir / "tokens"):
            if name.endswith(".json"):
                token = records.read_token(udir / "tokens" / name)
                if token is not None:
                    tokens.append(token)
        return sorted(tokens, key=lambda t: (t.created, t.id))

    @disk_operation("revoke a token")
    def revoke_token(self, user_id: str, token_id: str) -> bool:
        path = self._token_path(user_id, token_id)
        if path is None:
            return False
        try:
            return remove_durably(path)
        except NotADirectoryError:
            return False

    # -- messages ------------------------------------------------------------------------

    def _index(self, user_id: str, udir: Path) -> UserIndex:
        with self._indexes_lock:
            index = self._indexes.get(user_id)
            if index is None:
                index = self._indexes[user_id] = UserIndex()
                index.new_sync = DirSync(udir / "new")
            return index

    def _forget(self, user_id: str, index: Optional[UserIndex] = None) -> None:
        with self._indexes_lock:
            if index is None or self._indexes.get(user_id) is index:
                self._indexes.pop(user_id, None)

    def _current(self, user_id: str, udir: Path, index: UserIndex) -> bool:
        """Under index.mutex: bring the index up to date with the folder, if anything else
        changed it. False (and the index is forgotten) when the user folder is gone."""
        key = generation_key(udir)
        if key is None:
            if not udir.is_dir():
                self._forget(user_id, index)
                return False
            index.rebuild(udir, None)  # a folder from before indexes: rebuilt on every use
        elif key != index.key:
            if index.key is not None and self.cache is not None:
                self.cache.forget_user(user_id)  # another process changed the mailbox: trust only the files
            index.rebuild(udir, key)
        return True

    def _changed(self, udir: Path, index: UserIndex) -> None:
        """Under index.mutex, after changing new/: tell other processes; keep our index valid
        if ours was the only change since it was last checked."""
        before = index.key
        after = note_change(udir)
        if before is not None and after == (before[0], before[1] + 1):
            index.key = after

    def _messages(self, user_id: str, udir: Path) -> Optional[UserIndex]:
        """The user's index, current (the caller holds its mutex afterwards), or None."""
        index = self._index(user_id, udir)
        index.mutex.acquire()
        try:
            if self._current(user_id, udir, index):
                return index
        except BaseException:
            index.mutex.release()
            raise
        index.mutex.release()
        return None

    @disk_operation("store a message")
    def deliver(self, user_id: str, dedup_key: str, message: NewMessage, quota: Quota, now: int) -> Delivery:
        """Reserve under the index mutex (dedup, quota, id), write and fsync without it, with
        the folder fsyncs shared by concurrent deliveries (group commit); message durable first."""
        udir = self._user_dir(user_id)
        if udir is None:
            raise UnknownUser(user_id)
        if message.received < 0 or message.expires < 0:
            raise ValueError("received and expires must be POSIX seconds")
        dedup_name = records.hash_name(dedup_key)
        dedup_path = udir / "dedup" / dedup_name
        digest = bytes.fromhex(dedup_name)
        size = message.size
        body = records.encode(records.message_json(message)) if self.log_messages else b""
        location = None
        index = self._messages(user_id, udir)
        if index is None:
            raise UnknownUser(user_id)
        try:
            while dedup_name in index.dedup_waits:  # the same packet, being stored right now
                index.changed.wait()
                if not self._current(user_id, udir, index):
                    raise UnknownUser(user_id)
            earlier = index.logged_earlier(digest, now)
            if earlier is None and self._keys_elsewhere(user_id, udir, index):
                earlier = self.dedup.find(user_id, dedup_name, now) or records.read_dedup(dedup_path, now)
            if earlier is not None:
                return Delivery(earlier[0], earlier[1], True)
            count, used = index.live(now)
            if count + 1 > quota.max_messages or used + size > quota.max_bytes:
                raise QuotaExceeded(f"quota of {quota.max_messages} messages or {quota.max_bytes} bytes reached")
            name = self._clock.message_name(message.received, message.expires, size, index.latest)
            if self.log_messages:
                try:
                    location = append_record(udir, index, message_record(str(name), dedup_name, body))
                except FileNotFoundError as e:
                    raise UnknownUser(user_id) from e  # erased meanwhile
            text = index.reserve(name, location)
            index.dedup_waits[dedup_name] = text
        finally:
            index.mutex.release()
        try:
            if location is not None:
                index.log_sync.sync(segment_path(udir, location[0]))
            else:
                self._write_message(udir, index, str(name), message, dedup_name)
        except BaseException:
            with index.mutex:
                index.remove(str(name))
                del index.dedup_waits[dedup_name]
                index.changed.notify_all()
                if location is not None:
                    self._disown(udir, index, str(name))
                elif os.path.lexists(udir / "new" / str(name)):  # kept (see _write_message): list it again
                    index.key = None
                    try:
                        note_change(udir)
                    except FileNotFoundError:
                        pass
            raise
        if self.cache is not None:  # before the commit makes it visible: a fetch then finds it here
            self.cache.put(user_id, MessageRecord(str(name), message.token_id, message.data, message.algorithm,
                                                  message.password, message.signature, message.received,
                                                  message.expires))
        with index.mutex:
            index.commit(str(name))
            if location is not None:
                index.logged[digest[:DEDUP_PREFIX]] = text
            del index.dedup_waits[dedup_name]
            index.changed.notify_all()
            try:
                if location is None:  # a logged one is no news to anyone (maildir_index)
                    self._changed(udir, index)
            except FileNotFoundError:
                pass  # erased meanwhile: the message went with the folder
        return Delivery(str(name), message.expires, False)

    def _keys_elsewhere(self, user_id: str, udir: Path, index: UserIndex) -> bool:
        """Under index.mutex: whether this user's dedup keys may be outside the log. Asked
        once per index: a mailbox that only ever had logged messages then costs no lookup in
        the dedup table per delivery (only this process adds to it, and says so here)."""
        if not self.log_messages:
            return True  # each delivery adds a row
        if index.earlier_keys is None:
            index.earlier_keys = self.dedup.holds(user_id) or bool(list_dir(udir / "dedup"))
        return index.earlier_keys

    def _disown(self, udir: Path, index: UserIndex, name: str) -> None:
        """Under index.mutex, after a logged message's fdatasync failed: answering 503 must
        mean "not stored", so acknowledge it in the log, lest a later read find it durable
        after all and a resend store it twice. The head is sealed: after a failed sync,
        nothing more is written to it."""
        index.head_open = False
        try:
            location = append_record(udir, index, acknowledgement_record([name]))  # in a fresh segment
            sync_file(segment_path(udir, location[0]))
        except OSError:
            index.head_open = False
            log.error("message kept without certainty about its log record; a resend may store a second copy")

    def _write_message(self, udir: Path, index: UserIndex, name: str, message: NewMessage, dedup_name: str) -> None:
        """The message durable (data fsync here, folder fsync shared), then its dedup record."""
        final = udir / "new" / name
        tmp = udir / "tmp" / name
        try:
            try:
                write_new_file(tmp, records.encode(records.message_json(message)))
                os.rename(tmp, final)
                index.new_sync.sync()  # type: ignore[attr-defined]
            except FileNotFoundError as e:
                raise UnknownUser(udir.name) from e  # erased while we wrote
        except BaseException:
            unlink_quietly(tmp)
            unlink_quietly(final)
            raise
        try:
            self.dedup.add(udir.name, dedup_name, name, message.expires)
        except BaseException:
            # Answering 503 must mean "not stored": take the message back so a retry does
            # not leave the recipient two copies, but only once its record is surely gone
            # (a failed commit may still have landed): a record must never name a message
            # that is not there, while a kept message at worst arrives twice.
            try:
                self.dedup.remove(udir.name, dedup_name)
                remove_durably(final)
            except (OSError, StoreUnavailable):
                log.error("message kept without certainty about its dedup record; a resend may store a second copy")
            raise

    @disk_operation("check a token and store a message")
    def deliver_checked(self, user_id: str, token_digest: str, dedup_key: str, message: NewMessage,
                        quota: Quota, now: int) -> Accepted:
        user = self.get_user(user_id)
        if user is None:
            raise UnknownUser(user_id)
        token = self.get_token(user_id, token_digest[:16])
        if token is None or not hmac.compare_digest(token.digest, token_digest) or not token.is_valid(now):
            raise TokenRefused(token_digest[:16])
        return Accepted(user, self.deliver(user_id, dedup_key, message, quota, now))

    @disk_operation("read messages")
    def fetch(self, user_id: str, now: int, limit: int, max_bytes: Optional[int] = None) -> tuple[list[MessageRecord], int]:
        udir = self._user_dir(user_id)
        index = None if udir is None else self._messages(user_id, udir)
        if index is None:
            return [], 0
        try:
            names, remaining = index.page(now, limit, max_bytes)
            located = {name: location for name in names if (location := index.where(name)) is not None}
        finally:
            index.mutex.release()
        got: dict[str, MessageRecord] = {}
        assert udir is not None
        cache = self.cache
        logged: list[tuple[str, Location]] = []
        for name in names:
            record = cache.get(user_id, name) if cache is not None else None
            if record is None and name in located:
                logged.append((name, located[name]))
                continue
            if record is None:
                record = records.read_message(udir / "new" / name, name)
                if record is not None and cache is not None:
                    cache.put(user_id, record)
            if record is not None:
                got[name] = record
        if logged:
            moved = self._read_logged(user_id, udir, logged, got)
            if moved:  # compacted meanwhile: read them where they are now
                with index.mutex:
                    again = [(name, location) for name in moved if (location := index.where(name)) is not None]
                self._read_logged(user_id, udir, again, got)
        return [got[name] for name in names if name in got], remaining

    def _read_logged(self, user_id: str, udir: Path, wanted: list[tuple[str, Location]],
                     got: dict[str, MessageRecord]) -> list[str]:
        """Read messages from the log into `got`; returns the names not found where said."""
        missing = []
        for name, body in read_records(udir, wanted):
            record = None if body is None else records.message_from_json(body, name)
            if record is None:
                missing.append(name)
                continue
            got[name] = record
            if self.cache is not None:
                self.cache.put(user_id, record)
        return missing

    @disk_operation("count messages")
    def usage(self, user_id: str, now: int) -> tuple[int, int]:
        """Pending unexpired messages and their quota bytes, from the index."""
        udir = self._user_dir(user_id)
        index = None if udir is None else self._messages(user_id, udir)
        if index is None:
            return 0, 0
        try:
            return index.live(now)
        finally:
            index.mutex.release()

    @disk_operation("delete messages")
    def acknowledge(self, user_id: str, message_ids: list[str]) -> int:
        """Unlink by exact, validated name: ids cannot reach outside the user's new/ folder."""
        udir = self._user_dir(user_id)
        index = None if udir is None else self._messages(user_id, udir)
        if index is None:
            return 0
        assert udir is not None
        index.mutex.release()
        unlinked, logged = self._unlink_messages(udir, index, [m for m in message_ids if MessageName.parse(m) is not None],
                                                 acknowledged=True)
        if unlinked:
            index.new_sync.sync()  # type: ignore[attr-defined]
        return unlinked + logged

    def _unlink_messages(self, udir: Path, index: UserIndex, names: list[str], acknowledged: bool) -> tuple[int, int]:
        """Remove these messages (never one still being delivered) and their index entries;
        returns how many files there were and how many logged messages. A logged message
        needs nothing once it has expired; an acknowledged one, a durable acknowledgement
        record. Unlinks run outside the index mutex: they wait on the journal, and
        deliveries to the same user must not wait for them."""
        synced = None
        with index.mutex:
            names = [name for name in names if name not in index.in_flight]
            logged = []
            for name in names:
                was_logged = name in index.located
                if index.remove(name) and was_logged:  # hidden from fetch from now on
                    logged.append(name)
            if logged and acknowledged:
                try:
                    synced = segment_path(udir, append_record(udir, index, acknowledgement_record(logged))[0])
                except BaseException:
                    index.key = None  # not acknowledged after all: read back from the log
                    raise
        if self.cache is not None:
            self.cache.discard(udir.name, names)
        if synced is not None:
            try:
                index.log_sync.sync(synced)
            except BaseException:
                with index.mutex:
                    index.key = None
                    index.head_open = False
                raise
        in_log = set(logged)
        removed = 0
        try:
            for name in names:
                if name in in_log:
                    continue
                try:
                    os.unlink(udir / "new" / name)
                    removed += 1
                except FileNotFoundError:
                    pass
        except BaseException:
            with index.mutex:
                index.key = None  # some were not removed after all: rebuild from the folder
            raise
        finally:
            with index.mutex:
                for name in names:  # in case a rebuild meanwhile listed them again
                    index.remove(name)
                if removed or synced is not None:  # an expired logged message changed nothing on disk
                    try:
                        self._changed(udir, index)
                    except FileNotFoundError:
                        pass  # erased meanwhile
        return removed, len(logged)

    # -- upkeep --------------------------------------------------------------------------

    @disk_operation("reclaim expired data")
    def expire(self, now: int) -> int:
        """Reclaim expired messages (by name only), dedup records, tokens, replay entries and
        stale temporary files. Returns the number of messages removed."""
        if not self.expiry.built:
            self.expiry.build(self._record_folders())
        removed = 0
        for user_id in self.user_ids():
            removed += self._expire_user(self.users / user_id, now)
        self.expiry.sweep(now)
        self.dedup.sweep(now)
        if self._replay is not None:
            self._replay.sweep(now)
        self._sweep_tmp(self.tmp, now)
        self._sweep_trash()
        return removed

    def _expire_user(self, udir: Path, now: int) -> int:
        with locked_directory(udir) as exists:
            if not exists:
                return 0
            unlinked = logged = 0
            index = self._messages(udir.name, udir)
            if index is not None:
                expired = index.expired(now)
                index.mutex.release()
                unlinked, logged = self._unlink_messages(udir, index, expired, acknowledged=False)
                if self.compact_logs:
                    self._compact(udir, index, now)
            if unlinked:
                fsync_dir(udir / "new")
            self._sweep_tmp(udir / "tmp", now)
            return unlinked + logged

    def _compact(self, udir: Path, index: UserIndex, now: int) -> None:
        """Remove log segments whose records are all acknowledged or expired, and copy the
        oldest one's pending records forward while the log is over twice their size."""
        with index.mutex:
            if not self._current(udir.name, udir, index):
                return
            changed = False
            try:
                while worth_compacting(index) and compact_oldest(udir, index, udir.name, now, self.dedup):
                    changed = True
            except BaseException:
                index.key = None  # read the log back at the next use
                raise
            finally:
                if changed:
                    try:
                        self._changed(udir, index)
                    except FileNotFoundError:
                        pass

    def _record_folders(self) -> Iterator[Path]:
        """Every folder of records with an expiry: each user's dedup and tokens, each replay shard."""
        for user_id in self.user_ids():
            for sub in USER_RECORD_FOLDERS:
                yield self.users / user_id / sub
        for shard in sorted(list_dir(self.replay)):
            if len(shard) == 2:  # the first layout's shards; journal segments are swept by the journal
                yield self.replay / shard

    def _sweep_tmp(self, folder: Path, now: int) -> None:
        for path in self.orphans_in(folder, now):
            remove_tree(path)

    def _sweep_trash(self) -> None:
        for name in list_dir(self.trash):
            remove_tree(self.trash / name)

    def orphans_in(self, folder: Path, now: Optional[float] = None) -> list[Path]:
        """Entries of a tmp folder older than the grace period (all of them if now is None)."""
        paths = [folder / name for name in sorted(list_dir(folder))]
        if now is None:
            return paths
        return [path for path in paths if is_older(path, now - TMP_GRACE_SECONDS)]

    def orphans(self, now: Optional[float] = None) -> list[Path]:
        """Leftovers of interrupted writes and erasures, for `msgrelay-admin fsck`."""
        found = self.orphans_in(self.tmp, now) + self.orphans_in(self.trash)
        for user_id in self.user_ids():
            found += self.orphans_in(self.users / user_id / "tmp", now)
        return found

    def remember_and_fetch(self, digest: bytes, until: int, now: int, user_id: str, limit: int,
                           max_bytes: Optional[int] = None) -> Optional[tuple[list[MessageRecord], int]]:
        return self._remembered(digest, until, now, user_id, lambda: self.fetch(user_id, now, limit, max_bytes))

    def remember_and_acknowledge(self, digest: bytes, until: int, now: int, user_id: str,
                                 message_ids: list[str]) -> Optional[int]:
        return self._remembered(digest, until, now, user_id, lambda: self.acknowledge(user_id, message_ids))

    def _remembered(self, digest: bytes, until: int, now: int, user_id: str, work: Callable[[], T]) -> Optional[T]:
        """A signed request's store work in one call (one thread hand-off): `work()` on the
        signature's first use, None for a replay; UnknownUser (before the replay entry is
        written) if the user does not exist."""
        if self._existing_user_dir(user_id) is None:
            raise UnknownUser(user_id)
        if not self.remember_signature(digest, until, now):
            return None
        return work()

    def replay_journal(self) -> ReplayJournal:
        """The replay cache, read from its files at the first use in this process (the relay
        opens it at start-up; `msgrelay-admin` never does, so it never removes a segment)."""
        with self._replay_lock:
            if self._replay is None:
                self._replay = ReplayJournal(self.replay)
            return self._replay

    @disk_operation("record a signature")
    def remember_signature(self, digest: bytes, until: int, now: int) -> bool:
        """True for a first use (durable before this returns), False while an earlier one is live."""
        return self.replay_journal().remember(digest, until, now)

    @disk_operation("write a probe file")
    def check_writable(self) -> None:
        """A real durable write, rename and removal in the state directory."""
        self._probe()

    def _probe(self) -> None:
        probe = self.tmp / f"probe-{os.urandom(8).hex()}"
        write_durably(self.tmp, probe, b"msgrelay probe\n")
        remove_durably(probe)

    @disk_operation("count stored data")
    def stats(self, now: int) -> dict[str, Any]:
        """From the indexes: no body is read, and each folder is listed only to (re)build one."""
        users = messages = size = 0
        oldest: Optional[int] = None
        for user_id in self.user_ids():
            users += 1
            index = self._messages(user_id, self.users / user_id)
            if index is None:
                continue
            try:
                count, used = index.live(now)
                first = index.oldest_live(now)
            finally:
                index.mutex.release()
            messages += count
            size += used
            if first is not None:
                oldest = first if oldest is None else min(oldest, first)
        return {"users": users, "messages": messages, "bytes": size, "oldest_received": oldest}
