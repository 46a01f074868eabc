"""Issue 11, "what a first try ran into": one test (or a few) per numbered item.

Items 3 and 7 (the federation example and the walkthrough, run verbatim) are in
test_docs_verbatim.py; key rotation is in test_key_transitions_e2e.py.
"""

from __future__ import annotations

import http.server
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from importlib.metadata import metadata
from pathlib import Path

import pytest

from apiclient import SyncClient, sync_request
from relayproc import RelayProcess, free_port, interruptible
from test_client_e2e import CLIENT, Person, start_relay

REPO = Path(__file__).resolve().parents[1]
ADMIN = str(Path(sys.executable).with_name("msgrelay-admin"))
DOCS = [REPO / "README.md", REPO / "etc" / "msgrelay.toml", *sorted((REPO / "docs").glob("*.md"))]


def options(*argv: str):
    from msgrelay.service import Options

    parsed = Options()
    parsed.parseOptions(list(argv))
    return parsed


# 1. LICENSE, CHANGELOG, SECURITY ---------------------------------------------------------------

def test_licence_changelog_and_security_policy():
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert "## [Unreleased]" in (REPO / "CHANGELOG.md").read_text()
    assert "Reporting a vulnerability" in (REPO / "SECURITY.md").read_text()
    installed = metadata("msgrelay")
    assert installed["License"] == "MIT"
    assert "License :: OSI Approved :: MIT License" in installed.get_all("Classifier")


# 2. Python version ---------------------------------------------------------------------------

def test_setup_stops_at_once_on_an_older_python():
    """setup.py refuses before importing setuptools (so before pip builds or downloads anything)."""
    probe = ("import sys; sys.version_info = (3, 10, 12, 'final', 0); sys.version = '3.10.12 (main)'\n"
             "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__name__': '__main__'})")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == ("msgrelay needs Python 3.11 or newer; this is Python 3.10.12 "
                                   "(make the venv with e.g. python3.11 -m venv .venv)")
    assert "version 3.11 or newer" in (REPO / "README.md").read_text()


# 4. --peer without a mode; --federation -------------------------------------------------------

def test_peer_without_a_mode_means_allowlist_and_the_federation_flag_decides():
    peer = "b.test=https://b.test"
    assert options("--server-name", "a.test", "--peer", peer).settings.federation.mode == "allowlist"
    assert options("--server-name", "a.test", "--peer", peer, "--federation", "off").settings.federation.mode == "off"
    assert options("--server-name", "a.test", "--federation", "open").settings.federation.mode == "open"
    assert options("--server-name", "a.test").settings.federation.mode == "off"
    with pytest.raises(SystemExit) as exit_info:
        options("--federation", "sometimes")
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_sending_to_a_peer_given_only_with_peer_is_queued_not_refused(tmp_path, users):
    dead = free_port()
    relay = RelayProcess(tmp_path / "a", "a.test", extra_args=["--peer", f"b.test=http://127.0.0.1:{dead}"]).start()
    try:
        client = SyncClient.connect(relay.url)
        envelope = client.packet_envelope(users[0], "t" * 22, user_id=f"{users[0].user_id}@b.test")
        answer = client.call("POST", "/api/v1/message", envelope)
        assert answer.status == 200, answer.body  # queued for b.test; before: 403 errno 122 "federation is off"
    finally:
        relay.stop()


# 5. msgrelay-admin with peers from --peer ----------------------------------------------------

