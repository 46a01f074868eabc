"""Prometheus metrics: a dedicated registry, fed by hooks, served by a small resource.

Nothing is served unless the operator asks: `metrics.listen` opens a listener of its own
(e.g. "tcp:9101:interface=127.0.0.1"), and `metrics.token` serves `/metrics` on the
relay's own listeners to requests bearing `Authorization: Bearer <token>` (compared in
constant time; when set, the dedicated listener requires it too).

Metrics are collected on the reactor thread. The store gauges come from `store.stats()`,
which runs off the reactor thread and may walk the whole store, so it is refreshed in the
background when a scrape finds the last figures older than `metrics.stats_interval`:
they are at most that old plus one scrape. Nobody scraping costs nothing.
"""

from __future__ import annotations

import hmac
import time
from typing import Any, Callable, ClassVar, Iterable, Mapping, Optional, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from .heap import GENERATIONS, CollectorPauses, frozen, pauses
from .pools import PoolLoad
from .settings import Reload, Settings
from .wire.errors import ProtocolError

log = Logger(namespace="msgrelay.metrics")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
KNOWN_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"}
UNMATCHED = "(unmatched)"


class RoutePatterns:
    """Maps a request path to its route pattern (`/api/v1/user/<user_id>`), so labels stay few."""

    def __init__(self, url_map: Any, extra: Mapping[bytes, Any]):
        self.url_map = url_map
        self.extra = extra  # the site's extra routes (b"/metrics"), served as named
        #: Paths that are their own pattern (no `<user_id>`), by method: as few as the routes.
        self._static: dict[tuple[str, str], str] = {}

    def __call__(self, method: str, path: str) -> str:
        """Every request is labelled, so the common static paths skip the routing."""
        known = self._static.get((method, path))
        if known is not None:
            return known
        pattern = self._match(method, path)
        if pattern == path:
            self._static[(method, path)] = pattern
        return pattern

    def _match(self, method: str, path: str) -> str:
        if path.encode("utf-8", "replace") in self.extra:
            return path
        adapter = self.url_map.bind("relay")
        try:
            rule, _ = adapter.match(path, method=method if method in KNOWN_METHODS else "GET", return_rule=True)
            return rule.rule
        except MethodNotAllowed as e:
            for valid in e.valid_methods or ():
                try:
                    rule, _ = adapter.match(path, method=valid, return_rule=True)
                    return rule.rule
                except HTTPException:
                    continue
        except HTTPException:
            pass
        return UNMATCHED


class FederationCollector:
    """Per-destination federation queue gauges, read from `federation` at each scrape.

    Its `queue_gauges()` gives dicts with `destination`, `queued`, `oldest_age_seconds`,
    `backoff_seconds` and `failures` (with the PostgreSQL outbox, the database's view shared
    by every process, taken before the scrape: `MetricsPage.before_scrape`).
    """

    FAMILIES = (
        ("queued", "msgrelay_federation_queue_messages", "Packets queued for delivery to a peer relay"),
        ("oldest_age_seconds", "msgrelay_federation_queue_oldest_age_seconds",
         "Age of the oldest packet queued for a peer relay"),
        ("backoff_seconds", "msgrelay_federation_backoff_seconds",
         "Current retry back-off for a peer relay (0 when delivering normally)"),
        ("failures", "msgrelay_federation_queue_failures",
         "Consecutive failed attempts to a peer relay (0 when delivering normally)"),
    )

    def __init__(self, federation: Any):
        self.federation = federation

    def collect(self) -> Iterable[GaugeMetricFamily]:
        families = {key: GaugeMetricFamily(name, doc, labels=["destination"]) for key, name, doc in self.FAMILIES}
        status = getattr(self.federation, "queue_gauges", None)
        if status is not None:
            try:
                rows = list(status())
            except Exception:
                log.failure("federation queue_gauges() failed; federation metrics skipped")
                rows = []
            for row in rows:
                destination = str(row.get("destination", ""))
                for key, family in families.items():
                    value = row.get(key)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        family.add_metric([destination], float(value))
        return list(families.values())


