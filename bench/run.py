#!/usr/bin/env python3
"""The msgrelay benchmark: one command, real relays, figures with their ratio to this machine.

    python bench/run.py [--quick] [--backend maildir|postgresql|both] [--postgres-dsn DSN]
                        [--twistd PATH] [--json FILE] [--profile FILE [--profile-scenario NAME]...]

For each backend it seeds a state directory (users, tokens, mailboxes of 100 and 10,000
messages), starts a real `twistd msgrelay` on a loopback port, pre-builds every packet and
signed request, then drives the relay from `bench/loadgen.py` worker processes and prints
throughput, p50/p99/p99.9 latency, server and client CPU, and the relay's resident memory.
It also measures the machine's ceilings in the same run (bench/ceilings.py) and prints each
throughput as a ratio of the ceiling that bounds it. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlencode

from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ceilings  # noqa: E402
import loadgen  # noqa: E402
import wrkgen  # noqa: E402
from state import METRICS_TOKEN, MaildirSeeder, PostgresSeeder, Seeded, Seeder, relay_config  # noqa: E402

from msgrelay.wire.envelope import seal  # noqa: E402
from msgrelay.wire.keys import load_public_key, public_key_pem  # noqa: E402
from msgrelay.wire.signing import sign_params  # noqa: E402

CEILING_NAMES = {
    "rsa_oaep_decrypt": "RSA-OAEP decryptions/s with the server key, 1 core",
    "pss_verify": "PSS verifications/s (2048-bit), 1 core",
    "durable_write_1": "durable 2 KiB writes/s, 1 thread",
    "durable_write_8": "durable 2 KiB writes/s, 8 threads",
    "durable_write_kernel_ms": "kernel CPU per durable write, ms (8 threads)",
    "http_request": "trivial requests/s the relay answers (GET /api/v1/server, same load generator)",
}


#: The thread pool counters of the relay's metrics (msgrelay/metrics.py, PoolCollector).
POOL_SERIES = re.compile(r'msgrelay_thread_pool_(calls|wait_seconds|run_seconds)_total\{pool="([a-z]+)"\}')
#: Full garbage collections (msgrelay/heap.py), and their seconds: each stops every request in flight.
FULL_GC_COLLECTIONS = 'msgrelay_gc_collections_total{generation="2"}'
FULL_GC_SECONDS = 'msgrelay_gc_pause_seconds_total{generation="2"}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Relay:
    """A `twistd msgrelay` subprocess with its resource figures from /proc."""

    def __init__(self, twistd: str, workdir: Path, config: Path, workers: int = 1):
        self.port = free_port()
        self.workdir = workdir
        self.workers = workers
        log = workdir / f"relay-{self.port}.log"
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [twistd, "--nodaemon", "--pidfile=", f"--logfile={log}", "msgrelay", "--config", str(config),
             "--listen", f"tcp:{self.port}:interface=127.0.0.1:backlog=1024", "--state-dir", str(workdir / "state"),
             "--server-name", "bench.test", "--workers", str(workers)],
            cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the relay exited with {self.proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/server", timeout=5) as r:
                    self.server = json.load(r)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"the relay did not answer within 120 s; see {log}")
                time.sleep(0.05)
        self.startup_seconds = time.perf_counter() - started
        self.host = f"127.0.0.1:{self.port}"
        # The first scrape refreshes the store gauges on the store pool: done here, before any
        # measured window, and not again (the bench's stats_interval).
        while self.workers == 1 and self._metrics().get("msgrelay_store_stats_timestamp_seconds", 1.0) == 0.0:
            if time.monotonic() > deadline:
                raise SystemExit(f"the relay's store gauges were not refreshed within 120 s; see {log}")
            time.sleep(0.05)

    def _metrics(self) -> dict[str, float]:
        """The relay's metrics, each sample keyed by its name and labels as served
        (`name{pool="x"}`); empty when it serves none (an older version)."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/metrics",
                                         headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                page = answer.read().decode("utf-8")
        except OSError:
            return {}
        found = {}
        for line in page.splitlines():
            name, _, value = line.rpartition(" ")
            if name and not line.startswith("#"):
                try:
                    found[name] = float(value)
                except ValueError:
                    pass
        return found

    def pids(self) -> list[int]:
        """The relay's process and, with workers, its worker processes."""
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            children = []
        return [self.proc.pid, *(int(pid) for pid in children)]

    def rss_mib(self) -> float:
        """Resident memory of the relay's process, or of its largest worker."""
        sizes = []
        for pid in self.pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    sizes.append(int(line.split()[1]) / 1024)
        return max(sizes) if sizes else float("nan")

    def cpu_split(self) -> tuple[float, float]:
        """User and kernel CPU time of the relay's process and its workers together."""
        user = system = 0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            user, system = user + int(fields[11]), system + int(fields[12])
        tick = os.sysconf("SC_CLK_TCK")
        return user / tick, system / tick

    def counters(self) -> dict[str, float]:
        """The relay's metrics, for `pool_times` and `full_collections`; empty when it runs
        workers (a scrape would reach one of them)."""
        return self._metrics() if self.workers == 1 else {}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- pre-built requests ------------------------------------------------------------------------

