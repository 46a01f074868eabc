"""Shared fixtures: user keys, and the real service tree listening on a loopback port."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import rsa

from apiclient import ApiClient, User
from relayproc import free_port

_KEYS: list[rsa.RSAPrivateKey] = []


def _key(index: int) -> rsa.RSAPrivateKey:
    while len(_KEYS) <= index:
        _KEYS.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return _KEYS[index]


@pytest.fixture
def users():
    """Distinct users (2048-bit keys, generated once per session)."""
    return [User(_key(i)) for i in range(4)]


class LiveRelay:
    """The service tree of `twistd msgrelay`, built by makeService and started in this process."""

    def __init__(self, state_dir: Path, args: list[str]):
        from twisted.internet import reactor

        from msgrelay.service import Options, makeService

        self.port = free_port()
        self.state_dir = state_dir
        options = Options()
        options.parseOptions(
            ["--listen", f"tcp:{self.port}:interface=127.0.0.1", "--state-dir", str(state_dir),
             "--server-name", "relay.test", *args]
        )
        self.service = makeService(options, reactor)
        self.core = self.service.core
        self.url = f"http://127.0.0.1:{self.port}"
        self.client: Optional[ApiClient] = None

    async def start(self) -> "LiveRelay":
        self.service.startService()
        self.client = await ApiClient.connect(self.url)
        return self

    def stop(self) -> Any:
        from twisted.internet.defer import maybeDeferred

        return maybeDeferred(self.service.stopService)


@pytest.fixture
def start_relay(tmp_path):
    """Start relays with extra command-line args; all are stopped at the end of the test."""
    started: list[LiveRelay] = []

    async def start(*args: str, state_dir: Optional[Path] = None) -> LiveRelay:
        relay = LiveRelay(state_dir or tmp_path / f"state{len(started)}", list(args))
        started.append(relay)
        return await relay.start()

    yield start
    for relay in started:
        pytest_twisted.blockon(relay.stop())


@pytest.fixture
def relay(start_relay):
    """One relay with default settings."""
    from twisted.internet.defer import Deferred

    return pytest_twisted.blockon(Deferred.fromCoroutine(start_relay()))
