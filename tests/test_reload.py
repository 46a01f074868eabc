"""Config reload on SIGHUP: reloadable settings change in place, others are logged as needing a
restart, a bad file changes nothing, and open connections are never dropped."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from contextlib import contextmanager

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.logger import formatEvent, globalLogPublisher

from apiclient import request
from msgrelay.reload import ReloadService
from msgrelay.settings import read_toml, resolve
from relayproc import RelayProcess

ensure = pytest_twisted.ensureDeferred


@contextmanager
def captured_log():
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def messages(events) -> str:
    return "\n".join(formatEvent(e) for e in events)


# -- units -----------------------------------------------------------------------


def test_reload_builds_new_settings_and_names_what_needs_a_restart():
    running = resolve({}, {"server.name": "relay.test"})
    new = resolve({
        "limits.max_body_bytes": 4096,
        "rate_limits.send_per_address": "5/60",
        "registration.mode": "token",
        "registration.tokens": ["very-secret"],
        "log.level": "warn",
        "store.expire_interval": 5,
        "log.format": "json",
    }, {"server.name": "relay.test"})
    with captured_log() as events:
        reload = running.reload_to(new)
    assert set(reload.applied) == {"limits.max_body_bytes", "rate_limits.send_per_address", "registration.mode",
                                   "registration.tokens", "log.level"}
    assert set(reload.needs_restart) == {"store.expire_interval", "log.format"}
    assert reload.sections == {"limits", "rate_limits", "registration", "log"}
    assert reload.old is running and running.limits.max_body_bytes == 1048576  # frozen: never changed
    after = reload.running
    assert after.limits.max_body_bytes == 4096 and after.values["limits.max_body_bytes"] == 4096
    assert after.registration.mode == "token" and after.log.level == "warn"
    assert after.store.expire_interval == 60 and after.log.format == "text"  # kept until a restart
    with pytest.raises(AttributeError):
        after.limits.max_body_bytes = 1  # type: ignore[misc]
    text = messages(events)
    assert "limits.max_body_bytes changed from 1048576 to 4096" in text
    assert "store.expire_interval changed in the configuration (60 to 5) but needs a restart" in text
    assert "log.format changed" in text and "needs a restart" in text
    assert "very-secret" not in text and "registration.tokens changed from (hidden) to (hidden)" in text
    again = after.reload_to(new)
    assert again.applied == () and again.needs_restart == ("store.expire_interval", "log.format")


def test_each_component_is_told_of_the_sections_it_reads():
    from msgrelay.settings import EVERY_RELOAD

    class Listener:
        def __init__(self, sections):
            self.settings_sections = sections
            self.told = []

        def reconfigure(self, reload):
            self.told.append(reload.running)

    overrides = {"server.name": "relay.test"}
    values = {}
    limits, timeouts, every = Listener(frozenset({"limits"})), Listener(frozenset({"timeouts"})), Listener(EVERY_RELOAD)
    service = ReloadService(resolve({}, overrides), lambda: resolve(dict(values), overrides), reactor,
                            listeners=[limits, timeouts, every])
    values["limits.max_ttl"] = values["limits.default_ttl"] = 100
    assert service.reload() == (["limits.default_ttl", "limits.max_ttl"], [])
    assert [s.limits.max_ttl for s in limits.told] == [100] and timeouts.told == []
    assert every.told == [service.settings]
    assert service.reload() == ([], [])  # nothing changed: only EVERY_RELOAD listeners hear of it
    assert len(limits.told) == 1 and len(every.told) == 2


def test_a_bad_file_changes_nothing(tmp_path):
    config = tmp_path / "relay.toml"
    config.write_text('[limits]\nmax_body_bytes = 2048\n')
    overrides = {"server.name": "relay.test"}

    def load():
        return resolve(read_toml(str(config)), overrides)

    running = load()
    service = ReloadService(running, load, reactor, source=str(config))
    config.write_text('[limits]\nmax_body_bytes = 4096\nmax_ttl = -1\n')
    with captured_log() as events:
        assert service.reload() is None
    assert service.settings is running
    assert "reload refused, the running configuration is unchanged: limits.max_ttl" in messages(events)
    config.write_text("[limits\n")
    assert service.reload() is None
    config.write_text('[limits]\nmax_body_bytes = 4096\n')
    assert service.reload() == (["limits.max_body_bytes"], [])
    assert service.settings.limits.max_body_bytes == 4096


@ensure
async def test_sighup_in_process_changes_the_body_limit(start_relay, users, tmp_path):
    config = tmp_path / "relay.toml"
    config.write_text("[limits]\nmax_body_bytes = 100\n")
    relay = await start_relay("--config", str(config))
    assert (await relay.client.register(users[0])).errno == 140  # a PEM key is over 100 bytes
    config.write_text("[limits]\nmax_body_bytes = 100000\n")
    os.kill(os.getpid(), signal.SIGHUP)
    for _ in range(50):
        if relay.core.settings.limits.max_body_bytes == 100000:
            break
        await task.deferLater(reactor, 0.02, lambda: None)
    assert (await relay.client.register(users[0])).status == 200
    info = await request("GET", relay.url + "/api/v1/server")
    assert info.body["max_body_bytes"] == 100000


# -- the real twistd process -----------------------------------------------------


class KeepAlive:
    """One HTTP/1.1 connection, used for several requests; never reconnects."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.local = self.sock.getsockname()

    def call(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict, bytes]:
        head = (f"{method} {path} HTTP/1.1\r\nHost: relay.test\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.sock.sendall(head + body)
        status_line = self.file.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        headers = {}
        while True:
            line = self.file.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        content = self.file.read(int(headers.get("content-length", "0")))
        assert headers.get("connection", "").lower() != "close"
        return int(status_line.split()[1]), headers, content

    def close(self):
        self.file.close()
        self.sock.close()


def wait_for(relay: RelayProcess, text: str, count: int = 1, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = relay.log()
        if log.count(text) >= count:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged {count} time(s):\n{relay.log()}")


@pytest.mark.slow
def test_sighup_changes_a_limit_without_dropping_a_connection(tmp_path, users):
    config = tmp_path / "relay.toml"
    config.write_text('[store]\nexpire_interval = 60\n[rate_limits]\nregister_per_address = "1/3600"\n')
    relay = RelayProcess(tmp_path / "state", extra_args=["--config", str(config)]).start()
    try:
        conn = KeepAlive(relay.port)
        register = [json.dumps({"key": u.pem}).encode() for u in users]
        assert conn.call("POST", "/api/v1/user", register[0])[0] == 200
        status, headers, body = conn.call("POST", "/api/v1/user", register[1])
        assert status == 429 and json.loads(body)["errno"] == 150 and "retry-after" in headers

        config.write_text('[store]\nexpire_interval = 5\n[rate_limits]\nregister_per_address = "100/3600"\n'
                          '[log]\nlevel = "warn"\n')
        relay.proc.send_signal(signal.SIGHUP)
        log = wait_for(relay, "reload done")  # logged whatever log.level says

        # The same connection, never closed: the new limit applies to it at once.
        assert conn.sock.getsockname() == conn.local
        assert conn.call("POST", "/api/v1/user", register[1])[0] == 200
        assert conn.call("POST", "/api/v1/user", register[2])[0] == 200
        assert "rate_limits.register_per_address changed from '1/3600' to '100/3600'" in log
        assert "store.expire_interval changed in the configuration (60 to 5) but needs a restart" in log
        assert "log.level changed from 'info' to 'warn'" in log

        # A broken file is refused; the relay and the connection carry on as they were.
        config.write_text("[rate_limits\n")
        relay.proc.send_signal(signal.SIGHUP)
        log = wait_for(relay, "reload refused")
        assert conn.call("GET", "/api/v1/server")[0] == 200
        conn.close()
    finally:
        relay.stop()
    log = relay.log()
    # log.level = "warn" took effect: no access-log line after the reload.
    after = log.split("reload done", 1)[1]
    assert "POST /api/v1/user 200" not in after and "GET /api/v1/server 200" not in after
    assert log.count("POST /api/v1/user 200") == 1
    assert "Traceback" not in log


def test_operations_doc_lists_every_setting_with_its_default_and_reload_behaviour():
    """docs/operations.md's table matches the settings table: add a row with each new setting."""
    from pathlib import Path

    from msgrelay.settings import SETTINGS

    doc = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    rows = {}
    for line in doc.split("## Every setting and whether SIGHUP reloads it", 1)[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    assert set(rows) == {s.name for s in SETTINGS}, "docs/operations.md: rows missing or extra"
    for setting in SETTINGS:
        default, reload = rows[setting.name]
        assert reload == ("yes" if setting.reloadable else "restart"), setting.name
        if setting.name != "server.name":
            assert default == f"`{json.dumps(setting.default)}`", setting.name