def packets(relay: Relay, recipients: list[Seeded], recipient_key: rsa.RSAPublicKey, count: int) -> list[bytes]:
    """Unique sealed packets of 2 KiB messages, round robin over `recipients`."""
    server_key = load_public_key(relay.server["key"])
    out = []
    for i in range(count):
        to = recipients[i % len(recipients)]
        inner = seal(recipient_key, os.urandom(2048))
        packet = {"id": uuid.uuid4().hex, "user_id": to.user_id, "token": to.token, **inner}
        body = json.dumps(seal(server_key, json.dumps(packet).encode())).encode()
        out.append(loadgen.http_request("POST", "/api/v1/message", relay.host, body))
    return out


def signed(relay: Relay, key: rsa.RSAPrivateKey, user_id: str, method: str, **params: Any) -> bytes:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    values = sign_params(key, {"user_id": user_id, "date": date, "validity": 300, **params}, method,
                         "/api/v1/message", relay.server["name"])
    if method == "GET":
        return loadgen.http_request("GET", "/api/v1/message?" + urlencode(values), relay.host)
    return loadgen.http_request(method, "/api/v1/message", relay.host, json.dumps(values).encode())


# -- one backend -------------------------------------------------------------------------------

def add_recipients(seeder: Seeder, pem: str) -> list[Seeded]:
    """The 200 users of the "accept, 200 recipients" scenarios."""
    return [seeder.add_user(f"many-{i}", pem) for i in range(200)]


