"""`build_relay`: every part of one relay, wired at construction, with no sockets opened.

`twistd msgrelay` (service.py), the tests and the benchmarks build relays here, so they
run the same wiring. Nothing is assigned after construction: each part is given what it
uses (the core its forwarder and observers, the site its settings and observers). What
has a lifecycle (thread pools, the federation sender, push, a store this builder opened)
is under `Relay.service`; listeners and timers are added by `makeService`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Optional, Protocol, runtime_checkable

from twisted.application.service import MultiService, Service
from twisted.web.resource import IResource

from . import __version__
from .federation.factory import build_push, build_sender, reload_policy
from .federation.push import PushNotifier
from .federation.resolver import CachingResolver, build_resolver
from .federation.service import FederationService
from .keyrotation import KeyringWatcher, load_keyring, previous_keys_dir
from .metrics import MetricsPage, MetricsSite, RelayMetrics, StoreStats
from .pools import Pools, PoolsService, run_in
from .ratelimit import RateLimits
from .relay import RelayCore
from .serverkey import ServerKeyring
from .settings import Reconfigurable, Reload, Settings
from .store.factory import open_store
from .store.interface import IStore
from .web.api import RelayAPI, allowed_methods
from .web.app import web_client_routes
from .web.connlimit import RelayConnectionLimiter, connection_limiter
from .web.site import RelaySite


@runtime_checkable
class _Closable(Protocol):
    def close(self) -> Any: ...


class StoreService(Service):
    """Closes a store the builder opened (its PostgreSQL connections) when the tree stops."""

    name = "store"

    def __init__(self, store: IStore):
        self.store = store

    def stopService(self) -> Any:
        super().stopService()
        return self.store.close() if isinstance(self.store, _Closable) else None


class PartsService(MultiService):
    """The relay's parts with a lifecycle, and their thread pools: the pools start before
    the parts and stop only once every part has stopped (stopping may still queue work on
    them: the last outbox writes, closing the store's connections)."""

    def __init__(self, pools: Pools):
        super().__init__()
        self.pools = PoolsService(pools)

    def startService(self) -> None:
        self.pools.startService()
        super().startService()

    def stopService(self) -> Any:
        d = super().stopService()
        return d.addBoth(lambda result: (self.pools.stopService(), result)[1])


class FederationPolicyReload:
    """A reload of `federation.mode` or `federation.peers` applies to the running sender."""

    settings_sections: ClassVar[frozenset[str]] = frozenset({"federation"})

    def __init__(self, sender: FederationService):
        self.sender = sender

    def reconfigure(self, reload: Reload) -> None:
        reload_policy(self.sender, reload.running)


@dataclass(frozen=True)
class Relay:
    """One relay's parts. `service` holds those with a lifecycle and the thread pools."""

    settings: Settings  # as built; the running settings are the ReloadService's
    reactor: Any
    pools: Pools
    store: IStore
    keyring: ServerKeyring
    metrics: RelayMetrics
    store_stats: StoreStats
    core: RelayCore
    limits: RateLimits
    api: RelayAPI
    site: RelaySite
    federation: FederationService
    push: PushNotifier
    resolver: CachingResolver
    connections: RelayConnectionLimiter  # the factory the relay's listeners serve: wraps `site`
    keyring_watcher: KeyringWatcher
    service: PartsService
    reconfigurables: tuple[Reconfigurable, ...]

    @property
    def resource(self) -> IResource:
        """The HTTP resource of the relay's own listeners (API, /errors, /metrics)."""
        return self.site.resource

    def metrics_site(self) -> MetricsSite:
        """A site for a dedicated `metrics.listen` listener (reconfigure it on reload too)."""
        page = MetricsPage(self.metrics, self.settings, public=False, stats=self.store_stats,
                           before_scrape=[self.federation.refresh_gauges])
        return MetricsSite(page, self.reactor, self.settings)


def build_relay(settings: Settings, reactor: Any, *, store: Optional[IStore] = None,
                keyring: Optional[ServerKeyring] = None, http_client: Any = None) -> Relay:
    """Build a relay. Without `store` and `keyring` they are opened from the settings (raising
    StoreUnavailable or ServerKeyError); `http_client` replaces the federation and push
    clients (tests). Raises OutboxUnavailable, OSError or ValueError for a bad federation
    set-up. Opens no socket and takes no lock: the service tree does that when started."""
    pools = Pools.from_settings(settings)
    lifecycle = PartsService(pools)
    if store is None:
        store = open_store(settings, reactor, pools.store)
        StoreService(store).setServiceParent(lifecycle)
    if keyring is None:
        keyring = load_keyring(settings, reactor.seconds())
    metrics = RelayMetrics(__version__, store.name)
    resolver = build_resolver(settings, reactor)  # one asynchronous DNS cache for push and federation
    federation = build_sender(settings, reactor, resolver.resolve, outbox_pool=pools.outbox, http=http_client)
    push = build_push(settings, store, reactor, resolver.resolve, http=http_client)
    core = RelayCore(settings, store, keyring, reactor, forwarder=federation.forwarder, message_observers=[push],
                     stored_observers=[metrics.observe_stored], expired_observers=[metrics.observe_expired],
                     run_crypto=partial(run_in, reactor, pools.crypto))
    limits = RateLimits(settings, reactor, observers=[metrics.observe_rate_limited])
    api = RelayAPI(core, limits)
    store_stats = StoreStats(metrics, store, reactor, settings)
    metrics_page = MetricsPage(metrics, settings, public=True, stats=store_stats,
                               before_scrape=[federation.refresh_gauges])
    routes: dict[bytes, Any] = {b"/metrics": metrics_page}
    if settings.web_client.enabled:  # the browser client at /app/ (msgrelay/web/app.py)
        routes.update(web_client_routes(settings.server.errors_url or None))
    site = RelaySite(api.app.resource(), reactor, settings, partial(allowed_methods, api),
                     routes=routes, request_observers=[metrics.observe_request],
                     timeout_observers=[metrics.observe_timeout])
    connections = connection_limiter(site, settings, limits, reactor)
    metrics.watch(site, api.app.url_map, federation, pools.loads)
    metrics.attach_transport(connections, resolver)
    # Picks up `msgrelay-admin rotate-key` and drops retired keys after their grace period.
    watcher = KeyringWatcher(keyring, settings.key_path(), previous_keys_dir(settings), reactor)
    resolver.setServiceParent(lifecycle)
    federation.setServiceParent(lifecycle)
    push.setServiceParent(lifecycle)
    reconfigurables: tuple[Reconfigurable, ...] = (
        core, limits, site, connections, store_stats, metrics_page, watcher, FederationPolicyReload(federation))
    return Relay(settings, reactor, pools, store, keyring, metrics, store_stats, core, limits, api, site,
                 federation, push, resolver, connections, watcher, lifecycle, reconfigurables)
