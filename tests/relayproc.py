"""Run the real `twistd -n msgrelay` as a subprocess for end-to-end tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional, Sequence


KEYS = Path(__file__).parent / "keys"
_SERVER_NAMES: list[str] = []


def seed_server_key(state_dir: Path, server_name: str) -> None:
    """Give a relay about to start in a new state directory a fixed test key (tests/keys/),
    instead of having it generate a 3072-bit key. Distinct names get distinct keys (up to
    four). An existing state directory is left alone: its relay keeps or creates its key."""
    state_dir = Path(state_dir)
    if state_dir.exists():
        return
    if server_name not in _SERVER_NAMES:
        _SERVER_NAMES.append(server_name)
    index = _SERVER_NAMES.index(server_name) % 4
    state_dir.mkdir(parents=True, mode=0o700)
    target = state_dir / "server_key.pem"
    shutil.copyfile(KEYS / f"server-{index}.pem", target)
    os.chmod(target, 0o600)


def interruptible() -> None:
    """preexec_fn for a child that the test stops with SIGINT, as Ctrl-C at a terminal would.

    A shell without job control starts background commands with SIGINT ignored, and children
    inherit that; Python then keeps it ignored and Twisted installs no SIGINT handler. So a
    test run from such a shell (`pytest ... &`, nohup) would see the child ignore the signal.
    Reset it to the default, as in a terminal's foreground process group.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def twistd_path() -> str:
    """The twistd installed beside the running interpreter (the test venv's)."""
    candidate = Path(sys.executable).with_name("twistd")
    return str(candidate) if candidate.exists() else shutil.which("twistd") or "twistd"


class RelayProcess:
    """One relay process on a loopback port, with its state directory and log file."""

    def __init__(
        self,
        state_dir: Path,
        server_name: str = "relay.test",
        port: Optional[int] = None,
        extra_args: Sequence[str] = (),
        scheme: str = "http",
        listen: Optional[str] = None,
        env: Optional[dict[str, str]] = None,
        preexec_fn: Optional[Callable[[], None]] = None,
        seed_key: bool = True,
    ):
        self.state_dir = Path(state_dir)
        self.server_name = server_name
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.scheme = scheme
        self.listen = listen or f"tcp:{self.port}:interface=127.0.0.1"
        self.log_path = self.state_dir.parent / f"{self.state_dir.name}-{self.port}.log"
        self.env = env
        self.preexec_fn = preexec_fn  # e.g. to lower the relay's resource limits
        self.proc: Optional[subprocess.Popen] = None
        if seed_key:
            seed_server_key(self.state_dir, server_name)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            twistd_path(), "--nodaemon", "--pidfile=", f"--logfile={self.log_path}", "msgrelay",
            "--listen", self.listen, "--state-dir", str(self.state_dir),
            "--server-name", self.server_name, *self.extra_args,
        ]

    def start(self, timeout: float = 30.0) -> "RelayProcess":
        env = dict(os.environ)
        env.update(self.env or {})
        # Run outside the source tree: twistd puts its working directory on sys.path, and the
        # test must exercise the installed package, not the checkout.
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=self.state_dir.parent,
            preexec_fn=self.preexec_fn,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
                raise RuntimeError(f"relay exited with {self.proc.returncode}: {output}\n{self.log()}")
            if self.scheme == "http":
                try:
                    with urllib.request.urlopen(self.url + "/api/v1/server", timeout=2) as response:
                        json.load(response)
                    return self
                except (urllib.error.URLError, ConnectionError, OSError):
                    pass
            else:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return self
                except OSError:
                    pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"relay did not answer within {timeout}s\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> "RelayProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
