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
    outbox = FederationOutbox.open(outbox_path(settings))
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
                             endpoints=endpoints, pool=pool, run=run, only=only)


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
