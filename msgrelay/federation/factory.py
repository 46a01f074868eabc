"""Build the federation service and the push notifier from resolved settings."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

from ..net.http import tls_policy
from ..net.trust import load_trust_root
from ..pools import run_in
from ..settings import Settings
from ..store.interface import IStore
from .backoff import Backoff
from .deliverer import Deliverer
from .netguard import GuardedEndpointFactory, Resolver, guarded_http_client, make_http_client
from .outbox import FederationOutbox
from .outbox_interface import Outbox
from .peerkeys import PeerKeys
from .peers import FederationPolicy, parse_peer_table
from .push import PushNotifier
from .service import FederationService
from .resolver import build_resolver


def outbox_path(settings: Settings) -> Path:
    return settings.state_dir / "outbox"


def build_sender(settings: Settings, reactor: Any, resolve: Optional[Resolver] = None, *,
                 only: Optional[str] = None, outbox_pool: Any = None, http: Any = None) -> FederationService:
    """The federation service for these settings (OutboxUnavailable / OSError / ValueError on a bad setup).

    Hosts of the peer table are the operator's choice and are reached as named; any other
    destination ("open" mode) goes through the public-address check. `only`: deliver just
    that destination (msgrelay-admin on a stopped relay).
    """
    federation = settings.federation
    policy = _policy(settings)
    outbox = open_outbox(settings)
    if outbox.shared:  # the file outbox made it; the control socket needs it either way
        settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    endpoints = GuardedEndpointFactory(reactor, tls_policy(load_trust_root(federation.ca_file)),
                                       resolve or build_resolver(settings, reactor).resolve, allow_private=False,
                                       timeout=federation.timeout)
    pool = None
    if http is None:  # else a client given by the builder's caller (tests)
        http, pool = guarded_http_client(reactor, endpoints, persistent=True)
    keys = PeerKeys(http, reactor, federation.key_refresh, federation.timeout)
    deliverer = Deliverer(http, keys, reactor, settings.server.name, federation.timeout)
    backoff = Backoff(federation.backoff_min, federation.backoff_max)
    run = None if outbox_pool is None else functools.partial(run_in, reactor, outbox_pool)
    return FederationService(outbox, deliverer, backoff, policy, reactor, federation.max_queue,
                             endpoints=endpoints, pool=pool, run=run, only=only,
                             poll_interval=federation.poll_interval)


def lease_seconds(settings: Settings) -> float:
    """How long a claim on a destination lasts unrenewed: longer than one attempt (a key
    fetch and a POST, each bounded by federation.timeout), renewed before every attempt."""
    return 2 * settings.federation.timeout + 10


def open_outbox(settings: Settings) -> Outbox:
    """The outbox for these settings: in PostgreSQL, shared by every relay process on the
    database, when the store is there; else files in the state directory (OutboxUnavailable)."""
    if settings.store.backend == "postgresql":
        from .pgoutbox import PostgresOutbox

        # as many connections as the outbox pool has threads: more would sit idle
        return PostgresOutbox.open(settings.store.postgres_dsn, lease_seconds(settings),
                                   connections=settings.pools.outbox)
    return FederationOutbox.open(outbox_path(settings))


def _policy(settings: Settings) -> FederationPolicy:
    peers = parse_peer_table(settings.federation.peers)
    return FederationPolicy(settings.federation.mode, peers, settings.server.name)


def reload_policy(federation: FederationService, settings: Settings) -> None:
    """Apply a reloaded mode and peer table (SIGHUP) to a running federation service."""
    federation.set_policy(_policy(settings))


def build_push(settings: Settings, store: IStore, reactor: Any, resolve: Optional[Resolver] = None, *,
               http: Any = None) -> PushNotifier:
    push = settings.push
    if http is None:
        http, _ = make_http_client(reactor, push.ca_file, resolve or build_resolver(settings, reactor).resolve,
                                   allow_private=push.allow_private, persistent=False, timeout=push.timeout)
    return PushNotifier(store, reactor, http, retries=push.retries, timeout=push.timeout,
                        backoff=Backoff(push.backoff_min, push.backoff_max))
