"""The maildir's message cache: the bodies of recently delivered or fetched messages, in memory
within a byte budget (`store.message_cache_mib`), so a fetch reads no file for them.

A message file never changes once its name is in `new/`: it is written whole under `tmp/`
and renamed into place, and only removed after that (acknowledged, expired, erased,
quarantined by fsck). So a cached body is always the file's, and the cache never decides
what a fetch returns: the user's index does (`maildir_index`, which any change to the
folder by any process invalidates), and the cache only spares reading the names it
lists. Most mail is fetched soon after it arrives, and delivery fills the cache, so the
usual fetch reads nothing from the disk; a body the cache has dropped (least recently used
first) is read from its file as before.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable, Optional

from .interface import MessageRecord

#: Bytes a cached record costs beyond its payload: the object, its strings' headers, the entry.
OVERHEAD = 512


def cost(record: MessageRecord) -> int:
    return len(record.data) + len(record.password) + len(record.signature or "") + OVERHEAD


class MessageCache:
    """(user id, message id) -> MessageRecord, least recently used dropped first; thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, str], tuple[MessageRecord, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, user_id: str, message_id: str) -> Optional[MessageRecord]:
        key = (user_id, message_id)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, user_id: str, record: MessageRecord) -> None:
        size = cost(record)
        if size > self.max_bytes:
            return
        key = (user_id, record.message_id)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._entries[key] = (record, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.bytes -= dropped

    def discard(self, user_id: str, message_ids: Iterable[str]) -> None:
        with self._lock:
            for message_id in message_ids:
                entry = self._entries.pop((user_id, message_id), None)
                if entry is not None:
                    self.bytes -= entry[1]

    def forget_user(self, user_id: str) -> None:
        """Drop every body of an erased user (erasure means from memory too)."""
        with self._lock:
            for key in [key for key in self._entries if key[0] == user_id]:
                self.bytes -= self._entries.pop(key)[1]
