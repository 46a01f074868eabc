"""A multi-process HTTP/1.1 load generator for pre-built requests (keep-alive, loopback only).

Every request is serialised to bytes before the measured window; each worker process
(forked, so the requests are shared copy-on-write) keeps its connections busy with one
request in flight each and records per-request latency. Workers also report their own CPU
time, so the bench can show that the load generator is not the bottleneck.
"""

from __future__ import annotations

import multiprocessing
import resource
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Optional


def http_request(method: str, path: str, host: str, body: Optional[bytes] = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode("ascii") + (body or b"")


def percentile(values: list[float], q: float) -> float:
    """The q-quantile of `values` (nearest rank, the larger one), NaN when there are none."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Outcome:
    """What one run measured."""

    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    statuses: dict[int, int] = field(default_factory=dict)
    bodies: list[bytes] = field(default_factory=list)  # 200 answers, when kept
    started: float = 0.0
    ended: float = 0.0
    client_cpu: float = 0.0  # CPU seconds of all worker processes
    #: From a generator that reports percentiles and counts rather than every latency (wrk).
    fixed_percentiles: dict[float, float] = field(default_factory=dict)
    answered_ok: Optional[int] = None

    @property
    def ok(self) -> int:
        return len(self.latencies) if self.answered_ok is None else self.answered_ok

    @property
    def elapsed(self) -> float:
        return max(self.ended - self.started, 1e-9)

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed

    def percentile(self, q: float) -> float:
        if q in self.fixed_percentiles:
            return self.fixed_percentiles[q]
        return percentile(self.latencies, q)


def _read_answer(sock: socket.socket, buffer: bytearray) -> Optional[tuple[int, bytes]]:
    """(status, body) once a whole answer is buffered, consuming it; None if not yet."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    length = 0
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    if len(buffer) < end + 4 + length:
        return None
    body = bytes(buffer[end + 4:end + 4 + length])
    del buffer[:end + 4 + length]
    return status, body


def _worker(port: int, requests: list[bytes], connections: int, keep_bodies: bool, rate: float,
            go: "multiprocessing.synchronize.Event", results: "multiprocessing.connection.Connection") -> None:
    socks = []
    for _ in range(min(connections, len(requests))):
        s = socket.create_connection(("127.0.0.1", port), timeout=120)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
    out = Outcome()
    pending = iter(requests)
    selector = selectors.DefaultSelector()
    state: dict[socket.socket, list] = {}
    idle: list[socket.socket] = []  # paced: connections waiting for the next slot
    sent = 0

    def send_next(s: socket.socket) -> bool:
        nonlocal sent
        if rate and time.perf_counter() < out.started + sent / rate:
            idle.append(s)
            return True
        request = next(pending, None)
        if request is None:
            return False
        state[s][1] = time.perf_counter()
        s.sendall(request)
        sent += 1
        return True

    results.send("ready")
    go.wait()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    out.started = time.perf_counter()
    for s in socks:
        state[s] = [bytearray(), 0.0]
        if send_next(s):
            selector.register(s, selectors.EVENT_READ)
    while selector.get_map():
        timeout = 120.0
        if idle:
            timeout = max(0.0, out.started + sent / rate - time.perf_counter())
            if timeout == 0.0:
                s = idle.pop()
                if not send_next(s):
                    selector.unregister(s)
                continue
        for key, _ in selector.select(timeout=timeout):
            s = key.fileobj  # type: ignore[assignment]
            data = s.recv(262144)
            if not data:
                raise SystemExit("the relay closed a connection")
            buffer = state[s][0]
            buffer += data
            answer = _read_answer(s, buffer)
            if answer is None:
                continue
            status, body = answer
            out.statuses[status] = out.statuses.get(status, 0) + 1
            if status == 200:
                out.latencies.append(time.perf_counter() - state[s][1])
                if keep_bodies:
                    out.bodies.append(body)
            if not send_next(s):
                selector.unregister(s)
    out.ended = time.perf_counter()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    out.client_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    for s in socks:
        s.close()
    results.send(out)
    results.close()


def run(port: int, requests: list[bytes], connections: int = 16, processes: int = 2,
        keep_bodies: bool = False, rate: float = 0.0) -> Outcome:
    """Send every request once over `connections` keep-alive connections from `processes`
    worker processes, as fast as they go or at `rate` requests/s in all (each request
    waits for its slot on a fixed schedule); returns the merged outcome."""
    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    workers, pipes = [], []
    per_process = max(1, connections // processes)
    for i in range(processes):
        share = requests[i::processes]
        if not share:
            continue
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, args=(port, share, per_process, keep_bodies, rate / processes, go, sender), daemon=True)
        proc.start()
        sender.close()
        workers.append(proc)
        pipes.append(receiver)
    for receiver in pipes:  # connected: connection set-up is not part of the figures
        assert receiver.recv() == "ready"
    go.set()
    merged = Outcome(started=float("inf"))
    for receiver, proc in zip(pipes, workers):
        part: Outcome = receiver.recv()
        proc.join(60)
        merged.latencies += part.latencies
        merged.bodies += part.bodies
        for status, count in part.statuses.items():
            merged.statuses[status] = merged.statuses.get(status, 0) + count
        merged.started = min(merged.started, part.started)
        merged.ended = max(merged.ended, part.ended)
        merged.client_cpu += part.client_cpu
    return merged
