"""The README's commands, docs/walkthrough.md and the federation example of docs/federation.md,
run verbatim on a fresh copy of the repository with nothing beside it (no ../shared).

The ```sh blocks are extracted from the markdown and run with bash, exactly as written: a block
whose last command runs a relay in the foreground (`twistd -n`/`--nodaemon`) is the "first
terminal" and runs in the background until its port answers; the blocks after it are the
"second terminal" and run in one bash session (so `cd` and variables carry over), each
followed by a marker line with its exit status. The copy installs itself with the README's
first command into its own `.venv` (from the configured package index), as a new user would.
The README's test command is what `.ci/run` runs, verbatim (checked here, not run again:
that would be the whole suite inside itself). Fixed ports (8080, 8090, 8081, 8082, 8443) are
the documented ones; each must be free first.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT = 900  # the first pip install of a fresh venv on a busy machine
RUN_TIMEOUT = 300
MARKER = "@@block-exit"


def sh_blocks(markdown: str) -> list[str]:
    """Every ```sh block, dedented (blocks inside list items are indented)."""
    return [textwrap.dedent(body) for _, body in re.findall(r"^( *)```sh\n(.*?)^\1```", markdown, re.S | re.M)]


def section(markdown: str, start: str, end: str) -> str:
    return markdown[markdown.index(start):markdown.index(end)]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}:\n{read(proc)}")
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout:g} s" + (f"\n{read(proc)}" if proc else ""))


def read(proc: subprocess.Popen) -> str:
    log = getattr(proc, "log_path", None)
    return Path(log).read_text(errors="replace")[-4000:] if log else ""


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/server", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The repository's files (tracked and new, not ignored) in a folder with nothing beside it."""
    root = tmp_path_factory.mktemp("fresh-clone")
    target = root / "msgrelay"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    assert not (root / "shared").exists() and sorted(p.name for p in root.iterdir()) == ["msgrelay"]
    return target


class Terminal:
    """A foreground relay command, run in the background in its own process group."""

    def __init__(self, script: str, cwd: Path, port: int, log_path: Path):
        wait_until(lambda: not port_open(port), 60, f"port {port} to be free (something else uses it)")
        self.port = port
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=clean_env())
        self.proc.log_path = log_path  # type: ignore[attr-defined]
        wait_until(lambda: answers(port), INSTALL_TIMEOUT, f"the relay on port {port}", self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        assert "Traceback" not in read(self.proc), read(self.proc)


def clean_env() -> dict[str, str]:
    """No virtualenv or msgrelay variables of the test run leak into the documented commands."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MSGRELAY_", "VIRTUAL_ENV", "PYTHON")) and k != "XDG_CONFIG_HOME"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "/.venv/" not in p)
    return env


def run_blocks(blocks: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[str, list[int]]:
    """All blocks in one bash session; returns the output and each block's exit status."""
    script = "".join(f"{block}\necho \"{MARKER} $?\"\n" for block in blocks)
    done = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          env={**clean_env(), **(env or {})}, stdin=subprocess.DEVNULL)
    output = done.stdout + done.stderr
    codes = [int(code) for code in re.findall(rf"^{MARKER} (\d+)$", done.stdout, re.M)]
    assert "Traceback" not in output, output
    assert len(codes) == len(blocks), output
    return output, codes


@pytest.fixture(scope="module")
def readme(clone) -> str:
    return (clone / "README.md").read_text()


@pytest.fixture(scope="module")
def first_relay(clone, readme) -> Iterator[Terminal]:
    """The README's first command, verbatim: make .venv, install, start the relay on 8080."""
    top = sh_blocks(readme)[0]
    commands = [line for line in top.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2 and "twistd --nodaemon --pidfile= msgrelay" in commands[0]
    terminal = Terminal(commands[0], clone, 8080, clone.parent / "first-command.log")
    yield terminal
    terminal.stop()


def test_readme_first_command_starts_a_relay_and_the_test_command_is_what_ci_runs(first_relay, clone, readme):
    info = urllib.request.urlopen("http://127.0.0.1:8080/api/v1/server", timeout=5).read()
    assert b'"fingerprint"' in info and (clone / "msgrelay-data" / "server_key.pem").exists()
    test_command = [line for line in sh_blocks(readme)[0].splitlines() if line.strip() and not line.startswith("#")][1]
    assert test_command.endswith(".venv/bin/pytest")
    assert test_command in (clone / ".ci" / "run").read_text().splitlines()


def test_readme_session_by_hand_runs_against_the_first_relay(first_relay, clone, readme):
    code = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    done = subprocess.run([str(clone / ".venv" / "bin" / "python"), "-c", code], cwd=clone, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, env=clean_env())
    assert done.returncode == 0, done.stderr
    assert "'message_id'" in done.stdout and "{'deleted': 1}" in done.stdout


def test_readme_five_minute_demo(first_relay, clone, readme):
    first_relay.stop()  # the demo starts its own relay on the same port
    blocks = sh_blocks(section(readme, "## Five minutes with msgrelay-client", "## A client session, by hand"))
    assert len(blocks) == 2
    relay = Terminal(blocks[0], clone, 8080, clone.parent / "demo-relay.log")
    try:
        output, codes = run_blocks([blocks[1]], clone / "demo")
    finally:
        relay.stop()
    assert codes == [0], output
    assert "Dinner at eight?" in output and "Eight is perfect." in output


def test_walkthrough(clone):
    blocks = sh_blocks((clone / "docs" / "walkthrough.md").read_text())
    relay = Terminal(blocks[0], clone, 8090, clone.parent / "walkthrough-relay.log")
    try:
        output, codes = run_blocks(blocks[1:], clone)
    finally:
        relay.stop()
    assert codes == [0] * len(codes), output
    for expected in ("your address:", "added bob:", "alice: Hi Bob, it's Alice. Dinner at eight?",
                     "Rue de la Paix 12", '"text": "See you!"', "revoked 1 token", "NOT DELIVERED", "exit 4"):
        assert expected in output, f"{expected!r} missing from:\n{output}"


def test_federation_example_on_one_machine(first_relay, clone):
    """It runs from a clone where the README's first command made .venv (first_relay did)."""
    blocks = sh_blocks(section((clone / "docs" / "federation.md").read_text(),
                               "### Two relays on one machine", "## The outbox"))
    assert len(blocks) == 5
    for port in (8081, 8082, 8443):
        wait_until(lambda port=port: not port_open(port), 60, f"port {port} to be free")
    demo = clone / "fed-demo"
    try:
        output, codes = run_blocks(blocks, clone)
    finally:
        # The example's own last step stops both relays; give them time to exit before
        # stopping what is left (a failed step), so no relay is signalled twice while it
        # shuts down (twistd would log ReactorNotRunning).
        deadline = time.monotonic() + 30
        while any(demo.glob("*.pid")) and time.monotonic() < deadline:
            time.sleep(0.3)
        for pidfile in demo.glob("*.pid"):
            try:
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass
    assert codes == [0] * 5, output
    assert "alice: Hello from relay A" in output and "bob: Hello back from relay B" in output
    wait_until(lambda: not any(demo.glob("*.pid")), 30, "both relays to stop")
    logs = (demo / "a.log").read_text() + (demo / "b.log").read_text()
    assert "federation: delivered" in logs
    assert "Traceback" not in logs, logs[max(0, logs.index("Traceback") - 1500):][:5000]
    assert "federation allowlist has no peers yet" in logs  # the chicken-and-egg start, then SIGHUP