@pytest.mark.slow
def test_admin_reads_what_the_relay_was_started_with(tmp_path):
    from msgrelay.admin.context import AdminContext

    config = tmp_path / "a.toml"
    config.write_text('[federation]\nmode = "allowlist"\n')
    peer = f"b.test=http://127.0.0.1:{free_port()}"
    relay = RelayProcess(tmp_path / "a", "a.test", extra_args=["--config", str(config), "--peer", peer]).start()
    relay.stop()
    admin = AdminContext()
    admin.config, admin.state_dir = str(config), str(tmp_path / "a")
    assert admin.settings.federation.peers == (peer,) and admin.settings.server.name == "a.test"
    listed = subprocess.run([ADMIN, "--config", str(config), "--state-dir", str(tmp_path / "a"), "queue", "list"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    # With nothing recorded, a setting only the command line could give is explained.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    bad = tmp_path / "bad.toml"
    bad.write_text('[federation]\nmode = "sometimes"\n')
    refused = subprocess.run([ADMIN, "--config", str(bad), "--state-dir", str(fresh), "stats"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "relay-options.json" in refused.stderr and "found none" in refused.stderr


# 6, 11, 12: the client -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    process = start_relay(tmp_path_factory.mktemp("relay") / "state")
    yield process
    process.stop()


@pytest.mark.slow
def test_contact_on_another_relay_names_relay_url(tmp_path, relay):
    alice = Person(tmp_path / "config", "alice").init(relay.url)
    invite = f"msgrelay:{'a' * 32}@localhost:{free_port()}?token={secrets.token_urlsafe(24)}"
    failed = alice.run("contact", "add", "bob", invite, expect=3)
    assert "--relay-url URL" in failed.err and "another relay" in failed.err


@pytest.mark.slow
def test_client_errors_point_to_the_fix(tmp_path, relay):
    alice = Person(tmp_path / "config", "alice")
    # The relay answers a TLS hello only when its header timeout ends: a relay of its own, with
    # the shortest one, so the check does not wait the default 20 s.
    plain_relay = start_relay(tmp_path / "plain", config_text="\n[timeouts]\nheaders = 1\n")
    try:
        port = plain_relay.url.rsplit(":", 1)[1]
        plain = alice.run("init", "--server", f"127.0.0.1:{port}", expect=3)
    finally:
        plain_relay.stop()
    assert f"is this an http:// relay? It does not speak TLS: try http://127.0.0.1:{port}" in plain.err

    with socket.socket() as hangs_up:  # a server that accepts and closes: not HTTP at all
        hangs_up.bind(("127.0.0.1", 0))
        hangs_up.listen()
        closer = threading.Thread(target=lambda: [hangs_up.accept()[0].close() for _ in range(1)], daemon=True)
        closer.start()
        closed = alice.run("init", "--server", f"http://127.0.0.1:{hangs_up.getsockname()[1]}", expect=3)
    assert "without an HTTP answer: is it a msgrelay relay?" in closed.err

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        other = alice.run("init", "--server", f"http://127.0.0.1:{web.server_address[1]}", expect=3)
    finally:
        web.shutdown()
    assert "HTTP 404" in other.err and "not a msgrelay relay" in other.err

    misplaced = alice.run("init", "--profile", "alice", "--server", relay.url, expect=2)
    assert "--profile is an option of msgrelay-client itself: put it before the command" in misplaced.err

    alice.init(relay.url)
    again = alice.run("init", "--server", relay.url, expect=2)
    assert "already exists" in again.err and "--profile NEW-NAME init" in again.err and "set-server URL" in again.err


@pytest.mark.slow
def test_fetch_watch_says_once_that_it_polls(tmp_path, relay):
    alice = Person(tmp_path / "config", "alice").init(relay.url)
    polls = lambda: relay.log().count("GET /api/v1/message ")  # noqa: E731
    before = polls()
    watch = subprocess.Popen([CLIENT, "--profile", "alice", "fetch", "--watch", "--interval", "0.2",
                              "--max-interval", "0.2"], env=alice.env, stderr=subprocess.PIPE,
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                             preexec_fn=interruptible)
    try:
        first = watch.stderr.readline()
        assert first.startswith(f"watching for new messages: polling {relay.url} every 0.2 s") and "Ctrl-C" in first
        deadline = time.monotonic() + 30  # several polls, then Ctrl-C (the reactor handles it by then)
        while polls() < before + 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert polls() >= before + 3
    finally:
        watch.send_signal(signal.SIGINT)
        code = watch.wait(30)
    rest = watch.stderr.read()
    assert code == 0 and "watching" not in rest and "Traceback" not in rest


@pytest.mark.slow
def test_set_server_moves_a_profile_to_another_url_of_the_same_relay(tmp_path):
    first, second = free_port(), free_port()
    relay = RelayProcess(tmp_path / "state", "relay.test", port=first,
                         extra_args=["--listen", f"tcp:{second}:interface=127.0.0.1"]).start()
    other = start_relay(tmp_path / "other", seed_key=False)  # same name, another key (made at start)
    try:
        alice = Person(tmp_path / "config", "alice").init(relay.url)
        moved = alice.run("set-server", f"http://127.0.0.1:{second}")
        assert f"relay URL of profile alice: http://127.0.0.1:{second} (was {relay.url})" in moved.out
        assert alice.info["server_url"] == f"http://127.0.0.1:{second}"
        alice.run("fetch")
        refused = alice.run("set-server", other.url, expect=5)
        assert "THE RELAY'S KEY HAS CHANGED" in refused.err
        assert alice.info["server_url"] == f"http://127.0.0.1:{second}"
    finally:
        relay.stop()
        other.stop()


# 8. no -n short flag -------------------------------------------------------------------------

def test_server_name_has_no_short_flag():
    with pytest.raises(SystemExit) as exit_info:
        options("-n", "relay.example.org")
    assert exit_info.value.code == 2
    assert options("--server-name", "relay.example.org").settings.server.name == "relay.example.org"
    readme = (REPO / "README.md").read_text()
    assert "**daemonises**" in readme and "`twistd.log`" in readme and "`twistd.pid`" in readme


# 9. listener examples --------------------------------------------------------------------------

def test_every_listener_example_names_its_interface():
    endpoints = []
    for path in DOCS:
        endpoints += [(path.name, e) for e in re.findall(r"\b(?:tcp|ssl):\d+[^\s`\"')]*", path.read_text())]
    assert any(e.startswith("ssl:") for _, e in endpoints)
    assert [(name, e) for name, e in endpoints if "interface=" not in e] == []


# 10. the example config is installed ---------------------------------------------------------

def test_admin_config_example_prints_the_shipped_config(tmp_path):
    done = subprocess.run([ADMIN, "config", "example"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout == (REPO / "etc" / "msgrelay.toml").read_text()
    from msgrelay.service import Options

    assert "msgrelay-admin config example" in str(Options.optParameters)


# 13. small things ------------------------------------------------------------------------------

@pytest.mark.slow
def test_access_log_startup_lines_and_errors_page(tmp_path):
    relay = RelayProcess(tmp_path / "state").start()
    try:
        sync_request("GET", relay.url + "/api/v1/server")
        assert sync_request("GET", relay.url + "/api/v1/nothing").status == 404
        with urllib.request.urlopen(relay.url + "/errors") as page:
            assert page.headers["Content-Type"] == "text/html; charset=utf-8"
            html = page.read().decode()
        assert '<h2 id="errno-132">' in html and '<h2 id="errno-999">' in html and "<code>" in html
        with urllib.request.urlopen(relay.url + "/errors.md") as page:
            assert page.headers["Content-Type"] == "text/markdown; charset=utf-8"
            assert '<a id="errno-132"></a>' in page.read().decode()
        request = urllib.request.Request(relay.url + "/errors", headers={"Accept": "text/markdown"})
        with urllib.request.urlopen(request) as page:
            assert page.headers["Content-Type"].startswith("text/markdown")
    finally:
        relay.stop()
    log = relay.log()
    assert "GET /api/v1/server 200 " in log and "GET /api/v1/nothing 404 errno=132 " in log
    assert "errno=None" not in log and "Starting factory" not in log


@pytest.mark.slow
def test_a_start_that_fails_on_a_taken_port_leaves_no_server_key(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="exited with 1") as failed:
            RelayProcess(tmp_path / "state", port=port, seed_key=False).start()
    assert "cannot listen on" in str(failed.value)
    assert not (tmp_path / "state" / "server_key.pem").exists()


def test_readme_layout_describes_docs_and_completion_is_documented():
    readme = (REPO / "README.md").read_text()
    docs_row = next(line for line in readme.splitlines() if line.startswith("| `docs/` |"))
    for name in ("protocol.md", "walkthrough.md", "client.md", "admin.md", "federation.md", "operations.md"):
        assert name in docs_row
    for text in (readme, (REPO / "docs" / "client.md").read_text()):
        assert "_MSGRELAY_CLIENT_COMPLETE=bash_source msgrelay-client" in text
    completion = subprocess.run([CLIENT], env={"_MSGRELAY_CLIENT_COMPLETE": "bash_source", "PATH": "/usr/bin:/bin"},
                                capture_output=True, text=True, timeout=60)
    assert "complete -o nosort -F" in completion.stdout