class PoolCollector:
    """Size, busy threads and queued work of each thread pool (msgrelay/pools.py), per scrape,
    and the time its calls waited for a thread and ran: a pool whose calls wait is too small or
    its resource too slow (disk, database, CPU), and where requests spend their time is read
    off the differences between two scrapes."""

    def __init__(self, loads: Callable[[], Mapping[str, PoolLoad]]):
        self.loads = loads

    def collect(self) -> Iterable[Metric]:
        size = GaugeMetricFamily("msgrelay_thread_pool_size", "Most threads a pool runs", labels=["pool"])
        busy = GaugeMetricFamily("msgrelay_thread_pool_busy", "Threads of a pool running work", labels=["pool"])
        queued = GaugeMetricFamily("msgrelay_thread_pool_queued", "Work waiting for a thread of a pool",
                                   labels=["pool"])
        calls = CounterMetricFamily("msgrelay_thread_pool_calls", "Calls a pool has finished", labels=["pool"])
        waited = CounterMetricFamily("msgrelay_thread_pool_wait_seconds",
                                     "Time the finished and running calls of a pool waited for a thread",
                                     labels=["pool"])
        ran = CounterMetricFamily("msgrelay_thread_pool_run_seconds", "Time the finished calls of a pool ran",
                                  labels=["pool"])
        for name, load in self.loads().items():
            size.add_metric([name], load.size)
            busy.add_metric([name], load.busy)
            queued.add_metric([name], load.queued)
            calls.add_metric([name], load.done)
            waited.add_metric([name], load.waited)
            ran.add_metric([name], load.ran)
        return [size, busy, queued, calls, waited, ran]


class CollectorMetrics:
    """Python's garbage collections and the time they stopped the process (msgrelay/heap.py),
    by generation: a full collection (2) stops every request in flight."""

    def __init__(self, timed: CollectorPauses):
        self.timed = timed

    def collect(self) -> Iterable[Metric]:
        calls = CounterMetricFamily("msgrelay_gc_collections", "Garbage collections, by generation",
                                    labels=["generation"])
        seconds = CounterMetricFamily("msgrelay_gc_pause_seconds", "Time garbage collections took, by generation",
                                      labels=["generation"])
        longest = GaugeMetricFamily("msgrelay_gc_longest_pause_seconds",
                                    "The longest garbage collection of each generation since start",
                                    labels=["generation"])
        for generation in GENERATIONS:
            label = [str(generation)]
            calls.add_metric(label, self.timed.collections[generation])
            seconds.add_metric(label, self.timed.seconds[generation])
            longest.add_metric(label, self.timed.longest[generation])
        kept = GaugeMetricFamily("msgrelay_gc_frozen_objects",
                                 "Start-up objects frozen out of full garbage collections", value=frozen())
        return [calls, seconds, longest, kept]


