"""Logs: one structured line per request; `--log-format json` / `log.format = "json"` writes one
JSON object per line with the event's fields; `log.level` filters."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from twisted.logger import LogLevel, PredicateResult
from twisted.python.failure import Failure

from apiclient import SyncClient, sync_request
from msgrelay.logs import WORKER_OUTPUT, LevelPredicate, TextFormatter, json_line, json_time, worker_tag
from relayproc import RelayProcess, free_port, twistd_path


def access_event(**extra):
    return {
        "log_format": "{method} {path} {status} errno={errno} {duration_ms}ms",
        "log_level": LogLevel.info, "log_namespace": "msgrelay.access", "log_time": 1700000000.25,
        "log_logger": object(), "log_source": None,
        "method": "POST", "path": "/api/v1/message", "status": 403, "errno": 120, "duration_ms": 3.2,
        "client": "192.0.2.9", **extra,
    }


def test_json_line_carries_the_structured_fields():
    line = json_line(access_event())
    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert record == {
        "time": "2023-11-14T22:13:20.250Z", "level": "info", "namespace": "msgrelay.access",
        "message": "POST /api/v1/message 403 errno=120 3.2ms",
        "method": "POST", "path": "/api/v1/message", "status": 403, "errno": 120, "duration_ms": 3.2,
        "client": "192.0.2.9",
    }


def test_json_line_survives_odd_values_failures_and_legacy_events():
    try:
        _ = 1 / 0
    except ZeroDivisionError:
        failure = Failure()
    record = json.loads(json_line({**access_event(peer=object(), lines=["a\nb"]), "log_failure": failure,
                                   "log_level": LogLevel.error}))
    assert record["level"] == "error" and "ZeroDivisionError" in record["traceback"]
    assert record["peer"].startswith("<object") and record["lines"] == ["a\nb"]
    legacy = {"message": ("hello",), "isError": 0, "system": "-", "time": 1.0, "log_time": 1.0,
              "log_format": "{log_text}", "log_text": "hello", "log_namespace": "log_legacy",
              "log_level": LogLevel.info}
    assert json.loads(json_line(legacy))["message"] == "hello"
    assert set(json.loads(json_line(legacy))) == {"time", "level", "namespace", "message"}


def test_fast_text_and_json_lines_are_what_twisted_writes():
    """The access log's formatter (a per-second timestamp cache, str.format_map) writes
    Twisted's classic lines exactly, for plain events and for those it hands back."""
    from datetime import datetime, timezone

    from twisted.logger import formatEventAsClassicLogText

    text = TextFormatter()
    # the second's edges, where rounding to microseconds moves to the next second
    stamps = [1700000000.25, 1700000000.9999996, 1700000000.9999994, 1700000001.0000004, 1750000000.5]
    events = [access_event(log_time=t) for t in stamps] + [
        access_event(log_format="multi\nline {status!r:>6} {client}"),
        access_event(log_format="{status()}", status=lambda: 201),  # call syntax: Twisted's own formatter
        access_event(log_format="{0}"),  # unformattable: Twisted's message about it
        access_event(log_format="on {system}", log_system="legacy-system"),
        access_event(log_failure=Failure(ValueError("boom"))),
        {"log_format": None, "log_time": 1.0},
    ]
    for event in events:
        assert text(event) == formatEventAsClassicLogText(event), event
    for stamp in stamps + [0.0005, 1700000000.0]:
        expected = datetime.fromtimestamp(stamp, timezone.utc).isoformat(timespec="milliseconds")
        assert json_time(stamp) == expected.replace("+00:00", "Z")


def test_level_predicate_follows_the_setting_on_every_event():
    from msgrelay.settings import resolve

    def reload_to(level):
        old = resolve({}, {"server.name": "relay.test"})
        predicate.reconfigure(old.reload_to(resolve({"log.level": level}, {"server.name": "relay.test"})))

    predicate = LevelPredicate("info")
    debug = {"log_level": LogLevel.debug, "log_namespace": "x"}
    info = {"log_level": LogLevel.info, "log_namespace": "x"}
    warn = {"log_level": LogLevel.warn, "log_namespace": "x"}
    assert [predicate(e) for e in (debug, info, warn)] == [PredicateResult.no, PredicateResult.maybe,
                                                           PredicateResult.maybe]
    reload_to("warn")
    assert predicate(info) == PredicateResult.no and predicate(warn) == PredicateResult.maybe
    # What a reload did is always shown.
    assert predicate({"log_level": LogLevel.info, "log_namespace": "msgrelay.settings"}) == PredicateResult.maybe
    reload_to("debug")
    assert predicate(debug) == PredicateResult.maybe


