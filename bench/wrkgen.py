"""Drive the relay with wrk (bench/wrkgen.lua): pre-built requests, each sent exactly once.

wrk is a C load generator: per request it spends a small fraction of the CPU the Python
load generator (bench/loadgen.py) needs, which matters on a machine whose cores the
relay shares with its load. The requests are written to files before the measured window
(one file per wrk thread); the Lua script paces them when a rate is given (an open-loop
schedule, for latency at a fixed load), keeps the 200 bodies when asked, and reports each
thread's window and CPU time. Latency percentiles are wrk's (which adds its usual
coordinated-omission correction for answers slower than twice the mean interval).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from loadgen import Outcome

SCRIPT = Path(__file__).resolve().with_name("wrkgen.lua")


def available() -> bool:
    return shutil.which("wrk") is not None


def _records(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        length = int(data[pos:nl])
        out.append(data[nl + 1:nl + 1 + length])
        pos = nl + 1 + length
    return out


def run(port: int, requests: list[bytes], connections: int = 16, threads: int = 1, keep_bodies: bool = False,
        rate: float = 0.0) -> Outcome:
    """Send every request once over `connections` keep-alive connections from `threads` wrk
    threads, as fast as they go or at `rate` requests/s in all; returns the outcome."""
    threads = max(1, min(threads, len(requests)))
    connections = max(threads, min(connections, len(requests)))
    per_thread = connections // threads
    with tempfile.TemporaryDirectory(prefix="msgrelay-wrk-") as tmp:
        for n in range(threads):
            with open(Path(tmp) / f"requests.{n}", "wb") as f:
                for request in requests[n::threads]:
                    f.write(b"%d\n" % len(request))
                    f.write(request)
        proc = subprocess.Popen(
            ["wrk", "-t", str(threads), "-c", str(per_thread * threads), "-d", "3600s", "-T", "30s",
             "-s", str(SCRIPT), f"http://127.0.0.1:{port}/", "--", tmp, repr(rate / threads),
             "1" if keep_bodies else "0", str(per_thread)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        assert proc.stdout is not None
        lines, finished = [], 0
        for line in proc.stdout:  # each thread prints "done N" once it has every answer
            lines.append(line)
            if line.startswith("done "):
                finished += 1
                if finished == threads:
                    proc.send_signal(signal.SIGINT)  # wrk then stops its threads and reports
        proc.wait()
        output = "".join(lines)
        if finished < threads or proc.returncode != 0:
            raise SystemExit(f"wrk failed ({proc.returncode}):\n{output}")
        bodies: list[bytes] = []
        if keep_bodies:
            for n in range(threads):
                bodies += _records((Path(tmp) / f"bodies.{n}").read_bytes())
    return _outcome(output, bodies)


def _outcome(output: str, bodies: list[bytes]) -> Outcome:
    threads = [dict((k, float(v)) for k, v in re.findall(r"(\w+)=([0-9.]+)", line))
               for line in output.splitlines() if line.startswith("thread ")]
    summary_line = next(line for line in output.splitlines() if line.startswith("summary "))
    summary = dict((k, float(v)) for k, v in re.findall(r"([\w.]+)=([0-9.]+)", summary_line))
    answered = int(sum(t["answered"] for t in threads))
    errors = int(summary["status_errors"] + summary["socket_errors"] + summary["timeouts"])
    out = Outcome(
        started=min(t["started"] for t in threads),
        ended=max(t["ended"] for t in threads),
        client_cpu=sum(t["cpu"] for t in threads),
        bodies=bodies,
        statuses={200: answered - errors, **({0: errors} if errors else {})},
        fixed_percentiles={0.5: summary["50"] / 1e6, 0.99: summary["99"] / 1e6, 0.999: summary["99.9"] / 1e6},
        answered_ok=answered - errors,
    )
    return out
