"""A Session: one opened profile talking to its relay, and to contacts' relays for key lookups."""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

import click
from twisted.internet.defer import gatherResults

from .api import DEFAULT_TIMEOUT, RelayClient, ServerInfo, returns_deferred
from .errors import TrustError, UsageError
from .identity import Identity
from .outbox import Outbox
from .profile import Profile


def warn(text: str) -> None:
    """One line for the person on stderr (output.py imports the sending side, hence here)."""
    click.echo(text, err=True)

_HEX64 = re.compile(r"[0-9a-f]{64}")


def normalise_fingerprint(text: str) -> str:
    """Accept `AB:CD:...` or spaced forms as people copy them; pin lowercase hex."""
    cleaned = re.sub(r"[\s:]", "", text).lower()
    if not _HEX64.fullmatch(cleaned):
        raise UsageError(f"{text!r} is not a key fingerprint (64 hex digits, SHA-256)")
    return cleaned


class Session:
    """Owns the RelayClient objects of one command, so that they are closed together."""

    def __init__(
        self,
        profile: Profile,
        identity: Identity,
        config: dict[str, Any],
        *,
        reactor: Any,
        ca_file: Optional[str] = None,
        trust_fingerprint: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        self.profile = profile
        self.identity = identity
        self.config = config
        self.reactor = reactor
        self.ca_file = ca_file or config.get("ca_file")
        self.trust_fingerprint = normalise_fingerprint(trust_fingerprint) if trust_fingerprint else None
        self.timeout = timeout
        self.api = RelayClient(
            config["server_url"],
            reactor=reactor,
            identity=identity,
            ca_file=self.ca_file,
            pinned_fingerprint=self.trust_fingerprint or config["server_fingerprint"],
            timeout=timeout,
            label=f"relay {config['server_name']}",
            follow_transitions=self.trust_fingerprint is None,
        )
        self._others: dict[str, RelayClient] = {}
        self.outbox = Outbox(profile.folder("outbox"), profile.folder("outbox-failed"))

    @classmethod
    def open(
        cls, profile: Profile, passphrase: Callable[[], Optional[bytes]], *, reactor: Any, **options: Any
    ) -> "Session":
        """Load config and key (asking for the passphrase only if the key is encrypted)."""
        config = profile.load_config()
        return cls(profile, profile.load_identity(passphrase), config, reactor=reactor, **options)

    @property
    def address(self) -> str:
        return self.identity.address

    @returns_deferred
    async def connect(self) -> ServerInfo:
        """Server info, with the pinned key and name checked; re-pins an explicitly trusted key."""
        info = await self.api.server_info()
        if info.name != self.config["server_name"]:
            raise TrustError(
                f"the relay at {self.api.url} now calls itself {info.name!r}, but this profile is "
                f"registered at {self.config['server_name']!r}: refusing to continue"
            )
        before = self.config["server_fingerprint"]
        if info.fingerprint != before:
            # Reached along a verified chain of key transitions, or because --trust-fingerprint
            # named exactly this key: either way the person hears about it, in one line.
            def repin(config: dict[str, Any]) -> None:
                config["server_fingerprint"] = info.fingerprint

            self.config = self.profile.update_config(repin)
            if self.api.followed is not None:
                steps = self.api.followed[2]
                warn(f"the relay {info.name} rotated its key: now pinned {info.fingerprint} (was {before}), "
                     f"following {steps} key transition{'s' if steps != 1 else ''} signed by the previous key")
            else:
                warn(f"--trust-fingerprint: now pinned the relay key {info.fingerprint} of {info.name} (was {before})")
        elif self.trust_fingerprint is not None:
            warn(f"--trust-fingerprint: the relay key {info.fingerprint} of {info.name} was already pinned; nothing changed")
        return info

    def relay_for(self, server_name: str, relay_url: Optional[str] = None) -> RelayClient:
        """Our relay for contacts on it; else `relay_url` or https://<server_name> (unsigned lookups)."""
        if server_name.lower() == self.config["server_name"].lower() and not relay_url:
            return self.api
        url = relay_url or f"https://{server_name}"
        if url not in self._others:
            self._others[url] = RelayClient(
                url, reactor=self.reactor, ca_file=self.ca_file, timeout=self.timeout, label=f"relay {server_name}"
            )
        return self._others[url]

    def close(self) -> Any:
        return gatherResults([api.close() for api in [self.api, *self._others.values()]])
