"""The outbox: packets written to disk before they are sent, removed once the relay says 200.

The packet id is drawn once, when the message is queued, and the whole packet (inner
envelope included) is kept; every retry, in this run or a later one, sends the same id with
the same token, so the relay's idempotent delivery (section 6) stores it once.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..wire.dates import format_date
from ..durable import create_durably, fsync_dir
from .profile import json_bytes, read_json


def new_packet_id() -> str:
    """144 random bits in the packet id alphabet `[A-Za-z0-9._-]`."""
    return secrets.token_urlsafe(18)


def content_digest(contact: str, kind: str, content: bytes) -> str:
    """Identifies "the same send again", so that re-running a failed `send` is a retry."""
    h = hashlib.sha256()
    for part in (contact.encode("utf-8"), kind.encode("ascii"), content):
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()


@dataclass(frozen=True)
class OutboxEntry:
    path: Path
    contact: str
    kind: str  # "text", "file" or "token_request"
    packet: dict[str, Any]
    digest: Optional[str]
    summary: str
    queued: str
    ref: Optional[str]

    @property
    def packet_id(self) -> str:
        return str(self.packet["id"])


class Outbox:
    """A folder of pending packets, sent in the order they were queued."""

    def __init__(self, path: Path, failed_path: Path):
        self.path = path
        self.failed_path = failed_path

    def add(
        self,
        contact: str,
        kind: str,
        packet: dict[str, Any],
        summary: str,
        digest: Optional[str] = None,
        ref: Optional[str] = None,
    ) -> OutboxEntry:
        """Queue `packet` durably (fsynced) before any attempt to send it."""
        path = self.path / f"{time.time_ns():020d}-{packet['id']}.json"
        record = {
            "contact": contact,
            "kind": kind,
            "packet": packet,
            "digest": digest,
            "summary": summary,
            "queued": format_date(time.time()),
            "ref": ref,
        }
        create_durably(path, json_bytes(record))
        return self._entry(path, record)

    @staticmethod
    def _entry(path: Path, record: dict[str, Any]) -> OutboxEntry:
        return OutboxEntry(
            path, record["contact"], record["kind"], record["packet"], record.get("digest"),
            record.get("summary", ""), record.get("queued", ""), record.get("ref"),
        )

    def pending(self) -> list[OutboxEntry]:
        entries = []
        for path in sorted(self.path.glob("*.json")):
            record = read_json(path)
            if record is not None:
                entries.append(self._entry(path, record))
        return entries

    def find(self, digest: str) -> Optional[OutboxEntry]:
        """A pending entry with the same content for the same contact: resend it, do not duplicate."""
        return next((e for e in self.pending() if e.digest == digest), None)

    def get(self, packet_id: str) -> Optional[OutboxEntry]:
        return next((e for e in self.pending() if e.packet_id == packet_id), None)

    def done(self, entry: OutboxEntry) -> None:
        """The relay accepted it: it is durable there, so it can go from here."""
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            pass  # another process sent it first
        fsync_dir(self.path)

    def fail(self, entry: OutboxEntry, reason: str) -> Path:
        """Move a packet the relay refused for good out of the queue, keeping it for the person."""
        target = self.failed_path / entry.path.name
        record = read_json(entry.path) or {}
        record["failed"] = {"reason": reason, "at": format_date(time.time())}
        try:
            create_durably(target, json_bytes(record))
        except FileExistsError:
            pass
        self.done(entry)
        return target
