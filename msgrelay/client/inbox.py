"""Local storage of fetched messages: written and fsynced before the relay is told to delete them."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from ..wire.dates import format_date
from ..durable import create_durably
from .profile import json_bytes

_SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_SAFE_STEM = re.compile(r"[^A-Za-z0-9._-]")


def file_stem(message_id: str) -> str:
    """A file name for a relay message id; ids that are not plain become their hash."""
    if _SAFE_ID.fullmatch(message_id):
        return message_id
    return "h" + hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).hexdigest()


class Inbox:
    """inbox/<id>.json per accepted message, rejected/<id>.json per refused one."""

    def __init__(self, inbox: Path, rejected: Path):
        self.inbox = inbox
        self.rejected = rejected

    def has(self, message_id: str) -> bool:
        """Already handled: a second fetch of an unacknowledged message is not shown twice."""
        name = file_stem(message_id) + ".json"
        return (self.inbox / name).exists() or (self.rejected / name).exists()

    def has_content(self, ref: str) -> bool:
        """The same signed message already stored under another relay id (a relay that
        crashed between storing a packet and recording its id may store a retry twice)."""
        return (self.inbox / "refs" / ref).exists()

    def store(self, record: Mapping[str, Any]) -> Path:
        path = self._keep(self.inbox, record)
        refs = self.inbox / "refs"
        refs.mkdir(mode=0o700, exist_ok=True)
        try:
            create_durably(refs / file_stem(str(record["ref"])), str(record["id"]).encode("utf-8"))
        except FileExistsError:
            pass
        return path

    def reject(self, server_message: Mapping[str, Any], record: Mapping[str, Any]) -> Path:
        """Keep what failed the checks (with the reason) for inspection; it is never shown.
        Written as ASCII JSON, which holds anything a relay sent, lone surrogates included."""
        kept = {**record, "server_message": dict(server_message)}
        return self._keep(self.rejected, kept, (json.dumps(kept, indent=2, sort_keys=True) + "\n").encode("ascii"))

    @staticmethod
    def _keep(folder: Path, record: Mapping[str, Any], content: Optional[bytes] = None) -> Path:
        path = folder / (file_stem(str(record["id"])) + ".json")
        try:
            create_durably(path, content if content is not None else json_bytes(dict(record)))
        except FileExistsError:
            pass  # a concurrent fetch stored the same message first
        return path


def write_received_file(folder: Path, stem: str, raw: bytes) -> Path:
    """Write a received file under a new name, never replacing an existing file."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = _SAFE_STEM.sub("_", stem)
    for attempt in range(1000):
        path = folder / (f"{stem}.bin" if attempt == 0 else f"{stem}-{attempt}.bin")
        try:
            create_durably(path, raw)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free file name for {stem} in {folder}")


def compact_date(rfc3339: str) -> str:
    """`2026-11-22T10:15:00Z` -> `20261122T101500Z`, for file names."""
    return rfc3339.replace("-", "").replace(":", "") if rfc3339 else format_date(time.time())
