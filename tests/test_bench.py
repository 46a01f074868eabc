"""`bench/run.py` end to end, small: the bench's own code keeps working as the relay changes.

The figures themselves are not checked (speed is bench/'s subject, never a test's): what is
checked is that every request was answered 200, that the ceilings were measured, and that
the report names each row's bounding ceiling. Each run is bounded in requests (`--accepts`,
`--fetches`) and in time (the subprocess timeout), and talks only to loopback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest

from relayproc import twistd_path
from test_postgres_relay import database  # noqa: F401  (the fixture: a fresh database per test)

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"
CEILINGS = {"rsa_oaep_decrypt", "pss_verify", "durable_write_1", "durable_write_8", "durable_write_kernel_ms",
            "http_request"}


def bench(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--twistd", twistd_path(), "--json", str(out),
         "--accepts", "30", "--fetches", "30", *args],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def check_rows(figures: dict[str, Any], expected: dict[str, Optional[int]]) -> None:
    """Every expected scenario ran once with its count of requests (None: at least 30, as a
    paced scenario's count follows the rate measured before it), each answered 200, and
    latencies are ordered."""
    assert set(figures["ceilings"]) == CEILINGS and all(v > 0 for v in figures["ceilings"].values())
    rows = {row["scenario"]: row for row in figures["rows"]}
    assert set(rows) == set(expected), sorted(rows)
    for name, requests in expected.items():
        row = rows[name]
        if requests is None:
            requests = row["ok"]
            assert requests >= 30, row
        assert (row["ok"], row["errors"], row["statuses"]) == (requests, 0, {"200": requests}), row
        assert row["rate"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"] <= row["p999_ms"], row


@pytest.mark.parametrize("generator", ["python", "wrk"])
def test_maildir_accept_fetch_and_acknowledge(tmp_path, generator):
    """Both load generators: wrk with bench/wrkgen.lua (CI installs wrk), and bench/loadgen.py."""
    if generator == "wrk":
        assert shutil.which("wrk"), "wrk is not installed (apt-get install wrk; .ci/run does)"
    figures, printed = bench(tmp_path, "--backend", "maildir", "--load-generator", generator,
                             "--only", "acknowledge", "--only", "100-message mailbox", "--only", "accept, 200 recipients")
    # Acknowledging needs accepted messages: accept to 1 recipient runs with it, and three
    # requests of 10 ids acknowledge the 30 messages it delivered. "accept, 200 recipients"
    # also selects its reference row with the state in memory: Debian, and so CI, mounts a
    # tmpfs at /dev/shm.
    check_rows(figures, {"accept, 200 recipients": 30, "accept, 200 recipients, state in memory": 30,
                         "accept, 1 recipient": 30, "fetch limit=10, 100-message mailbox": 30,
                         "fetch limit=100, 100-message mailbox": 30,
                         "fetch limit=100, 100-message mailbox, 50% load": None,
                         "accept, 100-message mailbox": 30, "acknowledge, 10 ids per request": 3})
    assert "relay CPU per message accepted to 200 recipients" in printed, printed
    assert "with the state in memory" in printed, printed
    paced = next(row for row in figures["rows"] if row["offered_rate"])
    assert 0 < paced["disk_p50_ms"] <= paced["disk_p99_ms"] <= paced["disk_max_ms"], paced
    assert "disk fdatasync meanwhile p99" in printed, printed
    for bound in ("of rsa_oaep_decrypt", "of http_request"):
        assert bound in printed, printed
    assert figures["extras"]["maildir"]["rss_mib_after_run"] > 10
    # Where requests spent their time, from the relay's pool counters: every accepted packet
    # was opened by one crypto call and stored by one store call (the store pool may also have
    # run an expiry sweep meanwhile); a fetch only reads the store.
    rows = {row["scenario"]: row for row in figures["rows"]}
    for name in ("accept, 200 recipients", "accept, 1 recipient", "accept, 200 recipients, state in memory"):
        pools = rows[name]["pools"]
        assert pools["crypto"]["calls"] == 1.0 and 1.0 <= pools["store"]["calls"] <= 31 / 30, pools
        assert pools["crypto"]["run_ms"] > 0 and pools["store"]["run_ms"] > 0, pools
    assert "crypto" not in rows["fetch limit=10, 100-message mailbox"]["pools"]
    # One store call a fetch once the relay knows the user's key; until then the user is
    # looked up first, so the first 16 fetches (one per connection, sent together) may take
    # two: (16 * 2 + 14) / 30 at most, where without the known key every fetch takes two.
    assert 1.0 <= rows["fetch limit=10, 100-message mailbox"]["pools"]["store"]["calls"] <= 46 / 30 + 0.01, rows
    # An acknowledgement likewise: one store call, two before the relay knows the key (three
    # before acknowledgements had their own store call).
    assert 1.0 <= rows["acknowledge, 10 ids per request"]["pools"]["store"]["calls"] <= 2.0, rows
    assert "per request in the relay's thread pools" in printed, printed
    # The full garbage collections during each window, from the relay's counters: a count and
    # their time, each one a stall of every request in flight.
    for row in figures["rows"]:
        gc = row["full_gc"]
        assert gc["count"] == int(gc["count"]) >= 0 and gc["ms"] >= 0 and (gc["ms"] > 0) == (gc["count"] > 0), row
    assert " full GC" in printed, printed
    assert "start-up" not in printed  # not measured with --only, so not reported as 0.0 s


def test_postgresql_one_and_two_workers(tmp_path, database):  # noqa: F811
    """The workers comparison: `twistd msgrelay --workers 1` and `--workers 2` on one port."""
    figures, printed = bench(tmp_path, "--backend", "postgresql", "--postgres-dsn", database,
                             "--load-generator", "python", "--only", "worker")
    expected = {}
    for label in ("1 worker", "2 workers"):
        expected.update({f"accept, 200 recipients, {label}": 30, f"accept, 1 recipient, {label}": 30,
                         f"fetch limit=10, 100 msgs, {label}": 30})
    check_rows(figures, expected)
    extras = figures["extras"]["postgresql"]
    rows = {row["scenario"]: row for row in figures["rows"]}
    for kind, name in (("accept_200", "accept, 200 recipients"), ("accept", "accept, 1 recipient"),
                       ("fetch", "fetch limit=10, 100 msgs")):
        assert extras[f"workers_2_to_1_{kind}"] > 0
        # What the machine left 1 worker: 1 over how busy it was, at least 1x (a short window's
        # clock ticks can add up to more than fully busy, which counts as fully busy).
        busy = rows[f"{name}, 1 worker"]["machine_cpu"]
        assert extras[f"workers_machine_bound_{kind}"] == pytest.approx(1 / min(busy, 1.0)), (busy, extras)
    assert "2 workers / 1 worker on one port" in printed
    assert "as a ceiling for more workers" in printed, printed
    # A scrape would reach one worker of two: the pool times are left out there, not halved.
    assert all("pools" not in row for row in figures["rows"] if row["scenario"].endswith("2 workers"))
    assert all("pools" in row for row in figures["rows"] if row["scenario"].endswith("1 worker"))
