"""Benchmark: messages accepted per second, and fetch time, against a real `twistd msgrelay`.

Usage: python bench/accept_throughput.py [--messages N] [--senders C] [--state DIR]
Starts a relay on a free loopback port with a fresh maildir (or DIR), sends N packets from C
threads, fetches and acknowledges them, and prints the figures. Every 200 here is fsynced.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlencode

from cryptography.hazmat.primitives.asymmetric import rsa

from msgrelay.wire.envelope import open_envelope, seal
from msgrelay.wire.keys import load_public_key, public_key_pem, user_id_for_key
from msgrelay.wire.signing import sign_params


def call(method: str, url: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=30) as r:
        return json.load(r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--state", default=None)
    args = parser.parse_args()

    workdir = Path(args.state or tempfile.mkdtemp(prefix="msgrelay-bench-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    twistd = str(Path(sys.executable).with_name("twistd"))
    config = workdir / "bench.toml"  # one client on loopback: exempt it from the rate limits
    config.write_text('[rate_limits]\nexempt = ["127.0.0.1"]\n')
    relay = subprocess.Popen(
        [twistd, "--nodaemon", "--pidfile=", f"--logfile={workdir}/relay.log", "msgrelay",
         "--listen", f"tcp:{port}:interface=127.0.0.1", "--state-dir", str(workdir / "state"),
         "--server-name", "bench.test", "--config", str(config)],
        cwd=workdir,
    )
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        server = None
        for _ in range(300):
            if relay.poll() is not None:
                raise SystemExit(f"the relay exited with {relay.returncode}; see {workdir}/relay.log")
            try:
                server = call("GET", base + "/server")
                break
            except OSError:
                time.sleep(0.1)
        if server is None:
            raise SystemExit("the relay did not answer within 30 s")
        server_key = load_public_key(server["key"])
        me = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        user_id = user_id_for_key(me.public_key())
        call("POST", base + "/user", {"key": public_key_pem(me.public_key())})

        def signed(method: str, path: str, **params):
            now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            return sign_params(me, {"user_id": user_id, "date": now, "validity": 60, **params},
                               method, "/api/v1" + path, server["name"])

        token = call("POST", base + "/token", signed("POST", "/token"))["token"]
        inner = seal(me.public_key(), b'{"text":"' + b"x" * 512 + b'"}')
        envelopes = [seal(server_key, json.dumps({"id": uuid.uuid4().hex, "user_id": user_id,
                                                  "token": token, **inner}).encode())
                     for _ in range(args.messages)]
        latencies: list[float] = []
        lock = threading.Lock()

        failures: list[str] = []

        def sender(batch):
            for envelope in batch:
                t0 = time.perf_counter()
                try:
                    call("POST", base + "/message", envelope)
                except OSError as e:  # urllib's HTTPError included: count it, keep going
                    with lock:
                        failures.append(str(e))
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t0)

        batches = [envelopes[i::args.senders] for i in range(args.senders)]
        threads = [threading.Thread(target=sender, args=(b,)) for b in batches]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        latencies.sort()
        accepted = len(latencies)
        print(f"accepted {accepted} of {args.messages} messages from {args.senders} senders in {elapsed:.2f}s: "
              f"{accepted / elapsed:.0f} msg/s ({len(failures)} refused or failed)")
        print(f"accept latency p50 {statistics.median(latencies) * 1000:.1f} ms, "
              f"p99 {latencies[int(len(latencies) * 0.99) - 1] * 1000:.1f} ms")

        fetched = 0
        started = time.perf_counter()
        while True:
            answer = call("GET", base + "/message?" + urlencode(signed("GET", "/message", limit=1000)))
            messages = json.loads(open_envelope([me], answer))
            if not messages:
                break
            fetched += len(messages)
            call("DELETE", base + "/message", signed("DELETE", "/message", ids=[m["id"] for m in messages]))
        elapsed = time.perf_counter() - started
        print(f"fetched and acknowledged {fetched} messages in {elapsed:.2f}s: {fetched / elapsed:.0f} msg/s")
    finally:
        relay.terminate()
        relay.wait()
        if args.state is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
