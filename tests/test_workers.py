"""`twistd msgrelay --workers 2` on PostgreSQL: two relay processes on one listening port.

Both workers accept from the one socket the parent bound. A worker stopped with SIGSTOP
does not call accept, so stopping one of them routes every new connection to the other:
that is how a test reaches a chosen worker through the shared port.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, cast

import pytest
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from apiclient import SyncClient, sync_request
from relayproc import RelayProcess, free_port, twistd_path
from test_postgres_relay import database  # noqa: F401  (the fixture: a fresh database per test)
from test_systemd import tool

from msgrelay.workers import (RESTART_FIRST, RESTART_MOST, RESTART_RESET, STOP_GRACE, BoundListener,
                              WorkerRole, WorkerSupervisor)

pytestmark = pytest.mark.slow

STARTED = re.compile(r"worker (\d+) started, pid (\d+)")


def wait_for(condition: Callable[[], object], what: str, timeout: float = 30.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def worker_pids(log: str) -> dict[int, int]:
    """The newest pid of each worker, from the parent's log."""
    pids: dict[int, int] = {}
    for index, pid in STARTED.findall(log):
        pids[int(index)] = int(pid)
    return pids


def serving(relay: RelayProcess, pid: int) -> bool:
    """Whether worker `pid` has adopted the inherited socket (its log line came through, as
    text or as JSON)."""
    return any("(inherited socket" in line and (f"pid {pid}: " in line or f'"worker_pid":{pid},' in line)
               for line in relay.log().splitlines())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def config_file(tmp_path: Path, dsn: str, extra: str = "") -> Path:
    path = tmp_path / "msgrelay.toml"
    # Federation on: every worker runs the sender on the outbox they share in PostgreSQL.
    path.write_text(f'[store]\nbackend = "postgresql"\npostgres_dsn = "{dsn}"\n'
                    f'[federation]\nmode = "open"\n{extra}')
    return path


def start_workers(tmp_path: Path, dsn: str, extra: str = "", **relay: Any) -> tuple[RelayProcess, dict[int, int]]:
    process = RelayProcess(tmp_path / "state", extra_args=["--config", str(config_file(tmp_path, dsn, extra)),
                                                           "--workers", "2"], **relay).start()
    try:
        return process, wait_for_workers(process)
    except BaseException:
        process.stop()  # the parent stops its workers: nothing is left running after a failure
        raise


def wait_for_workers(relay: RelayProcess) -> dict[int, int]:
    pids = wait_for(lambda: len(worker_pids(relay.log())) == 2 and worker_pids(relay.log()), "two workers")
    assert isinstance(pids, dict)
    for pid in pids.values():
        wait_for(partial(serving, relay, pid), f"worker {pid} to listen")
    return pids


class Only:
    """Let only worker `pid` accept: every other worker is stopped (SIGSTOP) meanwhile."""

    def __init__(self, pids: dict[int, int], pid: int):
        self.others = [p for p in pids.values() if p != pid]

    def __enter__(self) -> None:
        for other in self.others:
            os.kill(other, signal.SIGSTOP)

    def __exit__(self, *exc: object) -> None:
        for other in self.others:
            os.kill(other, signal.SIGCONT)