def test_a_workers_lines_say_whose_and_the_parent_writes_them_as_they_are():
    tag = worker_tag(1, 4242)
    text = TextFormatter(tag)
    assert text(access_event()) == TextFormatter()(access_event()).replace(
        "[msgrelay.access#info] ", "[msgrelay.access#info] worker 1 pid 4242: ")
    # Events Twisted's own formatter writes get the tag in the same place.
    legacy = text(access_event(log_format="on {log_system}", log_system="legacy-system"))
    assert legacy is not None and "[legacy-system] worker 1 pid 4242: on legacy-system" in legacy
    failed = text(access_event(log_failure=Failure(ValueError("boom"))))
    assert failed is not None and "] worker 1 pid 4242: POST /api/v1/message" in failed.splitlines()[0]
    record = json.loads(json_line(access_event(worker="the event's own"), tag=tag))
    assert record["worker"] == 1 and record["worker_pid"] == 4242 and record["status"] == 403
    # The parent passes a read's worth of lines on unchanged, in either format, at any level.
    lines = json_line(access_event(), tag=tag) + "2026-01-01T00:00:00+0000 [x#info] worker 1 pid 4242: hi\n"
    output = {"log_format": "{worker_output}", "worker_output": lines, "log_level": LogLevel.info,
              "log_namespace": WORKER_OUTPUT, "log_time": 1.0}
    assert TextFormatter()(output) == json_line(output) == lines
    assert LevelPredicate("critical")(output) == PredicateResult.maybe


@pytest.mark.slow
def test_log_format_json_option_writes_json_lines(tmp_path, users):
    relay = RelayProcess(tmp_path / "state", extra_args=["--log-format", "json"]).start()
    try:
        client = SyncClient.connect(relay.url)
        client.call("POST", "/api/v1/user", {"key": users[0].pem})
        token = client.mint(users[0])
        assert client.call("POST", "/api/v1/message", client.packet_envelope(users[0], token)).status == 200
        client.call("GET", "/api/v1/user/nosuchuser")
    finally:
        relay.stop()
    records = [json.loads(line) for line in relay.log().splitlines()]  # every line is JSON
    access = [r for r in records if r["namespace"] == "msgrelay.access"]
    assert {(r["method"], r["path"], r["status"], r["errno"]) for r in access} >= {
        ("GET", "/api/v1/server", 200, None),
        ("POST", "/api/v1/user", 200, None),
        ("POST", "/api/v1/token", 200, None),
        ("POST", "/api/v1/message", 200, None),
        ("GET", "/api/v1/user/nosuchuser", 400, 106),
    }
    assert all(isinstance(r["duration_ms"], float) and r["client"] == "127.0.0.1" for r in access)
    assert token not in relay.log() and "signature" not in relay.log()


@pytest.mark.slow
def test_config_json_format_and_level_on_stdout_as_under_systemd(tmp_path):
    """No --logfile with --nodaemon: logs go to stdout (the journal, under systemd)."""
    config = tmp_path / "relay.toml"
    config.write_text('[log]\nformat = "json"\nlevel = "warn"\n')
    port = free_port()
    stdout_path = tmp_path / "stdout.log"
    stdout = open(stdout_path, "w")
    proc = subprocess.Popen(
        [twistd_path(), "--nodaemon", "--pidfile=", "msgrelay", "--config", str(config),
         "--listen", f"tcp:{port}:interface=127.0.0.1", "--state-dir", str(tmp_path / "state"),
         "--server-name", "relay.test"],
        stdout=stdout, stderr=subprocess.PIPE, cwd=tmp_path, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if sync_request("GET", f"http://127.0.0.1:{port}/api/v1/server", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        assert sync_request("GET", f"http://127.0.0.1:{port}/nothing").status == 404
        config.write_text('[log]\nformat = "json"\nlevel = "info"\n')
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "reload done" not in stdout_path.read_text():
            assert time.monotonic() < deadline, "no reload logged"
            time.sleep(0.05)
        assert sync_request("GET", f"http://127.0.0.1:{port}/again").status == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        stdout.close()
    out = stdout_path.read_text()
    records = [json.loads(line) for line in out.splitlines()]
    paths = [r.get("path") for r in records if r["namespace"] == "msgrelay.access"]
    assert paths == ["/again"]  # warn hid the earlier ones; the reload to info showed this one
    assert not [r for r in records[:3] if r["level"] == "info" and r["namespace"] == "msgrelay.service"]
    assert any("log.level changed from 'warn' to 'info'" in r["message"] for r in records)


def test_bad_log_options_stop_with_one_line(tmp_path):
    for args, named in ((["--log-format", "xml"], "log.format"), (["--log-level", "loud"], "log.level")):
        result = subprocess.run([twistd_path(), "--nodaemon", "--pidfile=", "msgrelay", *args],
                                capture_output=True, text=True, cwd=tmp_path, timeout=60)
        output = (result.stdout + result.stderr).strip()
        assert result.returncode == 2 and output.count("\n") == 0 and named in output, output
