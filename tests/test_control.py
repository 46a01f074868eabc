"""The control channel between msgrelay-admin and a running relay, over its real UNIX socket:
an in-process service tree (makeService), and `msgrelay-admin` against `twistd msgrelay`,
running and stopped."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from apiclient import sync_request
from msgrelay.control import control_socket_path
from msgrelay.control.client import ControlClient, ControlUnavailable
from msgrelay.federation.queue import QueueState
from msgrelay.keyrotation import rotate
from msgrelay.settings import resolve
from relayproc import RelayProcess
from test_federation import listen_fake, close_fakes  # noqa: F401  (fixture)
from test_federation_fakes import FakePeer, config_file, eventually, logs, peer_key  # noqa: F401 (fixture)

ensure = pytest_twisted.ensureDeferred
ADMIN = str(Path(sys.executable).with_name("msgrelay-admin"))


def admin(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([ADMIN, *args], capture_output=True, text=True, timeout=120)


def call(relay, method: str, route: str):
    """A blocking control call, in a thread: the relay answers on this very reactor."""
    return deferToThread(ControlClient(relay.state_dir).call, method, route)


@ensure
async def test_socket_is_private_and_answers(start_relay):
    relay = await start_relay()
    path = control_socket_path(relay.state_dir)
    await eventually(lambda: path.exists())
    assert stat.S_ISSOCK(os.lstat(path).st_mode) and stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(path.parent).st_mode) == 0o700
    status = await call(relay, "GET", "/v1/status")
    assert status["pid"] == os.getpid() and status["server_name"] == "relay.test"
    with pytest.raises(ControlUnavailable, match="404"):
        await call(relay, "GET", "/v1/nothing")
    await relay.stop()
    assert not path.exists()


@ensure
async def test_retry_now_and_live_queues(start_relay, users, tmp_path):
    fake = FakePeer("b.test", peer_key(0))
    fake.script = [(503, {"errno": 180}, {})]
    config = config_file(tmp_path / "a.toml", '[federation]\nmode = "allowlist"\nbackoff_min = 600\n'
                                              'backoff_max = 600\n')
    a = await start_relay("--server-name", "a.test", "--config", config,
                          "--peer", f"b.test=http://127.0.0.1:{listen_fake(fake)}")
    bob = users[1]
    sent = await a.client.send(bob, "tok", user_id=f"{bob.user_id}@b.test")
    assert sent.status == 200
    queue = a.service.federation.queues["b.test"]
    await eventually(lambda: queue.state is QueueState.BACKING_OFF)
    live = await call(a, "GET", "/v1/queues")
    row = live["destinations"]["b.test"]
    assert (row["state"], row["queued"], row["failures"]) == ("backing-off", 1, 1)
    assert "HTTP 503" in row["last_error"] and row["next_attempt"] > time.time() + 200
    answer = await call(a, "POST", "/v1/queues/b.test/retry")
    assert answer == {"destination": "b.test", "retrying": True, "queued": 1}
    await eventually(lambda: len(fake.received) == 1)
    await eventually(lambda: queue.state is QueueState.IDLE and not queue.entries)
    assert (await call(a, "POST", "/v1/queues/b.test/retry"))["retrying"] is False
    other = await call(a, "POST", "/v1/queues/C.test%3A8443/retry")  # as msgrelay-admin quotes it
    assert other == {"destination": "c.test:8443", "retrying": False, "queued": 0}


@ensure
async def test_key_reload_takes_effect_at_once(start_relay, tmp_path):
    config = config_file(tmp_path / "slow.toml", "[server]\nkey_check_interval = 3600\n")
    relay = await start_relay("--config", config)
    before = relay.core.keyring.fingerprint
    settings = resolve({}, {"server.state_dir": str(relay.state_dir), "server.name": "relay.test"})
    done = rotate(settings, 600, time.time())
    assert relay.core.keyring.fingerprint == before  # the timer is an hour away
    answer = await call(relay, "POST", "/v1/keys/reload")
    assert answer == {"changed": True, "fingerprint": done.new_fingerprint}
    assert relay.core.keyring.fingerprint == done.new_fingerprint


@ensure
async def test_an_open_run_directory_is_refused(tmp_path, start_relay, logs):
    state = tmp_path / "state"
    (state / "run").mkdir(parents=True)
    os.chmod(state / "run", 0o755)
    relay = await start_relay(state_dir=state)
    line = await eventually(lambda: next((x for x in logs() if "control socket not available" in x), None))
    assert "mode 0755; it must be 0700" in line
    assert not control_socket_path(state).exists()
    assert (await relay.client.call("GET", "/api/v1/health")).status == 200


@ensure
async def test_a_state_dir_too_long_for_a_socket_name_still_runs(tmp_path, start_relay, logs):
    state = tmp_path / ("d" * 120) / "state"
    relay = await start_relay(state_dir=state)
    line = await eventually(lambda: next((x for x in logs() if "control socket" in x and "not available" in x), None))
    assert str(control_socket_path(state)) in line
    assert (await relay.client.call("GET", "/api/v1/health")).status == 200
    with pytest.raises(ControlUnavailable):
        await call(relay, "GET", "/v1/status")
    listed = await deferToThread(admin, "queue", "list", "--state-dir", str(state))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("relay running, but its control socket does not answer")


@pytest.mark.skipif(os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK),
                    reason="needs root (to act as another user) and /usr/bin/python3")
@ensure
async def test_another_user_cannot_connect(start_relay):
    """Only the run/ folder (0700) and the socket (0600) keep another local user out."""
    open_dir = Path(tempfile.mkdtemp(prefix="msgrelay-control-"))
    try:
        os.chmod(open_dir, 0o755)
        relay = await start_relay(state_dir=open_dir / "state")
        os.chmod(relay.state_dir, 0o755)
        path = control_socket_path(relay.state_dir)
        await eventually(lambda: path.exists())
        probe = ("import os,socket,sys; os.listdir(sys.argv[2]); s=socket.socket(socket.AF_UNIX)\n"
                 "try: s.connect(sys.argv[1])\nexcept PermissionError: sys.exit(3)\n")
        result = await deferToThread(subprocess.run, ["/usr/bin/python3", "-c", probe, str(path),
                                                      str(relay.state_dir)],
                                     user=65534, group=65534, capture_output=True, timeout=60)
        assert result.returncode == 3, result.stderr
        await relay.stop()
    finally:
        shutil.rmtree(open_dir)


@pytest.mark.slow
def test_admin_against_twistd_running_then_stopped(tmp_path):
    """rotate-key and queue list talk to a running `twistd msgrelay`; on a stopped one they say so."""
    config = tmp_path / "relay.toml"
    config.write_text("[server]\nkey_check_interval = 3600\n"
                      '[federation]\nmode = "open"\nbackoff_min = 600\nbackoff_max = 600\n')
    state = tmp_path / "state"
    relay = RelayProcess(state, "a.test", extra_args=["--config", str(config)]).start()
    try:
        before = sync_request("GET", relay.url + "/api/v1/server").body["fingerprint"]
        rotated = admin("rotate-key", "--config", str(config), "--state-dir", str(state), "--json")
        assert rotated.returncode == 0, rotated.stderr
        result = json.loads(rotated.stdout)
        assert result["told"] is True and result["relay_fingerprint"] == result["fingerprint"] != before
        # No waiting: the relay already serves the new key (its own check is an hour away).
        assert sync_request("GET", relay.url + "/api/v1/server").body["fingerprint"] == result["fingerprint"]
        listed = admin("queue", "list", "--state-dir", str(state))
        assert listed.returncode == 0 and "live state from its control socket" in listed.stdout, listed.stderr
        data = json.loads(admin("queue", "list", "--state-dir", str(state), "--json").stdout)
        assert (data["running"], data["source"], data["pid"]) == (True, "control-socket", relay.proc.pid)
    finally:
        relay.stop()
    assert not control_socket_path(state).exists()
    stopped = admin("rotate-key", "--config", str(config), "--state-dir", str(state))
    assert stopped.returncode == 0 and "relay not running: it uses these keys when it starts" in stopped.stdout
    data = json.loads(admin("queue", "list", "--state-dir", str(state), "--json").stdout)
    assert (data["running"], data["source"]) == (False, "files")
    assert "relay not running: read from the outbox files" in admin("queue", "list", "-d", str(state)).stdout
