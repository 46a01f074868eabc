"""JSON records of the maildir store: how users, tokens, messages and dedup entries look on disk.

Readers treat a vanished file as absent (FileNotFoundError means "acknowledged or removed
meanwhile"), and never see partial files, since every writer renames complete files into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Generic, Optional, TypeVar, Union

from twisted.logger import Logger

from ..durable import read_whole
from .interface import MessageRecord, NewMessage, TokenRecord, UserRecord
from .maildir_layout import MessageName

log = Logger(namespace="msgrelay.store.maildir")
R = TypeVar("R")


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


def hash_name(value: Union[str, bytes]) -> str:
    """A fixed-length file name for a key that must not be stored as is (dedup keys, digests)."""
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return hashlib.sha256(raw).hexdigest()


def read_user(path: Path) -> Optional[UserRecord]:
    try:
        obj = json.loads(read_whole(path))
    except (FileNotFoundError, NotADirectoryError):
        return None
    return UserRecord(obj["user_id"], obj["key_pem"], obj["push_endpoint"], obj["created"])


def user_json(user: UserRecord) -> dict[str, Any]:
    return {
        "user_id": user.user_id, "key_pem": user.key_pem, "push_endpoint": user.push_endpoint,
        "created": user.created,
    }


def token_json(token: TokenRecord) -> dict[str, Any]:
    return {
        "id": token.id, "digest": token.digest, "label": token.label, "created": token.created,
        "expires": token.expires,
    }


def message_json(message: NewMessage) -> dict[str, Any]:
    return {
        "token_id": message.token_id, "data": message.data, "algorithm": message.algorithm,
        "password": message.password, "signature": message.signature,
        "received": message.received, "expires": message.expires,
    }


def read_token(path: Path) -> Optional[TokenRecord]:
    try:
        obj = json.loads(read_whole(path))
    except (FileNotFoundError, NotADirectoryError):
        return None
    return TokenRecord(obj["id"], obj["digest"], obj["label"], obj["created"], obj["expires"])


def read_message(path: Path, name: "MessageName | str") -> Optional[MessageRecord]:
    try:
        return message_from_json(read_whole(path), name)
    except FileNotFoundError:
        return None  # acknowledged meanwhile


def message_from_json(data: bytes, name: "MessageName | str") -> Optional[MessageRecord]:
    """A stored message's JSON (a file's or a log record's) as a record, or None, logged."""
    try:
        obj = json.loads(data)
        return MessageRecord(
            str(name), obj["token_id"], obj["data"], obj["algorithm"], obj["password"],
            obj["signature"], obj["received"], obj["expires"],
        )
    except (ValueError, KeyError, TypeError):
        log.error("skipping unreadable message {message_id}", message_id=str(name))
        return None


def read_dedup(path: Path, now: int) -> Optional[tuple[str, int]]:
    """(message_id, expires) of an unexpired dedup record, else None."""
    try:
        obj = json.loads(read_whole(path))
    except FileNotFoundError:
        return None
    if now < obj["expires"]:
        return obj["message_id"], obj["expires"]
    return None


def read_json_field(path: Path, field: str) -> Optional[int]:
    try:
        return json.loads(read_whole(path))[field]
    except FileNotFoundError:
        return None


def read_until(path: Path) -> Optional[int]:
    try:
        return int(read_whole(path))
    except FileNotFoundError:
        return None


class RecordCache(Generic[R]):
    """Parsed user and token records by path, each valid while its file is the same file.

    Both kinds are only ever replaced by a rename or removed, never rewritten in place, so a
    `stat` whose inode, change time and size match the ones seen when the record was read
    says the record is still the file's, whichever process changed what meanwhile: one
    system call instead of four (open, read, read, close), each of which hands the GIL over.
    """

    def __init__(self, read: Callable[[Path], Optional[R]], max_entries: int = 4096):
        self._read = read
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[tuple[int, int, int], R]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def read(self, path: Path) -> Optional[R]:
        key = str(path)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            with self._lock:
                self._entries.pop(key, None)
            return None
        seen = (st.st_ino, st.st_ctime_ns, st.st_size)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] == seen:
                self._entries.move_to_end(key)
                return entry[1]
        # Read after the stat: if the file is replaced in between, the entry holds the newer
        # record under the older identity, which the next stat no longer matches.
        record = self._read(path)
        with self._lock:
            if record is None:
                self._entries.pop(key, None)
            else:
                self._entries[key] = (seen, record)
                self._entries.move_to_end(key)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return record
