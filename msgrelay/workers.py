"""Workers: `server.workers = N` runs N relay processes on the same listening sockets.

The parent (`twistd msgrelay` itself) binds every listener, `systemd:` ones included, stops
accepting on them, and spawns N workers with `reactor.spawnProcess(childFDs=...)` so that
each inherits the listening file descriptors at the same numbers. A worker is the same
`twistd msgrelay` command with `--worker INDEX:FD,FD,...`: a full relay (builder.build_relay)
that adopts those sockets with `reactor.adoptStreamPort`; the kernel hands each new
connection to one of the workers waiting in accept. Each worker takes one connection per
wake-up (`twisted_compat.accept_one_per_wakeup`), so the least busy worker takes the next
and a burst of connections is shared out rather than taken whole by the first awake. An `ssl:` listener is a TCP socket like
the others; each worker does TLS on it with the certificate and key of its description.

The parent does no HTTP work. It supervises: a worker that exits while the parent runs is
started again after a backoff (1 s, doubling to 30 s, back to 1 s once a worker has run for
a minute); SIGHUP is passed on to every worker (each reloads its settings as a single relay
does); on SIGTERM it sends SIGTERM to every worker, waits for them (SIGKILL after
`STOP_GRACE` seconds), then stops. Each worker's log comes back through a pipe and is
written to the parent's log as the worker wrote it, each line tagged with the worker's index
and pid (msgrelay/logs.py). A worker whose parent has gone (SIGKILL) stops by itself.

Workers need the PostgreSQL store, whose federation outbox every process shares (leases in
the database), so every worker queues and delivers. What must happen once is done by worker
0: the control socket of msgrelay-admin, expiry sweeps, and the dedicated `metrics.listen`
listeners. Each worker watches the key files itself, so a rotated key reaches all of them.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from .logs import WORKER_OUTPUT
from .twisted_compat import accept_one_per_wakeup

log = Logger(namespace="msgrelay.workers")
output = Logger(namespace=WORKER_OUTPUT)

#: Backoff before a dead worker is started again: first, most, and the run time that resets it.
RESTART_FIRST = 1.0
RESTART_MOST = 30.0
RESTART_RESET = 60.0
#: Seconds workers get to stop after SIGTERM before they are killed.
STOP_GRACE = 20.0


@dataclass(frozen=True)
class WorkerRole:
    """What `--worker INDEX:FD,...` tells a worker: its index and the inherited sockets, in
    the order of server.listen then metrics.listen."""

    index: int
    fds: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> "WorkerRole":
        index, _, fds = text.partition(":")
        return cls(int(index), tuple(int(fd) for fd in fds.split(",") if fd))

    def __str__(self) -> str:
        return f"{self.index}:{','.join(str(fd) for fd in self.fds)}"

    @property
    def first(self) -> bool:
        """Worker 0 owns what must happen once (module docstring)."""
        return self.index == 0


def socket_family(fd: int) -> int:
    """The address family of an inherited socket, without taking ownership of it."""
    sock = socket.socket(fileno=fd)
    try:
        return int(sock.family)
    finally:
        sock.detach()


class AdoptedListener(Service):
    """A worker's listener: serve `factory` on a listening socket the parent bound.

    For an `ssl:` listener the inherited socket is plain TCP (TLS lives in each connection,
    not in the socket), so the worker wraps `factory` in TLS itself with `tls`, the context
    it built from the same description (certificate and key read by this worker), as
    `reactor.listenSSL` does for a socket it binds."""

    def __init__(self, reactor: Any, fd: int, factory: Any, description: str, tls: Any = None):
        self.reactor = reactor
        self.fd = fd
        self.factory = factory
        self.description = description
        self.tls = tls
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        factory = self.factory if self.tls is None else TLSMemoryBIOFactory(self.tls, False, self.factory)
        self.port = self.reactor.adoptStreamPort(self.fd, socket_family(self.fd), factory)
        accept_one_per_wakeup(self.port)  # the workers share connections by how busy they are
        os.close(self.fd)  # adoptStreamPort keeps its own copy
        log.info("listening on {endpoint} (inherited socket{tls})", endpoint=self.description,
                 tls=", TLS" if self.tls is not None else "")

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            close_shared(port)


def close_shared(port: Any) -> None:
    """Stop accepting on a listening port whose socket other processes share, and close our
    descriptor. `stopListening` would also shut the socket down (shutdown(2) acts on the
    socket, not the descriptor), and every other worker's accept would fail with EINVAL."""
    port.stopReading()
    port.socket.close()