def memory_filesystem() -> Optional[Path]:
    """A writable memory filesystem (tmpfs) to hold a reference relay's state, or None."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        fields = line.split()
        if len(fields) > 2 and fields[2] == "tmpfs" and fields[1] == "/dev/shm" and os.access(fields[1], os.W_OK):
            return Path(fields[1])
    return None


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far (every core; /proc/stat less idle and iowait)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class Run:
    def __init__(self, args: argparse.Namespace, backend: str, key: rsa.RSAPrivateKey):
        self.args, self.backend, self.key = args, backend, key
        self.generator = wrkgen.run if args.load_generator == "wrk" else loadgen.run
        self.rows: list[dict[str, Any]] = []
        self.extra: dict[str, float] = {}

    def wanted(self, name: str) -> bool:
        """Whether `--only` (substrings of scenario names) selects this scenario; all without it."""
        return not self.args.only or any(part in name for part in self.args.only)

    def measure(self, relay: Relay, name: str, requests: list[bytes], unit: str = "req/s",
                per_request: int = 1, keep_bodies: bool = False, rate: float = 0.0) -> loadgen.Outcome:
        """Send every request once, as fast as the connections go or paced at `rate` req/s."""
        profiler = self._profile_start(relay, name) if name in self.args.profile_scenario else None
        counters0 = relay.counters()
        (user0, sys0), machine0, wall0 = relay.cpu_split(), machine_busy(), time.perf_counter()
        # Paced scenarios report latency, which a slow disk sets: probe it meanwhile.
        probe = ceilings.DiskProbe(relay.workdir) if rate else None
        try:
            with probe or contextlib.nullcontext():
                outcome = self.generator(relay.port, requests, self.args.connections, self.args.processes,
                                         keep_bodies, rate)
        finally:
            self._profile_stop(profiler)
        (user1, sys1), wall = relay.cpu_split(), max(time.perf_counter() - wall0, 1e-9)
        counters1 = relay.counters()
        pools = pool_times(counters0, counters1, len(requests))
        collections = full_collections(counters0, counters1)
        server_cpu, server_sys = (user1 - user0 + sys1 - sys0) / wall, (sys1 - sys0) / wall
        machine = (machine_busy() - machine0) / wall / (os.cpu_count() or 1)
        errors = sum(n for status, n in outcome.statuses.items() if status != 200)
        self.rows.append({
            "backend": self.backend, "scenario": name, "rate": outcome.rate * per_request, "unit": unit,
            "per_request": per_request,
            "p50_ms": outcome.percentile(0.5) * 1000, "p99_ms": outcome.percentile(0.99) * 1000,
            "p999_ms": outcome.percentile(0.999) * 1000, "ok": outcome.ok, "errors": errors,
            "statuses": outcome.statuses, "server_cpu": server_cpu,
            "server_sys": server_sys, "machine_cpu": machine, "client_cpu": outcome.client_cpu / outcome.elapsed, "offered_rate": rate,
            **(probe.figures() if probe else {}), **({"pools": pools} if pools else {}),
            **({"full_gc": collections} if collections else {}),
        })
        print(f"  {name}: {outcome.rate * per_request:.0f} {unit} ({outcome.ok} ok, {errors} refused)", flush=True)
        return outcome

    def execute(self, workdir: Path, twistd: str) -> None:
        quick = self.args.quick
        n_accept, n_fetch, n_ack = (300, 200, 40) if quick else (2000, 1000, 200)
        n_accept, n_fetch = self.args.accepts or n_accept, self.args.fetches or n_fetch
        pem = public_key_pem(self.key.public_key())
        seeder = (PostgresSeeder(self.args.postgres_dsn) if self.backend == "postgresql"
                  else MaildirSeeder(workdir / "state" / "maildir", self.args.set))
        single = seeder.add_user("single", pem)
        many = add_recipients(seeder, pem)
        small, big = seeder.add_user("small", pem), seeder.add_user("big", pem)
        seeder.fill(small.user_id, 100, 2048)
        seeder.fill(big.user_id, 10_000, 2048)
        seeder.close()
        config = workdir / "relay.toml"
        relay_config(config, self.backend, self.args.postgres_dsn or "", self.args.set)
        relay = Relay(twistd, workdir, config)
        try:
            if self.args.ceilings is None:
                print("  measuring the machine's ceilings", flush=True)
                server_key = (workdir / "state" / "server_key.pem").read_bytes()
                self.args.ceilings = ceilings.measure(server_key, self.key, workdir / "ceiling", 1.0 if quick else 3.0)
                os.sync()  # the write ceiling's clean-up must not slow the first scenario
                self.args.ceilings["http_request"] = self._request_ceiling(relay, max(4 * n_fetch, 400))
            user_pub = self.key.public_key()
            if self.wanted("accept, 200 recipients"):
                self.measure(relay, "accept, 200 recipients", packets(relay, many, user_pub, n_accept), "msgs/s")
            ack = "acknowledge, 10 ids per request"
            sent = None
            if self.wanted("accept, 1 recipient") or self.wanted(ack):
                sent = self.measure(relay, "accept, 1 recipient", packets(relay, [single], user_pub, n_accept),
                                    "msgs/s", keep_bodies=True)
            for label, who in (("100", small), ("10,000", big)):
                for limit in (10, 100):
                    if not self.wanted(f"fetch limit={limit}, {label}-message mailbox"):
                        continue
                    requests = [signed(relay, self.key, who.user_id, "GET", limit=limit) for _ in range(n_fetch)]
                    most = self.measure(relay, f"fetch limit={limit}, {label}-message mailbox", requests).rate
                    if limit == 100:  # the latency target is at half the measured maximum load
                        half = most / 2
                        requests = [signed(relay, self.key, who.user_id, "GET", limit=limit)
                                    for _ in range(max(n_fetch, int(half * (4 if quick else 10))))]
                        self.measure(relay, f"fetch limit={limit}, {label}-message mailbox, 50% load", requests,
                                     rate=half)
            for label, who in (("100", small), ("10,000", big)):
                if self.wanted(f"accept, {label}-message mailbox"):
                    self.measure(relay, f"accept, {label}-message mailbox", packets(relay, [who], user_pub, n_accept),
                                 "msgs/s")
            if sent is not None and self.wanted(ack):
                ids = [json.loads(body)["message_id"] for body in sent.bodies]
                batches = [ids[i:i + 10] for i in range(0, min(len(ids), n_ack * 10), 10)]
                self.measure(relay, ack, [signed(relay, self.key, single.user_id, "DELETE", ids=batch)
                                          for batch in batches], "msgs/s", per_request=10)
            self.extra["rss_mib_after_run"] = relay.rss_mib()
        finally:
            relay.stop()
        if self.backend == "maildir" and self.wanted(IN_MEMORY):
            self._in_memory(twistd, pem, n_accept)
        if self.backend == "postgresql" and self.wanted("worker"):
            self._workers(workdir, twistd, config, single, many, small, n_accept, n_fetch)
        if self.wanted("start-up"):
            self._big_state(workdir, twistd, pem)

    def _request_ceiling(self, relay: Relay, count: int) -> float:
        """Requests/s of the relay's event loop for a request that needs no pool, no store and
        no signature: what any request costs the reactor thread, which bounds a fetch once its
        store and crypto work are cheap (the pool times in the report say when)."""
        request = loadgen.http_request("GET", "/api/v1/server", relay.host)
        outcome = self.generator(relay.port, [request] * count, self.args.connections, self.args.processes, False, 0.0)
        refused = sum(n for status, n in outcome.statuses.items() if status != 200)
        if refused:
            raise SystemExit(f"the request ceiling's GET /api/v1/server was refused {refused} times: {outcome.statuses}")
        return outcome.rate

    def _in_memory(self, twistd: str, pem: str, n_accept: int) -> None:
        """Accept to 200 recipients again with the state directory in memory (tmpfs): the
        relay's own cost of the accept path without the disk's. On virtual machines every
        block write costs the guest CPU as well as time, so the two rows together say how much
        of the machine the disk took from the relay."""
        shm = memory_filesystem()
        if shm is None:
            print(f"  {IN_MEMORY}: skipped, no writable tmpfs at /dev/shm", flush=True)
            return
        workdir = Path(tempfile.mkdtemp(prefix="msgrelay-bench-memory-", dir=shm))
        try:
            seeder = MaildirSeeder(workdir / "state" / "maildir", self.args.set)
            many = add_recipients(seeder, pem)
            seeder.close()
            config = workdir / "relay.toml"
            relay_config(config, "maildir", "", self.args.set)
            relay = Relay(twistd, workdir, config)
            try:
                self.measure(relay, IN_MEMORY, packets(relay, many, self.key.public_key(), n_accept), "msgs/s")
            finally:
                relay.stop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _workers(self, workdir: Path, twistd: str, config: Path, single: Seeded, many: list[Seeded],
                 small: Seeded, n_accept: int, n_fetch: int) -> None:
        """Accept and fetch with 1 and with 2 worker processes on one port (PostgreSQL only).

        Accept to 1 recipient is bounded by that one user's row (every delivery updates its
        counters, and the row stays locked until the commit's WAL flush), whatever the
        number of processes: accept to 200 recipients is the figure that shows scaling."""
        rates: dict[tuple[str, int], float] = {}
        for workers in (1, 2):
            relay = Relay(twistd, workdir, config, workers)
            try:
                user_pub = self.key.public_key()
                label = f"{workers} worker{'s' if workers > 1 else ''}"
                spread = self.measure(relay, f"accept, 200 recipients, {label}",
                                      packets(relay, many, user_pub, n_accept), "msgs/s")
                accepted = self.measure(relay, f"accept, 1 recipient, {label}",
                                        packets(relay, [single], user_pub, n_accept), "msgs/s")
                fetched = self.measure(relay, f"fetch limit=10, 100 msgs, {label}",
                                       [signed(relay, self.key, small.user_id, "GET", limit=10)
                                        for _ in range(n_fetch)])
                rates[("accept", workers)], rates[("fetch", workers)] = accepted.rate, fetched.rate
                rates[("accept_200", workers)] = spread.rate
            finally:
                relay.stop()
        one_worker = {row["scenario"]: row for row in self.rows if row["scenario"].endswith(", 1 worker")}
        for kind, name in (("accept_200", "accept, 200 recipients"), ("accept", "accept, 1 recipient"),
                           ("fetch", "fetch limit=10, 100 msgs")):
            self.extra[f"workers_2_to_1_{kind}"] = rates[(kind, 2)] / max(rates[(kind, 1)], 1e-9)
            # The most any number of processes could give at the same machine CPU a request:
            # what 1 worker left of the machine (the load generator and PostgreSQL share it).
            # A short window's clock ticks (1/100 s a core) can add up to a little over it.
            busy = min(one_worker[f"{name}, 1 worker"]["machine_cpu"], 1.0)
            self.extra[f"workers_machine_bound_{kind}"] = 1 / max(busy, 1e-9)

    def _big_state(self, workdir: Path, twistd: str, pem: str) -> None:
        """Start-up time and memory with many stored messages over many users."""
        users, per_user = (100, 100) if self.args.quick else (1000, 100)
        shutil.rmtree(workdir / "state", ignore_errors=True)
        seeder = (PostgresSeeder(self.args.postgres_dsn) if self.backend == "postgresql"
                  else MaildirSeeder(workdir / "state" / "maildir", self.args.set))
        for i in range(users):
            seeded = seeder.add_user(f"stored-{i}", pem)
            seeder.fill(seeded.user_id, per_user, 200)
        seeder.close()
        relay = Relay(twistd, workdir, workdir / "relay.toml")
        try:
            # The expiry sweep at start-up reads every mailbox; wait until memory settles.
            previous, stable, deadline = -1.0, 0, time.monotonic() + 60
            while stable < 4 and time.monotonic() < deadline:
                time.sleep(0.5)
                rss = relay.rss_mib()
                stable = stable + 1 if abs(rss - previous) < 0.5 else 0
                previous = rss
            self.extra.update({"stored_messages": users * per_user, "stored_users": users,
                               "startup_seconds": relay.startup_seconds, "rss_mib_stored": relay.rss_mib()})
        finally:
            relay.stop()

    def _profile_start(self, relay: Relay, scenario: str) -> Optional[subprocess.Popen]:
        slug = re.sub(r"[^a-z0-9]+", "-", scenario.lower()).strip("-")
        out = f"{self.args.profile}.{self.backend}.{slug}.txt"
        return subprocess.Popen([shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy")),
                                 "record", "--nonblocking", "-p", str(relay.proc.pid), "-r", "200", "-f", "raw", "-o", out,
                                 *(["--gil"] if self.args.profile_gil else [])],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _profile_stop(self, profiler: Optional[subprocess.Popen]) -> None:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(60)


# -- report ------------------------------------------------------------------------------------

#: The reference row of `Run._in_memory`.
IN_MEMORY = "accept, 200 recipients, state in memory"
#: The ceiling each kind of scenario is printed against: accept decrypts a packet; a fetch or an
#: acknowledgement is a signed request whose store and crypto work are small beside the event
#: loop's own work per request (the report's pool times show it), so it is set against the
#: relay's trivial request rate, per request (an acknowledgement carries 10 ids).
BOUND_BY = {"accept": "rsa_oaep_decrypt", "fetch": "http_request", "acknowledge": "http_request"}


def print_report(rows: list[dict[str, Any]], extras: dict[str, dict[str, float]], ceiling: dict[str, float],
                 args: argparse.Namespace) -> None:
    kind = "wrk (bench/wrkgen.lua), threads" if args.load_generator == "wrk" else "bench/loadgen.py, processes"
    print(f"\nmachine: {os.cpu_count()} cores; load generator: {kind}: {args.processes} x "
          f"{args.connections // args.processes} keep-alive connections; relay: {args.twistd}")
    print("ceilings (same run):")
    for key, value in ceiling.items():
        print(f"  {CEILING_NAMES[key]}: {value:.2f}" if key.endswith("_ms") else f"  {CEILING_NAMES[key]}: {value:,.0f}")
    print(f"\n{'backend':<10} {'scenario':<38} {'rate':>9} {'unit':<7} {'p50ms':>7} {'p99ms':>7} "
          f"{'p99.9ms':>8} {'err':>4} {'srvCPU':>6} {'(sys)':>6} {'cliCPU':>6} {'machine':>7}  ratio to ceiling")
    for row in rows:
        bound = BOUND_BY[row["scenario"].split(",")[0].split(" ")[0]]
        ratio = row["rate"] / row.get("per_request", 1) / ceiling[bound]
        print(f"{row['backend']:<10} {row['scenario']:<38} {row['rate']:>9.0f} {row['unit']:<7} {row['p50_ms']:>7.1f} "
              f"{row['p99_ms']:>7.1f} {row['p999_ms']:>8.1f} {row['errors']:>4} {row['server_cpu']:>6.0%} "
              f"{row.get('server_sys', 0):>6.0%} {row['client_cpu']:>6.0%} {row.get('machine_cpu', 0):>7.0%}  {ratio:.2f} of {bound}"
              + (f" (paced at {row['offered_rate']:.0f}/s; disk fdatasync meanwhile p99 {row['disk_p99_ms']:.1f} ms, "
                 f"max {row['disk_max_ms']:.0f} ms)" if row["offered_rate"] else "")
              + (f"; {len(row['rates'])} runs: {row['rates'][0]:.0f}-{row['rates'][-1]:.0f}"
                 if len(row.get("rates", ())) > 1 else ""))
    by_name = {(row["backend"], row["scenario"]): row for row in rows}
    disk, memory = by_name.get(("maildir", "accept, 200 recipients")), by_name.get(("maildir", IN_MEMORY))
    if disk is not None and memory is not None:
        print(f"maildir: relay CPU per message accepted to 200 recipients {cpu_per_message(disk)}; with the state "
              f"in memory {cpu_per_message(memory)}, at {memory['rate'] / max(disk['rate'], 1e-9):.2f}x the rate")
    timed = [row for row in rows if row.get("pools")]
    if timed:
        print("\nper request in the relay's thread pools (ms; waiting for a thread, then running), "
              "single-process relays:")
        for row in timed:
            print(pool_line(row))
    for backend, extra in extras.items():
        line = f"{backend}: relay RSS after the run {extra.get('rss_mib_after_run', 0):.0f} MiB"
        if "startup_seconds" in extra:  # not measured when --only leaves the start-up out
            line += (f"; with {int(extra['stored_messages']):,} stored messages over {int(extra['stored_users']):,} "
                     f"users: start-up {extra['startup_seconds']:.1f} s, RSS {extra['rss_mib_stored']:.0f} MiB")
        print(line)
        if "workers_2_to_1_accept" in extra:
            print(f"{backend}: 2 workers / 1 worker on one port: accept to 200 recipients "
                  f"{extra['workers_2_to_1_accept_200']:.2f}x, accept to 1 {extra['workers_2_to_1_accept']:.2f}x, "
                  f"fetch {extra['workers_2_to_1_fetch']:.2f}x (load generator on the same {os.cpu_count()} cores)")
            if "workers_machine_bound_accept" in extra:
                print(f"{backend}: the machine's CPU that 1 worker left, as a ceiling for more workers (every core "
                      f"busy, same CPU a request): accept to 200 recipients "
                      f"{extra['workers_machine_bound_accept_200']:.2f}x, accept to 1 "
                      f"{extra['workers_machine_bound_accept']:.2f}x, fetch {extra['workers_machine_bound_fetch']:.2f}x")
    print("\nsrvCPU: relay process (and workers) CPU per wall second (100% = one core busy), "
          "(sys) the kernel's part of it (fsync, sockets, thread wake-ups); cliCPU: all load generator "
          "processes together. With other work on the machine, compare ratios rather than absolute figures.")


def pool_totals(counters: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per thread pool, the calls finished and the seconds they waited for a thread and ran,
    all together since start; empty for a relay without these counters (an older version)."""
    totals: dict[str, dict[str, float]] = {}
    for name, value in counters.items():
        match = POOL_SERIES.fullmatch(name)
        if match is not None:
            totals.setdefault(match.group(2), {})[match.group(1)] = value
    return totals


