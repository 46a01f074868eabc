"""The installed `twistd msgrelay`, run as an operator runs it: a subprocess on a real port."""

from __future__ import annotations

import socket
import stat
import subprocess

import pytest

from apiclient import SyncClient, sync_request
from relayproc import RelayProcess, free_port, twistd_path

pytestmark = pytest.mark.slow


def test_plugin_is_listed_by_twistd(tmp_path):
    result = subprocess.run([twistd_path(), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0
    assert "msgrelay" in result.stdout


def test_full_cycle_against_the_real_process(tmp_path, users):
    relay = RelayProcess(tmp_path / "state").start()
    try:
        client = SyncClient.connect(relay.url)
        alice = users[0]
        assert client.call("POST", "/api/v1/user", {"key": alice.pem}).body == {"user_id": alice.user_id}
        token = client.mint(alice, label="a friend")
        sent = client.call("POST", "/api/v1/message", client.packet_envelope(alice, token, body=b'{"t":"hello"}'))
        assert sent.status == 200
        _, messages = client.fetch(alice)
        assert [m["id"] for m in messages] == [sent.body["message_id"]]
        ack = client.signed(alice, "DELETE", "/api/v1/message", ids=[messages[0]["id"]])
        assert ack.body == {"deleted": 1}
        assert client.fetch(alice)[1] == []
        assert client.signed(alice, "DELETE", "/api/v1/token", token=token).body == {"revoked": 1}
        refused = client.call("POST", "/api/v1/message", client.packet_envelope(alice, token))
        assert refused.errno == 120
        assert client.signed(alice, "DELETE", "/api/v1/user").body == {}
        assert client.call("GET", f"/api/v1/user/{alice.user_id}").errno == 130
    finally:
        assert relay.stop() in (0, -15)  # twistd re-raises SIGTERM after a clean shutdown
    log = relay.log()
    assert "Traceback" not in log
    assert "POST /api/v1/message 200" in log and "POST /api/v1/message 403 errno=120" in log
    assert "GET /api/v1/message 200" in log
    assert token not in log and "signature=" not in log and "BEGIN PUBLIC KEY" not in log


def test_server_key_is_created_0600_and_reused(tmp_path):
    relay = RelayProcess(tmp_path / "state", seed_key=False).start()
    first = sync_request("GET", relay.url + "/api/v1/server").body["fingerprint"]
    relay.stop()
    key_file = tmp_path / "state" / "server_key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    relay = RelayProcess(tmp_path / "state").start()
    try:
        assert sync_request("GET", relay.url + "/api/v1/server").body["fingerprint"] == first
    finally:
        relay.stop()


def run_twistd(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [twistd_path(), "--nodaemon", "--pidfile=", "msgrelay", *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )


@pytest.mark.parametrize("args, named", [
    (["--bogus"], "bogus"),
    (["--listen", "nonsense:1"], "--listen"),
    (["--server-name", "bad name!"], "server.name"),
])
def test_bad_options_stop_with_one_line(tmp_path, args, named):
    result = run_twistd(tmp_path, "--state-dir", str(tmp_path / "s"), *args)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0
    assert len(output.splitlines()) == 1, output
    assert named in output and "Traceback" not in output


def test_bad_config_value_stops_with_one_line(tmp_path):
    config = tmp_path / "msgrelay.toml"
    config.write_text("[limits]\nmax_ttl = -5\n")
    result = run_twistd(tmp_path, "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == "msgrelay: limits.max_ttl: must be a positive integer"


def test_port_in_use_stops_with_one_line(tmp_path):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = run_twistd(tmp_path, "--state-dir", str(tmp_path / "s"), "--listen", f"tcp:{port}:interface=127.0.0.1")
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 1
    assert "cannot listen on" in output and "Traceback" not in output, output


def test_https_listener(tmp_path, users):
    from tlsfiles import make_ca_and_server_cert
    ca_pem, key_path, cert_path = make_ca_and_server_cert(tmp_path, "localhost")
    port = free_port()
    relay = RelayProcess(
        tmp_path / "state", port=port, scheme="https",
        listen=f"ssl:{port}:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}",
    ).start()
    try:
        import ssl
        import urllib.request
        context = ssl.create_default_context(cadata=ca_pem.decode())
        with urllib.request.urlopen(f"https://localhost:{port}/api/v1/server", context=context, timeout=10) as r:
            assert r.status == 200
        # A client offering ALPN, as browsers and curl do, agrees on HTTP/1.1.
        context.set_alpn_protocols(["h2", "http/1.1"])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.selected_alpn_protocol() == "http/1.1"
                tls.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                assert tls.recv(64).startswith(b"HTTP/1.1 200 ")
    finally:
        relay.stop()
