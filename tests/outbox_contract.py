"""The behaviour every federation outbox must show (msgrelay/federation/outbox_interface.py),
as one test class to subclass, like store_contract.py for stores::

    class TestMyOutbox(OutboxContract):
        @pytest.fixture
        def outbox(self, ...):
            return ...  # a ready, EMPTY Outbox (fresh for every test)

Times are passed explicitly; nothing sleeps. The calls block, as the protocol says.
"""

from __future__ import annotations

import pytest

from msgrelay.federation.outbox import BackoffState, Entry
from msgrelay.federation.outbox_interface import Outbox

NOW = 1_800_000_000
B, C = "b.test", "c.test:8443"


def packet(n: int) -> dict:
    return {"id": f"p{n}", "user_id": f"{'a' * 32}@{B}", "token": "tok", "data": "AAAA",
            "algorithm": "AES-256-GCM", "password": "BBBB", "text": "é\u2028"}


class OutboxContract:
    """Subclass and provide an `outbox` fixture yielding a ready, empty Outbox."""

    def test_provides_the_protocol(self, outbox):
        assert isinstance(outbox, Outbox) and isinstance(outbox.shared, bool)

    def test_packets_queue_in_arrival_order_per_destination(self, outbox):
        assert outbox.destinations() == [] and outbox.load_all() == {}
        added = [outbox.add(B, packet(n), NOW, NOW + 600)[0] for n in range(3)]
        other, duplicate = outbox.add(C, packet(9), NOW, NOW + 60)
        assert not duplicate and other.destination == C
        assert outbox.entries(B) == added and outbox.entries(C) == [other]
        assert sorted(outbox.destinations()) == sorted([B, C])
        assert outbox.load_all() == {B: added, C: [other]}
        assert [outbox.read(e) for e in added] == [packet(n) for n in range(3)]
        assert len({e.id for e in added + [other]}) == 4
        assert all(Entry.from_id(B, e.id) == e for e in added)
        assert (added[0].received, added[0].expires) == (NOW, NOW + 600)

    def test_removed_packets_are_gone(self, outbox):
        first, _ = outbox.add(B, packet(0), NOW, NOW + 600)
        second, _ = outbox.add(B, packet(1), NOW, NOW + 600)
        outbox.remove(first)
        outbox.remove(first)  # twice: no error
        assert outbox.entries(B) == [second]
        with pytest.raises(KeyError):
            outbox.read(first)

    def test_a_duplicate_answers_the_first_entry_until_it_expires(self, outbox):
        first, duplicate = outbox.add(B, packet(0), NOW, NOW + 100, "k" * 64)
        assert not duplicate
        assert outbox.add(B, packet(0), NOW + 50, NOW + 150, "k" * 64) == (first, True)
        outbox.remove(first)  # delivered: still a duplicate until its expiry
        assert outbox.add(B, packet(0), NOW + 99, NOW + 199, "k" * 64) == (first, True)
        later, duplicate = outbox.add(B, packet(0), NOW + 100, NOW + 200, "k" * 64)
        assert not duplicate and later != first and outbox.entries(B) == [later]

    def test_expired_idempotency_records_are_swept(self, outbox):
        outbox.add(B, packet(0), NOW, NOW + 100, "a" * 64)
        outbox.add(B, packet(1), NOW, NOW + 200, "b" * 64)
        assert outbox.sweep_dedup(NOW + 99) == 0
        assert outbox.sweep_dedup(NOW + 100) == 1
        assert outbox.add(B, packet(1), NOW + 150, NOW + 300, "b" * 64)[1] is True

    def test_backoff_is_saved_loaded_and_cleared(self, outbox):
        assert outbox.load_backoff(B) == BackoffState()
        outbox.add(B, packet(0), NOW, NOW + 600)
        state = BackoffState(3, NOW + 12.5, "HTTP 503 errno 180")
        outbox.save_backoff(B, state)
        assert outbox.load_backoff(B) == state
        outbox.clear_backoff(B)
        assert outbox.load_backoff(B) == BackoffState()

    def test_only_an_empty_queue_is_removed(self, outbox):
        entry, _ = outbox.add(B, packet(0), NOW, NOW + 600)
        outbox.save_backoff(B, BackoffState(1, NOW + 1, "x"))
        assert outbox.remove_destination(B) is False
        assert outbox.entries(B) == [entry]
        outbox.remove(entry)
        assert outbox.remove_destination(B) is True
        assert outbox.destinations() == [] and outbox.load_backoff(B) == BackoffState()
        assert outbox.remove_destination(B) is True  # already gone
        again, _ = outbox.add(B, packet(1), NOW, NOW + 600)  # and made again on demand
        assert outbox.entries(B) == [again]

    def test_a_claim_follows_the_backoff_and_carries_the_queue(self, outbox):
        entries = [outbox.add(B, packet(n), NOW, NOW + 600)[0] for n in range(2)]
        claim = outbox.claim(B, NOW)
        assert claim.granted and claim.entries == entries and claim.backoff == BackoffState()
        assert outbox.renew(B, NOW + 1) is True
        assert outbox.release(B, NOW + 1) is True  # packets wait, and may be sent now
        waiting = BackoffState(2, NOW + 30, "refused")
        outbox.save_backoff(B, waiting)
        denied = outbox.claim(B, NOW + 29)
        assert not denied.granted and denied.backoff == waiting and denied.entries == entries
        assert outbox.release(B, NOW + 29) is False  # not before the next attempt
        assert outbox.claim(B, NOW + 30).granted
        for entry in entries:
            outbox.remove(entry)
        assert outbox.release(B, NOW + 31) is False

    def test_pending_names_queues_with_packets_and_whether_they_are_due(self, outbox):
        outbox.add(B, packet(0), NOW, NOW + 600)
        outbox.add(C, packet(1), NOW, NOW + 600)
        outbox.save_backoff(C, BackoffState(1, NOW + 10, "x"))
        outbox.save_backoff("d.test", BackoffState(1, NOW + 10, "x"))  # no packets: not pending
        assert outbox.pending(NOW) == {B: True, C: False}
        assert outbox.pending(NOW + 10) == {B: True, C: True}

    def test_summary_counts_each_queue(self, outbox):
        outbox.add(B, packet(0), NOW - 50, NOW + 10)
        outbox.add(B, packet(1), NOW, NOW + 600)
        outbox.save_backoff(B, BackoffState(4, NOW + 5, "HTTP 503"))
        (row,) = outbox.summary(NOW + 10)
        assert (row.destination, row.queued, row.expired, row.oldest_received) == (B, 2, 1, NOW - 50)
        assert row.backoff == BackoffState(4, NOW + 5, "HTTP 503") and row.holder is None
        assert row.to_json()["failures"] == 4
