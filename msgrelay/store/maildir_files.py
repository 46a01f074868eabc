"""The maildir store's blocking half: one state directory, synchronous methods.

Layout under the root (dirs 0700, files 0600)::

    FORMAT                          "msgrelay-maildir 1"
    users/<user_id>/user.json       the UserRecord
    users/<user_id>/tokens/<id>.json  TokenRecords (digest only; mtime = expiry hint)
    users/<user_id>/new/<message_id>  pending messages; the name encodes expiry and size
    users/<user_id>/dedup/<sha256(dedup_key)>  {"message_id", "expires"}; mtime = expires
    users/<user_id>/tmp/            half-written files of this user (never read back)
    replay/<2 hex>/<sha256(digest)>  used signature digests; content and mtime = until
    tmp/                            staging for new user folders, replay entries, probes
    trash/                          erased user folders awaiting removal

Expiry hints kept in mtimes are never later than the truth in the file, so sweepers can
skip a file on stat() alone and read it only once the hint says it may have expired.
The relay wraps this class in `maildir.MaildirStore`; `msgrelay-admin` uses it directly.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

from twisted.logger import Logger

from . import maildir_records as records
from .interface import (
    Delivery, MessageRecord, NewMessage, Quota, QuotaExceeded, StoreUnavailable, TokenRecord,
    UserRecord,
)
from ..durable import fsync_dir, link_durably, remove_durably, unlink_quietly, write_durably
from .maildir_layout import (
    DIR_MODE, SAFE_NAME, ArrivalClock, MessageName, describe_os_error, disk_operation, is_older, list_dir,
    locked_directory, remove_tree,
)

log = Logger(namespace="msgrelay.store.maildir")

FORMAT = "msgrelay-maildir 1\n"
#: Leftover temporary files younger than this may belong to a write in progress.
TMP_GRACE_SECONDS = 3600
#: mtime hint for records that never expire (year 9999); clamped filesystems only lower it.
NEVER = 253402300799
USER_SUBDIRS = ("tokens", "new", "dedup", "tmp")


class UnknownUser(LookupError):
    """The user folder does not exist (never added, or erased meanwhile)."""


class MaildirFiles:
    """A maildir state directory. Thread-safe; several processes may share one directory."""

    def __init__(self, root: Union[str, Path]):
        """Use `MaildirFiles.open`, which creates and checks the layout."""
        self.root = Path(root)
        self.users = self.root / "users"
        self.replay = self.root / "replay"
        self.tmp = self.root / "tmp"
        self.trash = self.root / "trash"
        self._clock = ArrivalClock()

    @classmethod
    def open(cls, root: Union[str, Path]) -> "MaildirFiles":
        """Open (creating if needed) the state directory at start-up, or raise StoreUnavailable."""
        root = Path(root)
        try:
            os.makedirs(root, mode=DIR_MODE, exist_ok=True)
            marker = root / "FORMAT"
            try:
                found = marker.read_text("utf-8")
            except FileNotFoundError:
                found = None
            if found is not None and found != FORMAT:
                raise StoreUnavailable(f"{root} is not a {FORMAT.strip()} directory (FORMAT says {found.strip()!r})")
            files = cls(root)
            for path in (files.users, files.replay, files.tmp, files.trash):
                os.makedirs(path, mode=DIR_MODE, exist_ok=True)
            for shard in range(256):
                os.makedirs(files.replay / f"{shard:02x}", mode=DIR_MODE, exist_ok=True)
            if found is None:
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
        return records.read_user(udir / "user.json")

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

    @disk_operation("read a token")
    def get_token(self, user_id: str, token_id: str) -> Optional[TokenRecord]:
        path = self._token_path(user_id, token_id)
        return None if path is None else records.read_token(path)

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

    def _messages(self, udir: Path) -> list[MessageName]:
        """Every message file of a user, expired or not, by name alone (never opened)."""
        names = (MessageName.parse(name) for name in list_dir(udir / "new"))
        return [name for name in names if name is not None]

    @disk_operation("store a message")
    def deliver(self, user_id: str, dedup_key: str, message: NewMessage, quota: Quota, now: int) -> Delivery:
        """Dedup check, quota check and write under the user's lock; message durable first."""
        udir = self._user_dir(user_id)
        if udir is None:
            raise UnknownUser(user_id)
        if message.received < 0 or message.expires < 0:
            raise ValueError("received and expires must be POSIX seconds")
        dedup_path = udir / "dedup" / records.hash_name(dedup_key)
        with locked_directory(udir) as exists:
            if not exists:
                raise UnknownUser(user_id)
            earlier = records.read_dedup(dedup_path, now)
            if earlier is not None:
                return Delivery(earlier[0], earlier[1], True)
            stored = self._messages(udir)
            live = [m for m in stored if m.is_live(now)]
            if len(live) + 1 > quota.max_messages or sum(m.size for m in live) + message.size > quota.max_bytes:
                raise QuotaExceeded(f"quota of {quota.max_messages} messages or {quota.max_bytes} bytes reached")
            latest = max((m.arrival_ns for m in stored), default=0)
            name = str(self._clock.message_name(message.received, message.expires, message.size, latest))
            body = records.encode(records.message_json(message))
            write_durably(udir / "tmp", udir / "new" / name, body, tmp_name=name)
            try:
                record = records.encode({"message_id": name, "expires": message.expires})
                write_durably(udir / "tmp", dedup_path, record, message.expires)
            except OSError:
                # Answering 503 must mean "not stored": take the message back so a retry
                # does not leave the recipient two copies (the record first, in case its
                # rename got through: it must never name a message that is not there).
                try:
                    unlink_quietly(dedup_path)
                    remove_durably(udir / "new" / name)
                except OSError:
                    log.error("message stored without its dedup record; a resend may store a second copy")
                raise
            return Delivery(name, message.expires, False)

    @disk_operation("read messages")
    def fetch(self, user_id: str, now: int, limit: int, max_bytes: Optional[int] = None) -> tuple[list[MessageRecord], int]:
        udir = self._existing_user_dir(user_id)
        if udir is None:
            return [], 0
        pending = sorted((m for m in self._messages(udir) if m.is_live(now)), key=str)
        found: list[MessageRecord] = []
        consumed = used = 0
        for name in pending:
            if len(found) >= limit or (found and max_bytes is not None and used + name.size > max_bytes):
                break
            used += name.size
            consumed += 1
            record = records.read_message(udir / "new" / str(name), name)
            if record is not None:
                found.append(record)
        return found, len(pending) - consumed

    @disk_operation("count messages")
    def usage(self, user_id: str, now: int) -> tuple[int, int]:
        """Pending unexpired messages and their quota bytes, from the file names alone."""
        udir = self._existing_user_dir(user_id)
        live = [m for m in self._messages(udir) if m.is_live(now)] if udir is not None else []
        return len(live), sum(m.size for m in live)

    @disk_operation("delete messages")
    def acknowledge(self, user_id: str, message_ids: list[str]) -> int:
        """Unlink by exact, validated name: ids cannot reach outside the user's new/ folder."""
        udir = self._existing_user_dir(user_id)
        if udir is None:
            return 0
        deleted = 0
        for message_id in message_ids:
            if MessageName.parse(message_id) is None:
                continue
            try:
                os.unlink(udir / "new" / message_id)
                deleted += 1
            except FileNotFoundError:
                pass
        if deleted:
            fsync_dir(udir / "new")
        return deleted

    # -- upkeep --------------------------------------------------------------------------

    @disk_operation("reclaim expired data")
    def expire(self, now: int) -> int:
        """Reclaim expired messages (by name only), dedup records, tokens, replay entries and
        stale temporary files. Returns the number of messages removed."""
        removed = 0
        for user_id in self.user_ids():
            removed += self._expire_user(self.users / user_id, now)
        for shard in sorted(list_dir(self.replay)):
            with locked_directory(self.replay / shard) as exists:
                if exists:
                    _sweep_records(self.replay / shard, now, records.read_until)
        self._sweep_tmp(self.tmp, now)
        self._sweep_trash()
        return removed

    def _expire_user(self, udir: Path, now: int) -> int:
        with locked_directory(udir) as exists:
            if not exists:
                return 0
            removed = 0
            for name in self._messages(udir):
                if not name.is_live(now):
                    try:
                        os.unlink(udir / "new" / str(name))
                        removed += 1
                    except FileNotFoundError:
                        pass
            if removed:
                fsync_dir(udir / "new")
            _sweep_records(udir / "dedup", now, lambda p: records.read_json_field(p, "expires"))
            _sweep_records(udir / "tokens", now, lambda p: records.read_json_field(p, "expires"))
            self._sweep_tmp(udir / "tmp", now)
            return removed

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

    @disk_operation("record a signature")
    def remember_signature(self, digest: bytes, until: int, now: int) -> bool:
        """First use links a new entry into place (EEXIST is the atomic "already used").

        A stale entry (past its until) is replaced only under the shard's flock, and
        `expire` sweeps shards under the same lock, so a live entry is never removed.
        """
        name = records.hash_name(digest)
        shard = self.replay / name[:2]
        path = shard / name
        content = f"{until}\n".encode("ascii")
        try:
            if link_durably(self.tmp, path, content, until):
                return True
        except FileNotFoundError:  # shard folder removed by hand: recreate it once
            os.makedirs(shard, mode=DIR_MODE, exist_ok=True)
            if link_durably(self.tmp, path, content, until):
                return True
        try:
            if os.stat(path).st_mtime > now:  # the hint is never later than the truth
                return False
        except FileNotFoundError:
            pass
        with locked_directory(shard):
            recorded = records.read_until(path)
            if recorded is not None and recorded > now:
                return False
            unlink_quietly(path)
            return link_durably(self.tmp, path, content, until)

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
        users = messages = size = 0
        oldest: Optional[int] = None
        for user_id in self.user_ids():
            users += 1
            for name in self._messages(self.users / user_id):
                if name.is_live(now):
                    messages += 1
                    size += name.size
                    oldest = name.received if oldest is None else min(oldest, name.received)
        return {"users": users, "messages": messages, "bytes": size, "oldest_received": oldest}


def _sweep_records(folder: Path, now: int, expiry_of: Callable[[Path], Optional[int]]) -> None:
    """Remove records whose expiry has passed: stat() first, read only when the hint allows."""
    removed = False
    for name in list_dir(folder):
        path = folder / name
        try:
            if os.stat(path).st_mtime > now:
                continue
        except FileNotFoundError:
            continue
        expires = expiry_of(path)
        if expires is not None and expires <= now:
            unlink_quietly(path)
            removed = True
    if removed:
        fsync_dir(folder)