class RelayMetrics:
    """Every msgrelay metric, on a registry of its own."""

    def __init__(self, version: str = "", store_name: str = "", process: bool = True):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        Info("msgrelay_build", "msgrelay version and store backend", registry=r).info(
            {"version": version, "store": store_name})
        self.requests = Counter("msgrelay_http_requests", "HTTP requests answered, by route, method and status",
                                ["endpoint", "method", "status"], registry=r)
        self.errors = Counter("msgrelay_errors", "Error answers by protocol errno", ["errno"], registry=r)
        self.accept_seconds = Histogram("msgrelay_message_accept_seconds",
                                        "Time to accept a message (POST /api/v1/message answered 200)",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.fetch_seconds = Histogram("msgrelay_message_fetch_seconds",
                                       "Time to answer a fetch (GET /api/v1/message answered 200)",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.stored = Counter("msgrelay_messages_stored", "New messages stored for local users", registry=r)
        self.stored_bytes = Counter("msgrelay_message_bytes_stored",
                                    "Payload bytes of new messages stored (as counted for quotas)", registry=r)
        self.expired = Counter("msgrelay_messages_expired", "Messages removed by the expiry sweep", registry=r)
        self.rate_limited = Counter("msgrelay_rate_limited", "Requests refused by a rate limit (errno 150)",
                                    ["limit"], registry=r)
        self.timeouts = Counter("msgrelay_connections_timed_out",
                                "Connections cut off: idle, or headers or body too slow", ["phase"], registry=r)
        self.open_connections = Gauge("msgrelay_http_open_connections", "Open client connections", registry=r)
        self.connections_refused = Counter("msgrelay_connections_refused",
                                           "Connections refused by a connection cap (503 errno 180)", ["cap"],
                                           registry=r)
        self.dns_pending = Gauge("msgrelay_dns_lookups_pending", "DNS lookups in progress (push and federation)",
                                 registry=r)
        self.store_messages = Gauge("msgrelay_store_messages", "Unexpired messages in the store", registry=r)
        self.store_bytes = Gauge("msgrelay_store_bytes", "Payload bytes of unexpired messages in the store",
                                 registry=r)
        self.store_users = Gauge("msgrelay_store_users", "Registered users", registry=r)
        self.store_oldest = Gauge("msgrelay_store_oldest_message_age_seconds",
                                  "Age of the oldest unexpired message in the store (0 when empty)", registry=r)
        self.store_refreshed = Gauge("msgrelay_store_stats_timestamp_seconds",
                                     "When the store gauges were last refreshed (Unix time)", registry=r)
        if process:
            ProcessCollector(registry=r)
        r.register(CollectorMetrics(pauses()))
        self.routes: Optional[RoutePatterns] = None

    # -- hooks -------------------------------------------------------------------

    def observe_request(self, request: Any, path: bytes, seconds: float) -> None:
        method = request.method.decode("ascii", "replace")
        method = method if method in KNOWN_METHODS else "other"
        endpoint = self.routes(method, path.decode("utf-8", "replace")) if self.routes else UNMATCHED
        status = int(request.code)
        self.requests.labels(endpoint, method, str(status)).inc()
        errno = getattr(request, "errno", None)
        if errno is not None:
            self.errors.labels(str(errno)).inc()
        if status == 200 and endpoint == "/api/v1/message":
            if method == "POST":
                self.accept_seconds.observe(seconds)
            elif method == "GET":
                self.fetch_seconds.observe(seconds)

    def observe_stored(self, message: Any) -> None:
        self.stored.inc()
        self.stored_bytes.inc(message.size)

    def observe_expired(self, count: int) -> None:
        if count:
            self.expired.inc(count)

    def observe_rate_limited(self, limit: str) -> None:
        self.rate_limited.labels(limit).inc()

    def observe_timeout(self, phase: str) -> None:
        self.timeouts.labels(phase).inc()

    def set_store_stats(self, stats: dict[str, Any], now: float) -> None:
        self.store_messages.set(stats.get("messages") or 0)
        self.store_bytes.set(stats.get("bytes") or 0)
        self.store_users.set(stats.get("users") or 0)
        oldest = stats.get("oldest_received")
        self.store_oldest.set(max(0.0, now - oldest) if oldest is not None else 0)
        self.store_refreshed.set(now)

    def watch(self, site: Any, url_map: Any, federation: Any, pools: Callable[[], Mapping[str, PoolLoad]]) -> None:
        """Read the site's routes and open connections, the federation queues and the thread
        pools at each scrape. (The core, rate limits and site are given this object's
        `observe_*` methods when they are built.)"""
        self.routes = RoutePatterns(url_map, site.routes)
        self.open_connections.set_function(lambda: site.open_connections)
        self.registry.register(FederationCollector(federation))
        self.registry.register(PoolCollector(pools))

    def attach_transport(self, limiter: Any, resolver: Any) -> None:
        """Hook this into the connection limiter and the DNS resolver."""
        limiter.refusal_observers.append(lambda cap: self.connections_refused.labels(cap).inc())
        self.dns_pending.set_function(lambda: resolver.pending)

    def exposition(self, accept: Optional[str]) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class StoreStats:
    """Refreshes the store gauges in the background, at most every `metrics.stats_interval` seconds."""

    settings_sections: ClassVar[frozenset[str]] = frozenset({"metrics"})

    def __init__(self, metrics: RelayMetrics, store: Any, clock: Any, settings: Settings):
        self.metrics = metrics
        self.store = store
        self.clock = clock
        self.settings = settings
        self.last: Optional[float] = None
        self.running: Optional[Deferred] = None

    def reconfigure(self, reload: Reload) -> None:
        self.settings = reload.running

    def maybe_refresh(self) -> Optional[Deferred]:
        now = self.clock.seconds()
        if self.running is not None or (self.last is not None
                                        and now - self.last < self.settings.metrics.stats_interval):
            return self.running
        self.last = now
        started = time.monotonic()
        d = self.store.stats(int(now))

        def done(stats: dict[str, Any]) -> None:
            self.metrics.set_store_stats(stats, self.clock.seconds())
            log.debug("store stats refreshed in {seconds:.3f}s", seconds=time.monotonic() - started)

        def failed(failure: Any) -> None:
            log.warn("store stats for metrics failed: {error}", error=failure.getErrorMessage())

        def finished(_: Any) -> None:
            self.running = None

        d.addCallbacks(done, failed)
        d.addBoth(finished)
        if self.running is None and not d.called:
            self.running = d
        return d


class MetricsPage(Resource):
    """`GET /metrics`: the exposition, for a bearer token when one is configured.

    On the relay's own listeners (`public=True`) the page exists only while `metrics.token`
    is set: otherwise it answers like any unknown path (404 errno 132).
    """

    isLeaf = True
    settings_sections: ClassVar[frozenset[str]] = frozenset({"metrics", "server"})

    def __init__(self, metrics: RelayMetrics, settings: Settings, public: bool,
                 stats: Optional[StoreStats] = None,
                 before_scrape: Sequence[Callable[[], Optional[Deferred]]] = ()):
        super().__init__()
        self.metrics = metrics
        self.settings = settings
        self.public = public
        self.stats = stats
        #: Each may return a Deferred (which never fails) to wait for before answering: the
        #: shared federation queues are read from the database (federation/gauges.py).
        self.before_scrape = tuple(before_scrape)

    def reconfigure(self, reload: Reload) -> None:
        self.settings = reload.running

    def errors_url(self) -> str:
        return self.settings.server.errors_url

    def render(self, request: Any) -> Any:
        from .web.responses import info_base, write_error

        expected = self.settings.metrics.token
        if self.public and not expected:
            error = ProtocolError(132, f"no endpoint {request.path.decode('utf-8', 'replace')} on this relay")
            return write_error(request, error, info_base(request, self.errors_url()))
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader("Allow", "GET, HEAD")
            return write_error(request, ProtocolError(133, f"{request.method.decode()} is not allowed here; use GET"),
                               info_base(request, self.errors_url()))
        if expected:
            offered = (request.getHeader("Authorization") or "").encode("utf-8", "replace")
            if not hmac.compare_digest(offered, b"Bearer " + expected.encode("utf-8")):
                request.setHeader("WWW-Authenticate", 'Bearer realm="msgrelay metrics"')
                error = ProtocolError(110, "/metrics needs the header Authorization: Bearer <metrics.token>")
                return write_error(request, error, info_base(request, self.errors_url()))
        if self.stats is not None:
            self.stats.maybe_refresh()
        waits = [d for d in (before() for before in self.before_scrape) if d is not None]
        if not waits:
            return self._exposition(request)
        gone: list[Any] = []
        request.notifyFinish().addBoth(gone.append)  # fires early only if the client went away

        def answer(_: Any) -> None:
            if not gone:
                request.write(self._exposition(request))
                request.finish()

        gatherResults(waits).addBoth(answer)
        return server.NOT_DONE_YET

    def _exposition(self, request: Any) -> bytes:
        body, content_type = self.metrics.exposition(request.getHeader("Accept"))
        request.setHeader("Content-Type", content_type)
        request.setHeader("Content-Length", str(len(body)))
        request.setHeader("Cache-Control", "no-store")
        return b"" if request.method == b"HEAD" else body


class MetricsSite(server.Site):
    """The dedicated metrics listener: `/metrics` only, same connection deadlines, no access log."""

    noisy = False
    settings_sections: ClassVar[frozenset[str]] = frozenset({"timeouts", "metrics", "server"})

    def __init__(self, page: MetricsPage, clock: Any, settings: Settings,
                 timeout_observers: Iterable[Callable[[str], None]] = ()):
        from .timeouts import RelayChannel

        root = Resource()
        root.putChild(b"metrics", page)
        super().__init__(root, reactor=clock)
        self.protocol = RelayChannel  # type: ignore[method-assign,assignment]  # HTTP/1.1 only, with deadlines
        self.page = page
        self.settings = settings
        self.timeout_observers = list(timeout_observers)

    def reconfigure(self, reload: Reload) -> None:
        self.settings = reload.running
        self.page.reconfigure(reload)

    def connection_opened(self, channel: Any) -> None:
        pass

    def connection_closed(self, channel: Any) -> None:
        pass

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.timeOut = self.settings.timeouts.idle
        return channel

    def log(self, request: Any) -> None:
        pass  # scrapes every few seconds would drown the access log
