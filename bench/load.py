#!/usr/bin/env python3
"""Load: thousands of concurrent keep-alive connections and minutes of mixed senders and
fetchers against the real `twistd msgrelay`; loopback only, bounded in count and time.

    .venv/bin/python bench/load.py [--connections 3000] [--duration 180] [--users 10] [--senders 16]

The connections come from many loopback addresses (127.0.1.x, 50 each, under the default
per-address cap of 64), stay open for the whole run and each sends `GET /api/v1/server`
every 10 to 40 s. Meanwhile senders post packets to the users as fast as the relay answers,
and one fetcher per user fetches, checks and acknowledges. At the end the senders stop and
the fetchers drain every mailbox.

It fails (exit status 1) unless every message answered 200 was fetched exactly once, none
came back after its acknowledgement, and every keep-alive connection stayed open and
answered. It prints throughput and latency, the ratio of the accept rate to this machine's
ceiling for one durable write (write, fsync, rename, directory fsync, measured in the same
run), and the relay's resident memory every 30 s, at start, peak and end. The relay runs
with MALLOC_ARENA_MAX=2, as systemd/msgrelay.service sets (docs/security.md, "Proofs").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlencode

import treq
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.web.client import HTTPConnectionPool

from connections import process_figures, start_relay
from msgrelay.wire.dates import format_date
from msgrelay.wire.envelope import open_envelope, seal
from msgrelay.wire.keys import load_public_key, public_key_pem, user_id_for_key
from msgrelay.wire.signing import sign_params

PER_ADDRESS = 50


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def durable_write_ceiling(directory: Path, seconds: float = 3.0) -> float:
    """Durable small writes per second here: what one accepted message costs at least."""
    directory.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(directory, os.O_RDONLY)
    count, deadline = 0, time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            tmp, final = directory / f"t{count}", directory / f"m{count}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, os.urandom(1024))
            os.fsync(fd)
            os.close(fd)
            os.rename(tmp, final)
            os.fsync(dir_fd)
            count += 1
    finally:
        os.close(dir_fd)
        shutil.rmtree(directory, ignore_errors=True)
    return count / seconds


class KeepAlive(protocol.Protocol):
    """One long-lived connection asking for /api/v1/server now and then."""

    def __init__(self, stats: dict, clock: Any, interval: tuple[float, float]):
        self.stats = stats
        self.clock = clock
        self.interval = interval
        self.buffer = b""
        self.call: Any = None
        self.sent_at = 0.0
        self.open = False

    def connectionMade(self) -> None:
        self.open = True
        self.schedule()

    def schedule(self) -> None:
        self.call = self.clock.callLater(random.uniform(*self.interval), self.ask)

    def ask(self) -> None:
        self.sent_at = time.monotonic()
        self.transport.write(b"GET /api/v1/server HTTP/1.1\r\nHost: bench\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        head, sep, rest = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        if len(rest) < length:
            return
        self.buffer = rest[length:]
        key = "answered" if head.startswith(b"HTTP/1.1 200") else "refused"
        self.stats[key] += 1
        self.stats["latencies"].append(time.monotonic() - self.sent_at)
        self.schedule()

    def connectionLost(self, reason: Any) -> None:
        if self.open:
            self.stats["lost"] += 1
        self.open = False
        if self.call is not None and self.call.active():
            self.call.cancel()

    def close(self) -> None:
        self.open = False
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.transport.loseConnection()


class Ledger:
    """What was accepted, fetched and acknowledged, per message id."""

    def __init__(self) -> None:
        self.accepted: dict[str, tuple[int, str]] = {}  # id -> (user index, sha256 of the body)
        self.fetched: dict[str, int] = {}  # id -> times fetched
        self.acknowledged: set[str] = set()
        self.came_back: list[str] = []
        self.altered: list[str] = []
        self.refused: dict[int, int] = {}  # status -> count, for sends not accepted
        self.send_latencies: list[float] = []
        self.fetch_latencies: list[float] = []


class Bench:
    def __init__(self, reactor: Any, url: str, args: argparse.Namespace):
        self.reactor = reactor
        self.url = url
        self.args = args
        self.ledger = Ledger()
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = args.senders + args.users + 4
        self.users: list[tuple[rsa.RSAPrivateKey, str]] = []
        self.tokens: list[str] = []
        self.sending = True
        self.server: dict[str, Any] = {}

    async def call(self, method: str, path: str, body: Any = None, query: Optional[dict] = None) -> tuple[int, Any]:
        url = self.url + path + ("?" + urlencode(query) if query else "")
        data = None if body is None else json.dumps(body).encode()
        response = await treq.request(method, url, data=data, pool=self.pool, reactor=self.reactor)
        content = await response.content()
        return response.code, json.loads(content) if content else None

    def signed(self, index: int, method: str, path: str, **params: Any) -> dict[str, Any]:
        key, user_id = self.users[index]
        base = {"user_id": user_id, "date": format_date(time.time()), "validity": 60, **params}
        return sign_params(key, base, method, path, self.server["name"])

    async def setup(self) -> None:
        _, self.server = await self.call("GET", "/api/v1/server")
        for _ in range(self.args.users):
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.users.append((key, user_id_for_key(key.public_key())))
            status, _ = await self.call("POST", "/api/v1/user", {"key": public_key_pem(key.public_key())})
            assert status == 200, status
        for index in range(self.args.users):
            status, body = await self.call("POST", "/api/v1/token", self.signed(index, "POST", "/api/v1/token"))
            assert status == 200, body
            self.tokens.append(body["token"])

    async def sender(self, worker: int) -> None:
        server_key = load_public_key(self.server["key"])
        n = 0
        while self.sending:
            index = (worker + n) % self.args.users
            key, user_id = self.users[index]
            body = json.dumps({"w": worker, "n": n, "pad": uuid.uuid4().hex * 8}).encode()
            n += 1
            packet = {"id": uuid.uuid4().hex, "user_id": user_id, "token": self.tokens[index],
                      **seal(key.public_key(), body)}
            started = time.monotonic()
            status, answer = await self.call("POST", "/api/v1/message", seal(server_key, json.dumps(packet).encode()))
            if status == 200:
                self.ledger.send_latencies.append(time.monotonic() - started)
                self.ledger.accepted[answer["message_id"]] = (index, hashlib.sha256(body).hexdigest())
            else:
                self.ledger.refused[status] = self.ledger.refused.get(status, 0) + 1
                await task.deferLater(self.reactor, 0.1, lambda: None)

    async def fetcher(self, index: int, done: defer.Deferred) -> None:
        key, _ = self.users[index]
        ledger = self.ledger
        checked = 0
        while not done.called:
            started = time.monotonic()
            status, answer = await self.call("GET", "/api/v1/message",
                                             query=self.signed(index, "GET", "/api/v1/message", limit=100))
            if status != 200:
                await task.deferLater(self.reactor, 0.2, lambda: None)
                continue
            ledger.fetch_latencies.append(time.monotonic() - started)
            messages = json.loads(open_envelope([key], answer))
            for message in messages:
                message_id = message["id"]
                if message_id in ledger.acknowledged:
                    ledger.came_back.append(message_id)
                ledger.fetched[message_id] = ledger.fetched.get(message_id, 0) + 1
                checked += 1
                if checked % 20 == 0 and message_id in ledger.accepted:  # a sample: decrypting is slow
                    digest = hashlib.sha256(open_envelope([key], message)).hexdigest()
                    if digest != ledger.accepted[message_id][1]:
                        ledger.altered.append(message_id)
            if messages:
                ids = [m["id"] for m in messages]
                status, _ = await self.call("DELETE", "/api/v1/message",
                                            self.signed(index, "DELETE", "/api/v1/message", ids=ids))
                if status == 200:
                    ledger.acknowledged.update(ids)
            else:
                await task.deferLater(self.reactor, 0.2, lambda: None)


async def open_connections(reactor: Any, port: int, count: int, stats: dict) -> list[KeepAlive]:
    opened: list[KeepAlive] = []
    for start in range(0, count, 200):
        batch = []
        for i in range(start, min(count, start + 200)):
            source = f"127.0.1.{1 + i // PER_ADDRESS}"
            proto = KeepAlive(stats, reactor, (10.0, 40.0))
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=30, bindAddress=(source, 0))
            batch.append(connectProtocol(endpoint, proto))
        opened.extend(await defer.gatherResults(batch))
    return opened


async def run(reactor: Any, args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="msgrelay-load-"))
    ceiling = durable_write_ceiling(workdir / "ceiling")
    extra = ("[connections]\nmax_total = 8192\n"
             '[rate_limits]\nexempt = ["127.0.0.1"]\nfetch_per_user = "off"\ntoken_per_user = "off"\n')
    proc, port, _ = start_relay(workdir, extra)
    failures: list[str] = []
    try:
        url = f"http://127.0.0.1:{port}"
        rss_idle = rss_mib(proc.pid)
        bench = Bench(reactor, url, args)
        await bench.setup()
        stats: dict[str, Any] = {"answered": 0, "refused": 0, "lost": 0, "latencies": []}
        t0 = time.monotonic()
        connections = await open_connections(reactor, port, args.connections, stats)
        print(f"opened {len(connections)} keep-alive connections from {1 + (args.connections - 1) // PER_ADDRESS} "
              f"addresses in {time.monotonic() - t0:.1f}s; {process_figures(proc.pid)}")
        await task.deferLater(reactor, 2, lambda: None)
        rss_start = rss_mib(proc.pid)
        samples = [rss_start]
        sampler = task.LoopingCall(lambda: samples.append(rss_mib(proc.pid)))
        sampler.clock = reactor
        sampler.start(5, now=False)
        done: defer.Deferred = defer.Deferred()
        fetchers = [defer.ensureDeferred(bench.fetcher(i, done)) for i in range(args.users)]
        senders = [defer.ensureDeferred(bench.sender(w)) for w in range(args.senders)]
        started = time.monotonic()
        await task.deferLater(reactor, args.duration, lambda: None)
        bench.sending = False
        await defer.gatherResults(senders)
        send_seconds = time.monotonic() - started
        ledger = bench.ledger
        deadline = time.monotonic() + 120
        while set(ledger.accepted) - ledger.acknowledged and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.5, lambda: None)
        await task.deferLater(reactor, 1, lambda: None)  # one more empty fetch each: nothing comes back
        done.callback(None)
        await defer.gatherResults(fetchers)
        sampler.stop()
        rss_end = rss_mib(proc.pid)
        open_at_end = sum(1 for c in connections if c.open)
        figures = process_figures(proc.pid)
        for c in connections:
            c.close()
        await bench.pool.closeCachedConnections()

        accepted = len(ledger.accepted)
        missing = set(ledger.accepted) - set(ledger.fetched)
        twice = [i for i, n in ledger.fetched.items() if n > 1]
        rate = accepted / send_seconds
        lat = sorted(stats["latencies"])
        print(f"ran {send_seconds:.0f}s: {args.senders} senders, {args.users} fetchers, "
              f"{args.connections} keep-alive connections")
        print(f"accepted {accepted} messages ({rate:.0f}/s = {rate / ceiling:.2f} of the durable-write ceiling of "
              f"{ceiling:.0f}/s here); refused {ledger.refused or 'none'}")
        print(f"fetched {len(ledger.fetched)} distinct, {len(twice)} more than once, {len(missing)} never; "
              f"acknowledged {len(ledger.acknowledged)}; came back after acknowledgement {len(ledger.came_back)}; "
              f"altered {len(ledger.altered)} (of a 1-in-20 sample decrypted)")
        print(f"send latency median {statistics.median(ledger.send_latencies) * 1000:.1f} ms, "
              f"p99 {sorted(ledger.send_latencies)[int(len(ledger.send_latencies) * 0.99)] * 1000:.1f} ms; "
              f"fetch median {statistics.median(ledger.fetch_latencies) * 1000:.1f} ms")
        if lat:
            print(f"keep-alive requests: {stats['answered']} answered, {stats['refused']} refused, "
                  f"median {statistics.median(lat) * 1000:.1f} ms, p99 {lat[int(len(lat) * 0.99)] * 1000:.1f} ms; "
                  f"{stats['lost']} connections lost, {open_at_end} of {len(connections)} open at the end")
        print("relay RSS every 30 s (MiB): " + " ".join(f"{x:.1f}" for x in samples[::6]))
        print(f"relay RSS: {rss_idle:.1f} MiB idle, {rss_start:.1f} MiB at the start of the load, "
              f"{max(samples):.1f} MiB peak, {rss_end:.1f} MiB at the end ({rss_end - rss_start:+.1f} MiB); {figures}")
        if missing:
            failures.append(f"{len(missing)} accepted messages never fetched")
        if twice:
            failures.append(f"{len(twice)} messages fetched more than once")
        if ledger.came_back:
            failures.append(f"{len(ledger.came_back)} messages came back after acknowledgement")
        if ledger.altered:
            failures.append(f"{len(ledger.altered)} messages altered")
        if stats["lost"] or open_at_end != len(connections):
            failures.append(f"{stats['lost']} keep-alive connections were closed by the relay")
        if rss_end > rss_start * 1.5 + 20:
            failures.append(f"resident memory grew from {rss_start:.1f} to {rss_end:.1f} MiB")
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(workdir, ignore_errors=True)
    for failure in failures:
        print("FAILED:", failure)
    if failures:
        raise SystemExit(1)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=3000, help="keep-alive connections held open")
    parser.add_argument("--duration", type=float, default=180, help="seconds of sending")
    parser.add_argument("--users", type=int, default=10, help="recipients, one fetcher each")
    parser.add_argument("--senders", type=int, default=16, help="concurrent senders")
    args = parser.parse_args()
    if not 1 <= args.connections <= 12000 or not 1 <= args.duration <= 1800:
        raise SystemExit("bounded: at most 12000 connections and 1800 s")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = args.connections + args.senders + args.users + 200
    if hard < needed:
        raise SystemExit(f"open-file hard limit {hard} is below the {needed} needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    # As the systemd unit does (systemd/msgrelay.service); the relay inherits it.
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    print(f"MALLOC_ARENA_MAX={os.environ['MALLOC_ARENA_MAX']} for the relay")
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
