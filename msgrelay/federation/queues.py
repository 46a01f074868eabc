"""All destination queues of one relay: what they share, and reclaiming the empty ones.

Queues are made on demand. A queue that empties (delivered, refused, expired) is forgotten
with its outbox folder unless its destination is in the peer table, so open federation to
many made-up relays leaves no per-destination state behind: no queue, folder, backoff file
or metrics series.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .backoff import Backoff
from .deliverer import Deliverer
from .outbox import BackoffState, Entry
from .outbox_interface import Outbox
from .peers import FederationPolicy
from .queue import DestinationQueue, QueueState

log = Logger(namespace="msgrelay.federation")


class Queues:
    """The queues, and what every queue uses: outbox, thread runner, deliverer, backoff, policy."""

    def __init__(self, outbox: Outbox, run: Callable[..., Deferred], deliverer: Deliverer,
                 backoff: Backoff, clock: Any, policy: FederationPolicy):
        self.outbox = outbox
        self.run = run
        self.deliverer = deliverer
        self.backoff = backoff
        self.clock = clock
        self.policy = policy
        self.running = False  # packets are accepted (from start to stop)
        self.sending = False  # queues send (once what a previous process left is loaded)
        self.queues: dict[str, DestinationQueue] = {}
        self.queue_class = DestinationQueue
        if outbox.shared:  # several processes send from it: claim before sending (shared.py)
            from .shared import SharedQueue

            self.queue_class = SharedQueue
        for name in policy.peers:
            self.get(name)

    def __getitem__(self, destination: str) -> DestinationQueue:
        return self.queues[destination.lower()]

    def __contains__(self, destination: str) -> bool:
        return destination.lower() in self.queues

    def __len__(self) -> int:
        return len(self.queues)

    def values(self) -> Iterable[DestinationQueue]:
        return list(self.queues.values())

    def get(self, destination: str) -> DestinationQueue:
        """The destination's queue, made if there is none."""
        destination = destination.lower()
        queue = self.queues.get(destination)
        if queue is None:
            queue = self.queues[destination] = self.queue_class(destination, self)
        return queue

    def start(self) -> None:
        self.running = True

    def load(self, found: dict[str, tuple[list[Entry], BackoffState]]) -> None:
        """Queues as a previous process left them (merged with packets accepted meanwhile);
        then every queue that may send, sends."""
        total = 0
        for destination, (entries, saved) in found.items():
            queue = self.get(destination)
            for entry in entries:
                queue.insert(entry)
            total += len(entries)
            queue.restore(saved)
        if total:
            log.info("federation: resuming {count} queued packets for {destinations} destinations",
                     count=total, destinations=sum(1 for entries, _ in found.values() if entries))
        self.sending = self.running
        for queue in self.values():
            if queue.state is QueueState.IDLE:
                queue.kick()

    def stop(self) -> None:
        self.running = self.sending = False
        for queue in self.values():
            queue.cancel_timer()

    def emptied(self, queue: DestinationQueue) -> None:
        """An empty queue of an unlisted destination is forgotten, and its folder removed."""
        if (queue.entries or queue.adding or queue.name in self.policy.peers
                or self.queues.get(queue.name) is not queue or not self.sending):
            return
        del self.queues[queue.name]
        self.run(self.outbox.remove_destination, queue.name).addErrback(
            lambda f: log.failure("federation: cannot remove the empty queue of {destination}", f,
                                  destination=queue.name))

    def retry_now(self, destination: str) -> bool:
        """Forget the backoff of `destination` and attempt at once; False if nothing is queued."""
        queue = self.queues.get(destination.lower())
        if self.outbox.shared and self.sending:  # other processes' packets count too: the claim loads them
            queue = queue or self.get(destination)
        elif queue is None or not queue.entries:
            return False
        log.info("federation: retrying {destination} now, as an operator asked", destination=queue.name)
        queue.retry_now()
        return True

    def set_policy(self, policy: FederationPolicy) -> None:
        """Adopt a reloaded mode and peer table. A peer whose URL or pin changed has its cached
        key dropped and its queue tried at once, as has every queue the old table held back."""
        old, self.policy = self.policy, policy
        changed = {name for name in set(old.peers) | set(policy.peers) if old.peers.get(name) != policy.peers.get(name)}
        for name in changed:
            self.deliverer.keys.invalidate(name)
        for name in policy.peers:
            self.get(name)
        log.info("federation: policy reloaded (mode {mode}, {count} peers, {changed} changed)",
                 mode=policy.mode, count=len(policy.peers), changed=len(changed))
        for queue in self.values():
            held = queue.state is QueueState.HELD_POLICY
            if queue.entries and (queue.name in changed or held):
                queue.retry_now()
            elif not queue.entries:
                self.emptied(queue)

    def status(self) -> list[dict[str, Any]]:
        now = self.clock.seconds()
        return [self.queues[name].status(now) for name in sorted(self.queues)]

    def details(self) -> dict[str, dict[str, Any]]:
        return {name: q.details() for name, q in sorted(self.queues.items())}
