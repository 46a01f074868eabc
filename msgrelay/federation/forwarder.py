"""Accepting packets for other relays: policy, queue limit, durable write, deduplication.

`RelayCore` calls `forward()`; the relay answers `200` only once the packet is in the outbox.
"""

from __future__ import annotations

import hashlib
from typing import Optional

from twisted.logger import Logger

from ..wire.errors import ProtocolError
from ..wire.packet import Packet
from .outbox import OutboxUnavailable
from .outbox_interface import OutboxFull
from .queues import Queues

log = Logger(namespace="msgrelay.federation")


def dedup_key(destination: str, packet: Packet) -> str:
    """Same recipient, token and packet id: the same packet (docs/protocol.md section 6)."""
    text = "\n".join((destination, packet.address.user_id, packet.token, packet.id))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Forwarder:
    """The `Forwarder` of relay.py: queue durably, answer the first id for a duplicate."""

    def __init__(self, queues: Queues, max_queue: int):
        self.queues = queues
        self.max_queue = max_queue

    async def forward(self, packet: Packet, received: int, expires: int,
                      forwarded_by: Optional[str]) -> tuple[str, int]:
        """Queue durably; (message id, expires). 122 refused, 160 queue full, 180 disk."""
        destination = packet.address.server_name
        assert destination is not None
        self.queues.policy.check(destination)
        if not self.queues.running:
            raise ProtocolError(180, "the relay is shutting down; send again in a moment")
        queue = self.queues.get(destination)
        # A shared outbox counts every process's packets in the database (OutboxFull below);
        # this process's view of the queue may be stale there.
        if not self.queues.outbox.shared and len(queue.entries) + queue.adding >= self.max_queue:
            raise ProtocolError(160, f"the outgoing queue for {destination} is full; try again later")
        queue.adding += 1
        try:
            entry, duplicate = await self.queues.run(self.queues.outbox.add, queue.name, packet.to_json(), received,
                                                     expires, dedup_key(queue.name, packet), self.max_queue)
        except OutboxFull:  # counted in the outbox, which other processes fill too
            queue.adding -= 1
            raise ProtocolError(160, f"the outgoing queue for {destination} is full; try again later")
        except OutboxUnavailable as e:
            queue.adding -= 1
            self.queues.emptied(queue)
            log.error("federation: {problem}", problem=str(e))
            raise ProtocolError(180, "the outgoing queue cannot be written now")
        queue.adding -= 1
        if duplicate:
            self.queues.emptied(queue)
        else:
            log.info("federation: queued {message_id} for {destination} ({queued} queued)",
                     message_id=entry.id, destination=queue.name, queued=len(queue.entries) + 1)
            queue.add(entry)
        return entry.id, entry.expires