class _NoConnections(Factory):
    """The parent's factory on the sockets it binds: it never accepts."""

    noisy = False

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        return None


class BoundListener(Service):
    """The parent's listener: bound (or adopted from systemd) at privileged start, never read
    from; its descriptor is what the workers inherit."""

    def __init__(self, reactor: Any, description: str, on_failure: Callable[[str], None]):
        self.reactor = reactor
        self.description = description
        self.on_failure = on_failure
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        # An ssl: endpoint binds the same plain TCP socket (and checks its certificate and key
        # now); the workers do the TLS (AdoptedListener).
        endpoint = serverFromString(self.reactor, self.description)
        outcome: list[Any] = []
        endpoint.listen(_NoConnections()).addBoth(outcome.append)
        if not outcome or isinstance(outcome[0], Failure):
            problem = outcome[0].getErrorMessage() if outcome else "the endpoint did not listen at once"
            self.on_failure(f"cannot listen on {self.description}: {problem}")
        self.port = outcome[0]
        self.port.stopReading()  # the workers accept; the parent only holds the socket open
        log.info("bound {endpoint} for the workers", endpoint=self.description)

    @property
    def fd(self) -> int:
        return int(self.port.fileno())

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            close_shared(port)  # a socket from systemd stays usable for its next activation


class _WorkerProcess(ProcessProtocol):
    """One worker: its log lines go to the parent's log; its end is reported.

    The worker's log observer writes to its stdout lines already formatted, filtered and
    tagged with the worker's index and pid (logs.worker_tag): they are passed on as they are,
    a read's complete lines in one event. Its stderr carries only what is written outside
    the log (a start that fails before logging begins): each line is logged with the tag."""

    def __init__(self, index: int, ended: Callable[["_WorkerProcess", Any], None]):
        self.index = index
        self.ended = ended
        self.pid: Optional[int] = None
        self.started_at = 0.0
        self.done: Deferred = Deferred()
        self._partial = {1: b"", 2: b""}

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        complete, newline, rest = (self._partial.get(childFD, b"") + data).rpartition(b"\n")
        self._partial[childFD] = rest
        if newline:
            self._pass_on(childFD, complete + newline)

    def _pass_on(self, childFD: int, lines: bytes) -> None:
        text = lines.decode("utf-8", "replace")
        if childFD == 1:
            output.info("{worker_output}", worker_output=text)
            return
        for line in text.splitlines():
            if line.strip():
                log.warn("worker {worker} pid {worker_pid}: {line}", worker=self.index, worker_pid=self.pid,
                         line=line)

    def processEnded(self, reason: Failure) -> None:
        for childFD, rest in self._partial.items():
            if rest:
                self._pass_on(childFD, rest + b"\n")
        self.ended(self, reason.value)
        self.done.callback(None)


