"""schemathesis against docs/openapi.yaml and a real `twistd msgrelay`, bounded for CI.

CI runs a fixed seed and a small number of examples per operation (about two minutes on a
loaded two-core machine). The long run is the same test with more examples:

    MSGRELAY_FUZZ_EXAMPLES=200 MSGRELAY_FUZZ_MAX_TIME=1800 MSGRELAY_FUZZ_SEED=7 \
        .venv/bin/pytest -q -s tests/test_fuzz_openapi.py -k finds_nothing

It prints the number of cases and the outcome; docs/testing.md records the last long run.
Checks: no 5xx, every refusal a JSON error with a section 9 errno (`section9_error` in
tests/fuzz_hooks.py), status codes, content types, headers and bodies as the spec says,
schema-violating requests refused, unsupported methods answered 405 with `Allow`, and no
traceback in the relay's log. tests/fuzz_hooks.py signs most schema-valid signed requests
and turns most valid sends into genuine packets, so the handlers behind authentication are
fuzzed too, not only the shape checks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from apiclient import SyncClient, User
from relayproc import RelayProcess

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "openapi.yaml"
EXAMPLES = int(os.environ.get("MSGRELAY_FUZZ_EXAMPLES", "25"))
SEED = int(os.environ.get("MSGRELAY_FUZZ_SEED", "20261127"))
#: Seconds: when set, schemathesis keeps fuzzing until this budget is spent (the long run).
MAX_TIME = os.environ.get("MSGRELAY_FUZZ_MAX_TIME")
CHECKS = ("no_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance,negative_data_rejection,unsupported_method,allow_header_conformance,"
          "section9_error")
#: Loopback is exempt from the per-address limits and the per-user limits are out of reach,
#: so that the fuzzer meets the handlers rather than 429; the limits have tests of their own.
CONFIG = """
[rate_limits]
exempt = ["127.0.0.1/32"]
fetch_per_user = "1000000/1"
token_per_user = "1000000/1"
"""


def st_command() -> str:
    return str(Path(sys.executable).with_name("st"))


def run_schemathesis(tmp_path: Path, operations: list[str], exclude: bool) -> dict:
    """Start a relay, run `st` on the chosen operations, and return its figures."""
    (tmp_path / "fuzz.toml").write_text(CONFIG)
    relay = RelayProcess(tmp_path / "state", extra_args=["--config", str(tmp_path / "fuzz.toml")])
    with relay:
        client = SyncClient.connect(relay.url)
        user = User(rsa.generate_private_key(public_exponent=65537, key_size=2048))
        assert client.call("POST", "/api/v1/user", {"key": user.pem}).status == 200
        token = client.mint(user)
        selection = [arg for op in operations for arg in ("--exclude-operation-id" if exclude else "--include-operation-id", op)]
        env = dict(os.environ,
                   SCHEMATHESIS_HOOKS="fuzz_hooks",
                   PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
                   MSGRELAY_FUZZ_URL=relay.url, MSGRELAY_FUZZ_TOKEN=token,
                   MSGRELAY_FUZZ_KEY=user.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()).decode())
        command = [st_command(), "run", str(SPEC), "--url", relay.url, "--checks", CHECKS,
                   "--max-examples", str(EXAMPLES), "--seed", str(SEED), "--workers", "1",
                   "--request-timeout", "20", "--suppress-health-check", "all", "--no-color",
                   "--exclude-path", "/metrics",  # off on this relay; tests/test_openapi.py covers it
                   *(["--max-time", MAX_TIME] if MAX_TIME else []), *selection]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=max(600, EXAMPLES * 20, int(MAX_TIME or 0) * 2))
        log = whole_log(relay)
    output = done.stdout + done.stderr
    figures = {"exit": done.returncode, "output": output, "log": log}
    print(summary(figures))
    return figures


def whole_log(relay: RelayProcess) -> str:
    """The relay's log including the files twistd rotated away (every megabyte)."""
    rotated = sorted(relay.log_path.parent.glob(relay.log_path.name + ".*"),
                     key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    return "".join(p.read_text(errors="replace") for p in rotated) + relay.log()


def summary(figures: dict) -> str:
    lines = [line for line in figures["output"].splitlines()
             if any(word in line for word in ("test cases", "passed", "failed", "generated", "API operations", "Seed"))]
    return "\n".join(lines[-12:])


def answers(log: str) -> Counter:
    """(method, path, status) of every request in the relay's access log."""
    return Counter(re.findall(r"\[msgrelay\.access#info\] ([A-Z]+) (/\S*) (\d{3}) ", log))


def assert_clean(figures: dict) -> None:
    assert figures["exit"] == 0, figures["output"][-6000:]
    for marker in ("Traceback", "Unhandled Error", "unexpected error", "processing failed"):
        assert marker not in figures["log"], f"relay log has {marker!r}:\n{figures['log'][-4000:]}"


def test_schemathesis_finds_nothing(tmp_path):
    from fuzz_hooks import SIGNED

    figures = run_schemathesis(tmp_path, [], exclude=True)
    assert_clean(figures)
    seen = answers(figures["log"])
    print("answers by status:", sorted(seen.items()))
    # The hooks did their job: every signed operation and sending got past authentication.
    for method, path in sorted(SIGNED | {("POST", "/api/v1/message")}):
        assert seen[(method, path, "200")] > 0, f"no {method} {path} was accepted: {sorted(seen.items())}"