def test_two_workers_serve_one_port_and_share_the_store(tmp_path, users, database):  # noqa: F811
    metrics_port = free_port()
    relay, pids = start_workers(tmp_path, database, f'[metrics]\nlisten = ["tcp:{metrics_port}:interface=127.0.0.1"]\n')
    try:
        # The dedicated metrics listener is worker 0's alone.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            assert b"msgrelay_build_info" in response.read()
        adopted = re.compile(r"worker (\d) pid \d+: .*\(metrics\) \(inherited socket\)")
        wait_for(lambda: adopted.search(relay.log()), "the metrics listener's line")
        assert adopted.findall(relay.log()) == ["0"]
        first, second = pids[0], pids[1]
        assert first != second and relay.proc is not None and relay.proc.pid not in (first, second)
        alice = users[0]
        with Only(pids, first):
            client = SyncClient.connect(relay.url)
            assert client.call("POST", "/api/v1/user", {"key": alice.pem}).status == 200
            token = client.mint(alice)
            sent = client.call("POST", "/api/v1/message", client.packet_envelope(alice, token))
            assert sent.status == 200
        with Only(pids, second):
            _, messages = SyncClient.connect(relay.url).fetch(alice)
            assert [m["id"] for m in messages] == [sent.body["message_id"]]
        # Worker log lines reach the parent's log through a pipe: wait for them.
        wait_for(lambda: re.search(rf"worker 0 pid {first}: .*POST /api/v1/message 200", relay.log()),
                 "worker 0's access line for the POST")
        wait_for(lambda: re.search(rf"worker 1 pid {second}: .*GET /api/v1/message 200", relay.log()),
                 "worker 1's access line for the GET")
        log = relay.log()
        # The parent answers nothing itself, and only worker 0 holds the control socket.
        assert log.count("control socket at") == 1 and re.search(rf"worker 0 pid {first}: .*control socket at", log)
    finally:
        code = relay.stop()
    assert code in (0, -15)
    assert not alive(pids[0]) and not alive(pids[1])
    assert "Traceback" not in relay.log()


def test_json_logs_of_workers_are_one_json_object_a_line(tmp_path, users, database):  # noqa: F811
    """Each worker writes its own JSON lines, tagged with its index and pid; the parent passes
    them on unchanged (not wrapped in a line of its own)."""
    relay, pids = start_workers(tmp_path, database, '[log]\nformat = "json"\n')
    paths = {0: "/api/v1/health", 1: "/api/v1/server"}  # one each: the access log has no query string
    try:
        for index, pid in pids.items():
            with Only(pids, pid):
                assert sync_request("GET", relay.url + paths[index]).status == 200

        def served() -> set[tuple[int, int, str, int]]:
            records = [json.loads(line) for line in relay.log().splitlines() if line.strip()]
            return {(r["worker"], r["worker_pid"], r["path"], r["status"])
                    for r in records if r["namespace"] == "msgrelay.access"}
        wanted = {(index, pid, paths[index], 200) for index, pid in pids.items()}
        wait_for(lambda: wanted <= served(), "each worker's access line, with its index and pid")
        assert all("line" not in json.loads(line) for line in relay.log().splitlines() if line.strip())
    finally:
        relay.stop()


def test_a_killed_worker_is_restarted_and_the_port_keeps_serving(tmp_path, database):  # noqa: F811
    relay, pids = start_workers(tmp_path, database)
    try:
        os.kill(pids[1], signal.SIGKILL)
        # The port keeps answering while worker 1 is down.
        for _ in range(5):
            assert sync_request("GET", relay.url + "/api/v1/health").body == {"status": "ok"}
        wait_for(lambda: f"worker 1 pid {pids[1]} exited (signal 9); starting it again" in relay.log(),
                 "the supervisor to see the death")
        new = wait_for(lambda: worker_pids(relay.log())[1] != pids[1] and worker_pids(relay.log())[1],
                       "worker 1 to be started again")
        assert isinstance(new, int) and alive(new)
        wait_for(lambda: serving(relay, new), "the new worker to listen")
        with Only({0: pids[0], 1: new}, new):
            assert sync_request("GET", relay.url + "/api/v1/health").body == {"status": "ok"}
        wait_for(lambda: re.search(rf"worker 1 pid {new}: .*GET /api/v1/health 200", relay.log()),
                 "the new worker's access line")
    finally:
        relay.stop()


def test_sighup_reaches_every_worker(tmp_path, database):  # noqa: F811
    relay, pids = start_workers(tmp_path, database)
    try:
        config_file(tmp_path, database, "[limits]\nmax_body_bytes = 500000\n")
        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGHUP)
        for index, pid in pids.items():
            done = re.compile(rf"worker {index} pid {pid}: .*reload done: 1 setting")
            wait_for(lambda: done.search(relay.log()), f"worker {index} to reload")  # noqa: B023 (called at once)
        assert "SIGHUP passed to 2 worker(s)" in relay.log()
    finally:
        relay.stop()


def test_workers_stop_when_the_parent_is_killed(tmp_path, database):  # noqa: F811
    relay, pids = start_workers(tmp_path, database)
    relay.kill()
    for pid in pids.values():
        wait_for(lambda: not alive(pid), f"worker {pid} to stop")  # noqa: B023 (called at once)


