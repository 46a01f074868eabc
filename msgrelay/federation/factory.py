"""Build the federation sender and the push notifier from resolved settings."""

from __future__ import annotations

from typing import Any, Optional
from urllib.parse import urlsplit

from ..settings import Settings
from ..store.interface import IStore
from .netguard import Resolver, make_http_client, thread_resolver
from .outbox import Outbox
from .peers import FederationPolicy, Peer, parse_peer_table
from .push import PushNotifier
from .sender import FederationSender, SenderConfig


def outbox_path(settings: Settings) -> Any:
    return settings.state_dir / "outbox"


def _host_port(peer: Peer) -> tuple[str, int]:
    parts = urlsplit(peer.url)
    return (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)


def build_sender(settings: Settings, reactor: Any, resolve: Optional[Resolver] = None, *,
                 outbox_pool: Any = None, dns_pool: Any = None, http: Any = None) -> FederationSender:
    """The sender for these settings (OutboxUnavailable / OSError / ValueError on a bad setup).

    Hosts of the peer table are the operator's choice and are reached as named; any other
    destination ("open" mode) goes through the public-address check.
    """
    federation = settings.federation
    policy = _policy(settings)
    outbox = Outbox.open(outbox_path(settings))
    trusted = {_host_port(p) for p in policy.peers.values()}
    pool = None
    if http is None:  # else a client given by the builder's caller (tests)
        http, pool = make_http_client(
            reactor, federation.ca_file, resolve or thread_resolver(reactor, dns_pool), allow_private=False,
            trusted=trusted, persistent=True, timeout=federation.timeout,
        )
    sender = FederationSender(policy, outbox, settings.server.name, reactor, http,
                              SenderConfig.from_settings(settings), pool=pool, threads=outbox_pool)
    sender.trusted_hosts = trusted
    return sender


def _policy(settings: Settings) -> FederationPolicy:
    peers = parse_peer_table(settings.federation.peers)
    return FederationPolicy(settings.federation.mode, peers, settings.server.name)


def reload_policy(sender: FederationSender, settings: Settings) -> None:
    """Apply a reloaded mode and peer table (SIGHUP) to a running sender."""
    policy = _policy(settings)
    sender.trusted_hosts.clear()
    sender.trusted_hosts.update(_host_port(p) for p in policy.peers.values())
    sender.set_policy(policy)


def build_push(settings: Settings, store: IStore, reactor: Any, resolve: Optional[Resolver] = None, *,
               dns_pool: Any = None, http: Any = None) -> PushNotifier:
    push = settings.push
    if http is None:
        http, _ = make_http_client(reactor, push.ca_file, resolve or thread_resolver(reactor, dns_pool),
                                   allow_private=push.allow_private, persistent=False, timeout=push.timeout)
    return PushNotifier(store, reactor, http, retries=push.retries, timeout=push.timeout)
