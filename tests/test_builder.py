"""build_relay: every part wired at construction, with no socket, key file or outbox lock."""

from __future__ import annotations

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.internet import task
from twisted.python.threadpool import ThreadPool

from msgrelay.builder import build_relay
from msgrelay.reload import ReloadService
from msgrelay.serverkey import ServerKeyring
from msgrelay.settings import resolve
from msgrelay.store.maildir import MaildirStore
from relayproc import KEYS


def test_a_relay_builds_without_sockets_key_files_or_the_outbox_lock(tmp_path):
    settings = resolve({"federation.mode": "open", "pools.store": 3},
                       {"server.state_dir": str(tmp_path / "state"), "server.name": "relay.test"})
    keyring = ServerKeyring(load_pem_private_key((KEYS / "server-0.pem").read_bytes(), None))
    clock = task.Clock()
    store = MaildirStore(tmp_path / "store", clock, threadpool=ThreadPool(0, 1))
    first = build_relay(settings, clock, store=store, keyring=keyring)
    second = build_relay(settings, clock, store=store, keyring=keyring)  # no lock was taken
    assert not settings.key_path().exists()  # the given keyring: no key file read or made
    assert first.core.forwarder is first.federation and first.core.message_observers == [first.push]
    assert first.core.keyring is keyring and first.core.store is store and first.core.clock is clock
    assert first.api.limits is first.limits and first.site.routes[b"/metrics"] is not None
    assert first.pools.store.max == 3 and first.pools.store.name == "msgrelay-store"
    assert set(first.pools.loads()) == {"store", "outbox", "crypto"}
    assert first.core in first.reconfigurables and first.site in first.reconfigurables
    assert first.federation is not second.federation
    assert first.service.pools.pools is first.pools  # started first, stopped last (PartsService)


def test_a_reload_reaches_the_parts_that_read_the_changed_sections(tmp_path):
    settings = resolve({}, {"server.state_dir": str(tmp_path / "state"), "server.name": "relay.test"})
    keyring = ServerKeyring(load_pem_private_key((KEYS / "server-0.pem").read_bytes(), None))
    clock = task.Clock()
    relay = build_relay(settings, clock, store=MaildirStore(tmp_path / "store", clock, threadpool=ThreadPool(0, 1)),
                        keyring=keyring)
    new = resolve({"limits.max_body_bytes": 4096, "rate_limits.send_per_address": "1/60"},
                  {"server.state_dir": str(tmp_path / "state"), "server.name": "relay.test"})
    reloader = ReloadService(settings, lambda: new, clock, listeners=relay.reconfigurables)
    assert reloader.reload() == (["limits.max_body_bytes", "rate_limits.send_per_address"], [])
    assert relay.site.settings.limits.max_body_bytes == 4096
    assert relay.core.settings.limits.max_body_bytes == 4096
    assert relay.limits.settings.rate_limits.send_per_address == "1/60"
    assert relay.store_stats.settings is settings  # metrics did not change: not told
