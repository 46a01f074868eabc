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


def build_sender(settings: Settings, reactor: Any, resolve: Optional[Resolver] = None) -> FederationSender:
    """The sender for these settings (OutboxUnavailable / OSError / ValueError on a bad setup).

    Hosts of the peer table are the operator's choice and are reached as named; any other
    destination ("open" mode) goes through the public-address check.
    """
    federation = settings.federation
    peers = parse_peer_table(federation.peers)
    policy = FederationPolicy(federation.mode, peers, settings.server.name)
    outbox = Outbox.open(outbox_path(settings))
    http, pool = make_http_client(
        reactor, federation.ca_file, resolve or thread_resolver(reactor), allow_private=False,
        trusted=frozenset(_host_port(p) for p in peers.values()), persistent=True, timeout=federation.timeout,
    )
    return FederationSender(policy, outbox, settings.server.name, reactor, http,
                            SenderConfig.from_settings(settings), pool=pool)


def build_push(settings: Settings, store: IStore, reactor: Any, resolve: Optional[Resolver] = None) -> PushNotifier:
    push = settings.push
    http, _ = make_http_client(reactor, push.ca_file, resolve or thread_resolver(reactor),
                               allow_private=push.allow_private, persistent=False, timeout=push.timeout)
    return PushNotifier(store, reactor, http, retries=push.retries, timeout=push.timeout)
