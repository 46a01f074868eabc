"""Shared fixtures: user keys, and the real service tree listening on a loopback port."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import rsa

from apiclient import ApiClient, User
from memrelay import MemoryRelay
from relayproc import KEYS, free_port, seed_server_key


def _temporary_state_in_memory() -> None:
    """Put pytest's tmp_path (and every relay's state under it) on tmpfs when there is one.

    The suite tests behaviour; what fsync costs on a shared CI disk is bench/'s subject, and
    here it only made the wall time swing from run to run. A crash test kills processes,
    which tmpfs survives as a disk does. An explicit TMPDIR (or --basetemp) wins, and a small
    /dev/shm (containers often have 64 MiB) is left alone. Runs at import, in pytest and in
    every worker, before the first temporary directory is made; relays and clients started
    by the tests inherit it.
    """
    shm = Path("/dev/shm")
    if "TMPDIR" in os.environ or not shm.is_dir() or not os.access(shm, os.W_OK | os.X_OK):
        return
    room = os.statvfs(shm)
    if room.f_bavail * room.f_frsize >= 1 << 30:
        os.environ["TMPDIR"] = str(shm)
        tempfile.tempdir = None  # recomputed from TMPDIR on next use


_temporary_state_in_memory()

#: The files that take longest, longest first (seconds of one file on one worker, measured on
#: the 2-core CI machine). They are handed to the parallel workers first, so that no worker
#: starts a long file when the others are nearly done (pytest.ini: --dist loadfile with
#: --no-loadscope-reorder, which keeps this order). Files not listed follow in the usual order.
LONGEST_FIRST = (
    "test_webapp.py",              # ~73 s: Chromium
    "test_docs_verbatim.py",       # ~68 s: installs a fresh copy
    "test_crash.py",               # ~53 s: 2 x 15 SIGKILLs
    "test_fuzz_openapi.py",        # ~42 s: schemathesis
    "test_federation_pg_e2e.py",   # ~32 s
    "test_bench.py",               # ~32 s: bench/run.py, three small runs
    "test_workers.py",             # ~18 s
    "test_client_e2e.py",          # ~18 s: msgrelay-client commands (tests/clientfork.py)
    "test_keyrotation.py",
    "test_first_hour.py",
    "test_store_postgres.py",
    "test_federation_e2e.py",
    "test_admin.py",
    "test_client_e2e_trust.py",
    "test_wire_properties.py",
    "test_key_transitions_e2e.py",
    "test_admin_live.py",
    "test_twistd.py",
    "test_timeouts.py",
    "test_control.py",             # ~7 s; files not listed here take under 7 s each
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept

_KEYS: list[rsa.RSAPrivateKey] = []


def _key(index: int) -> rsa.RSAPrivateKey:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    while len(_KEYS) <= index:
        path = KEYS / f"user-{len(_KEYS)}.pem"
        if path.exists():
            key = load_pem_private_key(path.read_bytes(), None)
            assert isinstance(key, rsa.RSAPrivateKey)
        else:  # beyond the fixed ones: made once per session (tests with many users)
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _KEYS.append(key)
    return _KEYS[index]


@pytest.fixture
def users():
    """Distinct users (fixed 2048-bit test keys from tests/keys/)."""
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
        assert options.settings is not None
        seed_server_key(state_dir, options.settings.server.name)
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


def _starting(make: Any) -> Any:
    """Yield `start(...)`, which builds a relay with `make(index, ...)` and starts it; every
    relay started is stopped at the end."""
    started: list[Any] = []

    async def start(*args: Any, **kwargs: Any) -> Any:
        relay = make(len(started), *args, **kwargs)
        started.append(relay)
        return await relay.start()

    yield start
    for relay in started:
        pytest_twisted.blockon(relay.stop())


@pytest.fixture
def start_relay(tmp_path):
    """Start relays with extra command-line args; all are stopped at the end of the test."""

    def make(index: int, *args: str, state_dir: Optional[Path] = None) -> LiveRelay:
        return LiveRelay(state_dir or tmp_path / f"state{index}", list(args))

    yield from _starting(make)


@pytest.fixture
def start_memory_relay(tmp_path):
    """Start in-memory relays (memrelay.py) with settings given as section__key=value."""

    def make(index: int, **values: Any) -> MemoryRelay:
        return MemoryRelay(tmp_path / f"memory{index}", {k.replace("__", "."): v for k, v in values.items()})

    yield from _starting(make)


@pytest.fixture
def memory_relay(start_memory_relay):
    """One in-memory relay with default settings."""
    from twisted.internet.defer import Deferred

    return pytest_twisted.blockon(Deferred.fromCoroutine(start_memory_relay()))


@pytest.fixture
def relay(start_relay):
    """One relay with default settings."""
    from twisted.internet.defer import Deferred

    return pytest_twisted.blockon(Deferred.fromCoroutine(start_relay()))
