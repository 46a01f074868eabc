"""The /metrics queue gauges of a shared (PostgreSQL) outbox: one query for any number of
scrapes, at most every MAX_AGE seconds, waited for by the scrape (msgrelay/federation/gauges.py).
Driven on a task.Clock with a query the test answers; tests/test_federation_pg_e2e.py has two
real relay processes reporting the same numbers."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from msgrelay.federation.gauges import MAX_AGE, SharedGauges, gauge_rows
from msgrelay.federation.outbox import BackoffState, OutboxUnavailable
from msgrelay.federation.outbox_interface import QueueSummary
from msgrelay.metrics import MetricsPage, RelayMetrics
from msgrelay.settings import resolve

T0 = 1_800_000_000.0


class Queries:
    """`run` for SharedGauges: records each summary query and lets the test answer it."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, Deferred]] = []

    def run(self, function: Any, now: float) -> Deferred:
        d: Deferred = Deferred()
        self.pending.append((now, d))
        return d


def summary(queued: int = 2, attempts: int = 0, next_attempt: Any = None) -> list[QueueSummary]:
    return [QueueSummary("b.test", queued, 0, int(T0) - 30, BackoffState(attempts, next_attempt, None))]


def test_rows_from_the_outbox_summary():
    rows = gauge_rows(summary(3, 2, T0 + 7.5) + [QueueSummary("c.test", 0, 0, None, BackoffState())], T0)
    assert rows == [
        {"destination": "b.test", "queued": 3, "oldest_age_seconds": 30.0, "backoff_seconds": 7.5, "failures": 2},
        {"destination": "c.test", "queued": 0, "oldest_age_seconds": 0.0, "backoff_seconds": 0.0, "failures": 0},
    ]
    assert gauge_rows(summary(1, 3, T0 - 1), T0)[0]["backoff_seconds"] == 0.0  # due now: no wait left


def test_scrapes_share_one_query_and_a_fresh_snapshot_is_served_as_is():
    clock, queries = Clock(), Queries()
    clock.advance(T0)
    gauges = SharedGauges(lambda now: [], queries.run, clock)
    first, second = gauges.refresh(), gauges.refresh()
    assert first is not None and second is not None and len(queries.pending) == 1
    assert not first.called and gauges.rows == []
    queries.pending[0][1].callback(summary(4))
    assert first.called and second.called and gauges.rows[0]["queued"] == 4
    clock.advance(MAX_AGE - 0.1)
    assert gauges.refresh() is None and len(queries.pending) == 1  # younger than MAX_AGE
    clock.advance(0.1)
    assert gauges.refresh() is not None and len(queries.pending) == 2 and queries.pending[1][0] == T0 + MAX_AGE


def test_a_failed_query_keeps_the_last_snapshot_and_releases_the_scrapes():
    clock, queries = Clock(), Queries()
    gauges = SharedGauges(lambda now: [], queries.run, clock)
    gauges.refresh()
    queries.pending[0][1].callback(summary(2))
    clock.advance(MAX_AGE)
    waiting = gauges.refresh()
    assert waiting is not None
    queries.pending[1][1].errback(Failure(OutboxUnavailable("database down")))
    assert waiting.called and waiting.result is None and gauges.rows[0]["queued"] == 2
    assert gauges.refresh() is not None and len(queries.pending) == 3  # tried again at the next scrape


class Federation:
    def __init__(self, gauges: SharedGauges):
        self.gauges = gauges

    def queue_gauges(self) -> list[dict[str, Any]]:
        return self.gauges.rows


def page_and_gauges() -> tuple[MetricsPage, SharedGauges, Queries]:
    clock, queries = Clock(), Queries()
    gauges = SharedGauges(lambda now: [], queries.run, clock)
    metrics = RelayMetrics(process=False)
    metrics.watch(type("Site", (), {"routes": {}, "open_connections": 0})(), None, Federation(gauges), dict)
    return MetricsPage(metrics, resolve({}, {}), public=False, before_scrape=[gauges.refresh]), gauges, queries


def test_a_scrape_waits_for_the_shared_queues():
    page, _, queries = page_and_gauges()
    request = DummyRequest([b"metrics"])
    assert page.render(request) is NOT_DONE_YET and request.written == []
    queries.pending[0][1].callback(summary(5))
    body = b"".join(request.written).decode()
    assert request.finished == 1
    assert 'msgrelay_federation_queue_messages{destination="b.test"} 5.0' in body


def test_a_scraper_gone_before_the_answer_gets_nothing_written():
    page, _, queries = page_and_gauges()
    request = DummyRequest([b"metrics"])
    page.render(request)
    request.processingFailed(Failure(ConnectionError("gone")))
    queries.pending[0][1].callback(summary(5))
    assert request.written == [] and request.finished == 0