def pool_times(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, dict[str, float]]:
    """Per pool that worked during a scenario: its calls per request, and the milliseconds
    per request they waited for a thread and ran (between two `Relay.counters`)."""
    times = {}
    earlier_totals = pool_totals(before)
    for pool, totals in pool_totals(after).items():
        earlier = earlier_totals.get(pool, {})
        calls = totals.get("calls", 0.0) - earlier.get("calls", 0.0)
        if calls > 0 and requests > 0:
            times[pool] = {"calls": calls / requests,
                           "wait_ms": (totals.get("wait_seconds", 0.0) - earlier.get("wait_seconds", 0.0)) / requests * 1000,
                           "run_ms": (totals.get("run_seconds", 0.0) - earlier.get("run_seconds", 0.0)) / requests * 1000}
    return times


def full_collections(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The full garbage collections during a scenario and the milliseconds they took together
    (between two `Relay.counters`); empty for a relay without these counters."""
    if FULL_GC_COLLECTIONS not in after:
        return {}
    return {"count": after[FULL_GC_COLLECTIONS] - before.get(FULL_GC_COLLECTIONS, 0.0),
            "ms": (after.get(FULL_GC_SECONDS, 0.0) - before.get(FULL_GC_SECONDS, 0.0)) * 1000}


def pool_line(row: dict[str, Any]) -> str:
    """Where a row's requests spent their time in the relay's thread pools, and the full
    garbage collections that stopped them all, for the report."""
    parts = [f"{pool} {t['calls']:.1f} calls, waited {t['wait_ms']:.1f} ran {t['run_ms']:.1f}"
             for pool, t in sorted(row["pools"].items()) if t["calls"] >= 0.05]  # not a stray background call
    gc = row.get("full_gc")
    if gc:
        count = int(gc["count"])
        parts.append(f"{count} full GC{'s' if count != 1 else ''}" + (f" of {gc['ms'] / count:.1f} ms" if count else ""))
    return f"{row['backend']:<10} {row['scenario']:<38} " + "; ".join(parts) + f" (p50 {row['p50_ms']:.1f})"


def cpu_per_message(row: dict[str, Any]) -> str:
    """The relay's CPU per message of an accept row, and the kernel's part of it."""
    rate = max(row["rate"], 1e-9)
    return f"{row['server_cpu'] / rate * 1000:.2f} ms (kernel {row['server_sys'] / rate * 1000:.2f} ms)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and a smaller stored state")
    parser.add_argument("--backend", choices=("maildir", "postgresql", "both"), default=None,
                        help="default: both when a PostgreSQL DSN is given, else maildir")
    parser.add_argument("--postgres-dsn", default=os.environ.get("MSGRELAY_BENCH_POSTGRES_DSN"),
                        help="an EMPTY database the bench may wipe (or $MSGRELAY_BENCH_POSTGRES_DSN)")
    parser.add_argument("--twistd", default=str(Path(sys.executable).with_name("twistd")),
                        help="the twistd whose msgrelay to measure (e.g. another checkout's venv)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--load-generator", choices=("wrk", "python"), default=None,
                        help="wrk with bench/wrkgen.lua (default when wrk is installed) or bench/loadgen.py")
    parser.add_argument("--processes", type=int, default=None,
                        help="wrk threads (default 1) or Python load generator processes (default 2)")
    parser.add_argument("--accepts", type=int, help="packets per accept scenario (default 2000, quick 300)")
    parser.add_argument("--fetches", type=int, help="requests per fetch scenario (default 1000, quick 200)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--profile", metavar="FILE",
                        help="record the relay with py-spy during one scenario, into FILE.<backend>.txt")
    parser.add_argument("--profile-scenario", action="append", default=[],
                        help="a scenario --profile records, into FILE.<backend>.<scenario slug>.txt "
                             "(repeatable; default: \"accept, 200 recipients\")")
    parser.add_argument("--profile-gil", action="store_true",
                        help="sample only the thread holding the GIL (where the serialised Python time goes)")
    parser.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                        help="run only the scenarios whose name holds SUBSTRING (repeatable), e.g. "
                             "--only 'fetch limit=10,'; 'worker' selects the workers comparison, 'start-up' the "
                             "stored-state start-up")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run everything N times (fresh state and relay each time, ceilings too) and report "
                             "each scenario's median run, with the range of its rates")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.NAME=VALUE",
                        help="a relay setting for this run, as TOML (repeatable), e.g. --set pools.store=4")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.load_generator is None:
        args.load_generator = "wrk" if wrkgen.available() else "python"
    elif args.load_generator == "wrk" and not wrkgen.available():
        parser.error("wrk is not installed (apt-get install wrk), use --load-generator python")
    if args.processes is None:
        args.processes = 1 if args.load_generator == "wrk" else 2
    if not args.profile:
        args.profile_scenario = []
    elif not args.profile_scenario:
        args.profile_scenario = ["accept, 200 recipients"]
    backend = args.backend or ("both" if args.postgres_dsn else "maildir")
    backends = ["maildir", "postgresql"] if backend == "both" else [backend]
    if "postgresql" in backends and not args.postgres_dsn:
        parser.error("--postgres-dsn is needed for the PostgreSQL backend")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    runs: dict[str, list[Run]] = {name: [] for name in backends}
    ceiling_runs: list[dict[str, float]] = []
    # Repetitions outermost, so that a machine whose speed drifts (shared hosts do) weighs on
    # every backend alike; the ceilings are measured again in each repetition.
    for repetition in range(args.repeat):
        args.ceilings = None
        for name in backends:
            print(f"{name}:" + (f" (run {repetition + 1} of {args.repeat})" if args.repeat > 1 else ""), flush=True)
            workdir = Path(tempfile.mkdtemp(prefix=f"msgrelay-bench-{name}-"))
            try:
                run = Run(args, name, key)
                run.execute(workdir, args.twistd)
                runs[name].append(run)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        ceiling_runs.append(args.ceilings)
    ceiling = {field: statistics.median(c[field] for c in ceiling_runs) for field in ceiling_runs[0]}
    rows = [row for name in backends for row in median_rows([run.rows for run in runs[name]])]
    extras = {name: {field: statistics.median(run.extra[field] for run in runs[name]) for field in runs[name][0].extra}
              for name in backends}
    print_report(rows, extras, ceiling, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": os.cpu_count(), "twistd": args.twistd, "ceilings": ceiling,
                                               "ceiling_runs": ceiling_runs, "rows": rows, "extras": extras}, indent=1))


def median_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per scenario, the row of the run with the median rate (the lower middle one for an even
    count, so every figure in it is one run's), with every run's rate beside it as `rates`."""
    merged = []
    for rows in zip(*runs):
        assert len({row["scenario"] for row in rows}) == 1, "the repetitions ran different scenarios"
        ordered = sorted(rows, key=lambda row: row["rate"])
        middle = dict(ordered[(len(ordered) - 1) // 2])
        middle["rates"] = [row["rate"] for row in ordered]
        merged.append(middle)
    return merged


if __name__ == "__main__":
    main()