def test_workers_with_the_maildir_store_are_refused_with_one_line(tmp_path):
    result = subprocess.run([twistd_path(), "--nodaemon", "--pidfile=", "msgrelay", "--state-dir",
                             str(tmp_path / "s"), "--workers", "2"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2 and output.count("\n") == 0, output
    assert output.startswith("msgrelay: server.workers: 2 needs store.backend = 'postgresql'"), output
    assert "maildir" in output and not (tmp_path / "s").exists()


def test_two_workers_serve_one_tls_port(tmp_path, users, database):  # noqa: F811
    """Each worker does TLS itself on the socket the parent bound, with the same certificate."""
    from tlsfiles import make_ca_and_server_cert

    ca_pem, key_path, cert_path = make_ca_and_server_cert(tmp_path, "localhost")
    port = free_port()
    relay, pids = start_workers(tmp_path, database, port=port, scheme="https",
                                listen=f"ssl:{port}:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}")
    tls = ssl.create_default_context(cadata=ca_pem.decode())
    try:
        assert relay.log().count(f"ssl:{port}:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path} "
                                 "(inherited socket, TLS)") == 2
        first, second = pids[0], pids[1]
        alice = users[0]
        with Only(pids, first):
            with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
                sync_request("GET", relay.url + "/api/v1/health")  # verification is really on
            client = SyncClient.connect(relay.url, tls)
            assert client.call("POST", "/api/v1/user", {"key": alice.pem}).status == 200
            token = client.mint(alice)
            sent = client.call("POST", "/api/v1/message", client.packet_envelope(alice, token))
            assert sent.status == 200
        with Only(pids, second):
            _, messages = SyncClient.connect(relay.url, tls).fetch(alice)
            assert [m["id"] for m in messages] == [sent.body["message_id"]]
        wait_for(lambda: re.search(rf"worker 0 pid {first}: .*POST /api/v1/message 200", relay.log()),
                 "worker 0's access line for the POST")
        wait_for(lambda: re.search(rf"worker 1 pid {second}: .*GET /api/v1/message 200", relay.log()),
                 "worker 1's access line for the GET")
    finally:
        code = relay.stop()
    assert code in (0, -15)
    assert "Traceback" not in relay.log()


def test_socket_activation_with_workers(tmp_path, database):  # noqa: F811
    """The parent adopts systemd's socket; both workers inherit it from the parent."""
    activate = tool("systemd-socket-activate")
    port = free_port()
    log_path = tmp_path / "relay.log"
    command = [activate, "--listen", f"127.0.0.1:{port}", "--fdname=msgrelay.socket",
               twistd_path(), "--nodaemon", "--pidfile=", f"--logfile={log_path}", "msgrelay",
               "--config", str(config_file(tmp_path, database)), "--workers", "2",
               "--listen", "systemd:domain=INET:index=0", "--state-dir", str(tmp_path / "state"),
               "--server-name", "relay.test"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        def server() -> object:
            try:  # the first connection waits in the listen queue while the relay starts
                return sync_request("GET", f"http://127.0.0.1:{port}/api/v1/server", timeout=60)
            except OSError:  # systemd-socket-activate is not listening yet
                return None

        answer = wait_for(server, "the activated relay to answer", timeout=60)
        assert answer.status == 200 and answer.body["name"] == "relay.test"  # type: ignore[attr-defined]

        def log() -> str:
            return log_path.read_text() if log_path.exists() else ""

        wait_for(lambda: log().count("listening on systemd:domain=INET:index=0 (inherited socket)") == 2,
                 "both workers to serve the systemd socket")
        pids = worker_pids(log())
        for pid in pids.values():
            with Only(pids, pid):
                assert sync_request("GET", f"http://127.0.0.1:{port}/api/v1/health").body == {"status": "ok"}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
    assert proc.returncode in (0, -15)


# -- the supervisor's decisions, on a Clock ------------------------------------------------------

class _FakeProcess:
    def __init__(self, pid: int):
        self.pid = pid
        self.signals: list[int] = []

    def signalProcess(self, signum: int) -> None:
        self.signals.append(signum)


class _ProcessClock(Clock):
    """A Clock that records spawned processes instead of starting them."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict[int, Any], _FakeProcess]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any = None,
                     childFDs: Any = None) -> _FakeProcess:
        process = _FakeProcess(1000 + len(self.spawned))
        protocol.makeConnection(process)
        self.spawned.append((protocol, args, childFDs, process))
        return process


def _end(protocol: Any, **how: Any) -> None:
    protocol.processEnded(Failure(ProcessTerminated(**how)))


def test_supervisor_restarts_with_backoff_and_stops_every_worker():
    clock = _ProcessClock()
    listener = cast(BoundListener, SimpleNamespace(fd=7))
    supervisor = WorkerSupervisor(clock, 2, lambda index: ["python", "twistd"], [listener], env={})
    supervisor.startService()
    try:
        assert [args[-2:] for _, args, _, _ in clock.spawned] == [["--worker", "0:7"], ["--worker", "1:7"]]
        assert all(fds[7] == 7 and fds[1] == "r" for _, _, fds, _ in clock.spawned)
        for delay in (RESTART_FIRST, 2 * RESTART_FIRST):  # the backoff doubles while it keeps dying
            before = len(clock.spawned)
            _end(clock.spawned[-1][0], signal=9)
            clock.advance(delay - 0.01)
            assert len(clock.spawned) == before
            clock.advance(0.01)
            assert len(clock.spawned) == before + 1 and clock.spawned[-1][1][-1] == "1:7"
        clock.advance(RESTART_RESET)  # a worker that ran a while starts the backoff afresh
        _end(clock.spawned[-1][0], exitCode=1)
        clock.advance(RESTART_FIRST)
        assert len(clock.spawned) == 5
        assert sorted(supervisor.pids()) == [1000, 1004]
    finally:
        stopped = supervisor.stopService()
    running = [clock.spawned[0], clock.spawned[-1]]
    assert [process.signals for _, _, _, process in running] == [[signal.SIGTERM]] * 2
    results: list[object] = []
    stopped.addBoth(results.append)
    _end(running[0][0], signal=15)
    clock.advance(STOP_GRACE)  # the second ignores SIGTERM: it is killed
    assert running[1][3].signals == [signal.SIGTERM, signal.SIGKILL] and results == []
    _end(running[1][0], signal=9)
    assert len(results) == 1
    clock.advance(RESTART_MOST)
    assert len(clock.spawned) == 5  # nothing is restarted once stopping


def test_worker_output_is_passed_on_by_whole_lines():
    """stdout (the worker's formatted log) goes on as it is, a read's complete lines at once;
    stderr (output outside the log) is logged a line at a time with the worker's tag."""
    from twisted.logger import globalLogPublisher

    from msgrelay.logs import WORKER_OUTPUT
    from msgrelay.workers import _WorkerProcess

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        ended: list[Any] = []
        worker = _WorkerProcess(3, lambda w, reason: ended.append(reason))
        worker.makeConnection(cast(Any, _FakeProcess(77)))
        worker.childDataReceived(1, b'{"a":1}\n{"b"')
        worker.childDataReceived(1, b':2}\n{"c":3}\n{"d"')
        worker.childDataReceived(2, b"Traceback (most recent call last):\n  boom")
        _end(worker, exitCode=1)
    finally:
        globalLogPublisher.removeObserver(events.append)
    passed = [e["worker_output"] for e in events if e.get("log_namespace") == WORKER_OUTPUT]
    assert passed == ['{"a":1}\n', '{"b":2}\n{"c":3}\n', '{"d"\n']
    tagged = [(e["worker"], e["worker_pid"], e["line"]) for e in events if "line" in e]
    assert tagged == [(3, 77, "Traceback (most recent call last):"), (3, 77, "  boom")]
    assert len(ended) == 1


def test_worker_role_round_trips():
    role = WorkerRole.parse("1:5,6")
    assert (role.index, role.fds, role.first, str(role)) == (1, (5, 6), False, "1:5,6")
    assert WorkerRole.parse("0:").fds == () and WorkerRole.parse("0:3").first