class WorkerSupervisor(Service):
    """Starts the workers, restarts those that die, passes SIGHUP on and stops them all."""

    name = "workers"

    def __init__(self, reactor: Any, count: int, command: Callable[[int], Sequence[str]],
                 listeners: Sequence[BoundListener], env: Optional[dict[str, str]] = None):
        self.reactor = reactor
        self.count = count
        self.command = command
        self.listeners = tuple(listeners)
        self.env = env if env is not None else _child_environment()
        self.workers: dict[int, _WorkerProcess] = {}
        self.backoff = {index: RESTART_FIRST for index in range(count)}
        self._restarts: dict[int, Any] = {}
        self._previous_hup: Any = None

    def startService(self) -> None:
        super().startService()
        for index in range(self.count):
            self._spawn(index)
        if threading.current_thread() is threading.main_thread():
            self._previous_hup = signal.signal(signal.SIGHUP, self._hangup)

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers.values() if w.pid is not None]

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        fds = [listener.fd for listener in self.listeners]
        argv = [*self.command(index), "--worker", str(WorkerRole(index, tuple(fds)))]
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", **{fd: fd for fd in fds}}
        worker = _WorkerProcess(index, self._ended)
        self.reactor.spawnProcess(worker, argv[0], argv, env=self.env, childFDs=child_fds)
        worker.started_at = self.reactor.seconds()
        self.workers[index] = worker
        log.info("worker {worker} started, pid {worker_pid}", worker=index, worker_pid=worker.pid)

    def _ended(self, worker: _WorkerProcess, reason: Any) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        status = _describe(reason)
        if not self.running:
            log.info("worker {worker} pid {worker_pid} stopped ({status})", worker=worker.index,
                     worker_pid=worker.pid, status=status)
            return
        if self.reactor.seconds() - worker.started_at >= RESTART_RESET:
            self.backoff[worker.index] = RESTART_FIRST
        delay = self.backoff[worker.index]
        self.backoff[worker.index] = min(delay * 2, RESTART_MOST)
        log.warn("worker {worker} pid {worker_pid} exited ({status}); starting it again in {delay:.0f}s",
                 worker=worker.index, worker_pid=worker.pid, status=status, delay=delay)
        self._restarts[worker.index] = self.reactor.callLater(delay, self._spawn, worker.index)

    def _hangup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.signal_all, signal.SIGHUP)

    def signal_all(self, signum: int) -> None:
        """Send `signum` to every running worker."""
        for worker in list(self.workers.values()):
            try:
                assert worker.transport is not None
                worker.transport.signalProcess(signum)
            except Exception:  # already gone: processEnded follows
                continue
        if signum == signal.SIGHUP:
            log.info("SIGHUP passed to {count} worker(s)", count=len(self.workers))

    def stopService(self) -> Any:
        super().stopService()
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        waiting = [w.done for w in self.workers.values()]
        if not waiting:
            return succeed(None)
        self.signal_all(signal.SIGTERM)
        killer = self.reactor.callLater(STOP_GRACE, self.signal_all, signal.SIGKILL)
        done = DeferredList(waiting)
        done.addBoth(lambda result: killer.cancel() if killer.active() else None)
        return done


class ParentWatch(Service):
    """In a worker: stop when the supervising parent is gone (it was killed)."""

    def __init__(self, reactor: Any, interval: float = 1.0):
        self.reactor = reactor
        self.interval = interval
        self.parent_pid = os.getppid()
        self._call: Any = None

    def startService(self) -> None:
        super().startService()
        self._call = self.reactor.callLater(self.interval, self._check)

    def _check(self) -> None:
        if os.getppid() != self.parent_pid:
            log.warn("the supervising process {pid} is gone; this worker stops", pid=self.parent_pid)
            self._call = None
            self.reactor.stop()
            return
        self._call = self.reactor.callLater(self.interval, self._check)

    def stopService(self) -> Any:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


def _describe(reason: Any) -> str:
    if isinstance(reason, ProcessDone):
        return "exit status 0"
    if isinstance(reason, ProcessTerminated):
        if reason.signal is not None:
            return f"signal {reason.signal}"
        return f"exit status {reason.exitCode}"
    return str(reason)


def _child_environment() -> dict[str, str]:
    """The parent's environment without systemd's socket-passing variables (the workers get
    the sockets as inherited descriptors, and LISTEN_PID would not be theirs)."""
    return {k: v for k, v in os.environ.items() if k not in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")}


def worker_command(twistd_args: Sequence[str], msgrelay_args: Sequence[str]) -> list[str]:
    """The command line of a worker: this interpreter running twistd in the foreground with its
    log on stdout (the parent reads it), then `msgrelay` with the parent's own options."""
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *twistd_args,
            "msgrelay", *msgrelay_args]
