#!/usr/bin/env python3
"""How does a relay answer while thousands of connections sit open, and slow-loris clients
trickle headers? Prints figures; not a test (tests/test_timeouts.py checks a modest scale).

    /work/venv/bin/python bench/connections.py [--idle 3000] [--loris 200] [--requests 300]

It starts the installed `twistd msgrelay` in a temporary directory (listen backlog 4096,
idle timeout 600 s, header deadline 5 s, metrics on a loopback listener), then measures:

1. request latency on an otherwise idle relay (baseline);
2. the same with N idle connections open (and the relay's file descriptors and memory);
3. the same while L slow-loris clients trickle one header byte every 0.5 s, and how long
   the relay took to cut them off.
"""

from __future__ import annotations

import argparse
import http.client
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

TOKEN = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def twistd() -> str:
    candidate = Path(sys.executable).with_name("twistd")
    return str(candidate) if candidate.exists() else shutil.which("twistd") or "twistd"


#: Settings of this benchmark: idle connections live long, one client address opens them all.
CONNECTIONS_TOML = ("[timeouts]\nidle = 600\nheaders = 5\nbody = 10\n"
                    "[connections]\nper_address = 100000\nmax_total = 100000\n")


def start_relay(workdir: Path, extra: str = CONNECTIONS_TOML) -> tuple[subprocess.Popen, int, int]:
    """The installed relay on a loopback port (backlog 4096) with `extra` TOML settings;
    (process, port, metrics port)."""
    port, metrics_port = free_port(), free_port()
    config = workdir / "relay.toml"
    config.write_text(
        f'[server]\nlisten = ["tcp:{port}:interface=127.0.0.1:backlog=4096"]\n' + extra
        + f'[metrics]\nlisten = ["tcp:{metrics_port}:interface=127.0.0.1"]\ntoken = "{TOKEN}"\n'
        '[log]\nlevel = "warn"\n'
    )
    proc = subprocess.Popen(
        [twistd(), "--nodaemon", "--pidfile=", f"--logfile={workdir / 'relay.log'}", "msgrelay",
         "--config", str(config), "--state-dir", str(workdir / "state"), "--server-name", "bench.test"],
        cwd=workdir,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/server", timeout=2):
                return proc, port, metrics_port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("relay did not start; see " + str(workdir / "relay.log"))


def latencies(port: int, count: int) -> list[float]:
    """Sequential requests, a new connection each (as most clients do)."""
    times = []
    for i in range(count):
        path = "/api/v1/health" if i % 2 else "/api/v1/server"
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        conn.close()
        assert response.status == 200, response.status
        times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> str:
    ordered = sorted(times)
    p = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return (f"n={len(times)} median={statistics.median(times) * 1000:.2f}ms "
            f"p95={p(0.95):.2f}ms p99={p(0.99):.2f}ms max={max(times) * 1000:.2f}ms")


def process_figures(pid: int) -> str:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return f"relay fds={fds} rss={int(rss) / 1024:.1f}MiB"


def metric(metrics_port: int, name: str) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{metrics_port}/metrics",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as response:
        lines = response.read().decode().splitlines()
    return ", ".join(line for line in lines if line.startswith(name)) or f"{name} (none)"


def open_idle(port: int, count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        sockets.append(s)
    return sockets


def loris(port: int, count: int, interval: float, results: list[float]) -> list[threading.Thread]:
    """Each slow-loris client sends one byte of an endless header every `interval` seconds."""
    payload = b"GET /api/v1/server HTTP/1.1\r\nHost: bench\r\nX-Slow: " + b"a" * 10000

    def run() -> None:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        started = time.monotonic()
        try:
            for i in range(len(payload)):
                s.send(payload[i:i + 1])
                s.settimeout(interval)
                try:
                    if s.recv(1024) is not None:
                        break  # the 408, or the close
                except socket.timeout:
                    continue
        except OSError:
            pass
        results.append(time.monotonic() - started)
        s.close()

    threads = [threading.Thread(target=run, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    return threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=3000, help="idle connections to hold open")
    parser.add_argument("--loris", type=int, default=200, help="slow-loris clients")
    parser.add_argument("--requests", type=int, default=300, help="requests per latency sample")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.idle + args.loris + 100:
        raise SystemExit(f"open-file hard limit {hard} is too low for {args.idle} connections")

    workdir = Path(tempfile.mkdtemp(prefix="msgrelay-bench-"))
    proc, port, metrics_port = start_relay(workdir)
    try:
        print(f"relay pid {proc.pid} on port {port}; {process_figures(proc.pid)}")
        latencies(port, 20)  # warm up
        print(f"baseline:             {summary(latencies(port, args.requests))}")

        t0 = time.monotonic()
        idle = open_idle(port, args.idle)
        time.sleep(1)
        print(f"opened {len(idle)} idle connections in {time.monotonic() - t0:.2f}s; {process_figures(proc.pid)}")
        print(f"  {metric(metrics_port, 'msgrelay_http_open_connections')}")
        print(f"with {len(idle)} idle:     {summary(latencies(port, args.requests))}")

        cut_after: list[float] = []
        threads = loris(port, args.loris, 0.5, cut_after)
        time.sleep(1)
        print(f"with {len(idle)} idle + {args.loris} slow-loris: {summary(latencies(port, args.requests))}")
        for t in threads:
            t.join(60)
        if cut_after:
            print(f"slow-loris clients cut off: {len(cut_after)}/{args.loris}, after "
                  f"{min(cut_after):.2f}s to {max(cut_after):.2f}s (headers deadline 5s)")
        print(f"  {metric(metrics_port, 'msgrelay_connections_timed_out_total')}")
        for s in idle:
            s.close()
        time.sleep(1)
        print(f"after closing: {process_figures(proc.pid)}; "
              f"{metric(metrics_port, 'msgrelay_http_open_connections')}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
