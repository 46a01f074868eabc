"""The systemd units: `systemd-analyze verify` passes, the hardening holds, and socket
activation through Twisted's `systemd:` endpoint serves requests.

`systemd-analyze verify` checks that ExecStart's program exists. The shipped unit names
/opt/msgrelay/bin/twistd (the documented install prefix), which a test machine does not
have, so the units are verified in a temporary directory with that prefix, and only that
prefix, replaced by this virtual environment's bin directory. A missing systemd-analyze is a
failure, not a skip: CI machines have it (Debian's `systemd` package).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from apiclient import sync_request
from relayproc import free_port, twistd_path

pytestmark = pytest.mark.slow

UNITS = Path(__file__).parent.parent / "systemd"
PREFIX = "/opt/msgrelay/bin/"


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"{name} is not installed; the systemd unit tests need it (apt-get install systemd)")
    return path


def installed_units(tmp_path: Path) -> Path:
    """The shipped units with the install prefix pointed at this virtual environment."""
    target = tmp_path / "units"
    target.mkdir()
    venv_bin = str(Path(twistd_path()).parent) + "/"
    for unit in ("msgrelay.service", "msgrelay.socket"):
        text = (UNITS / unit).read_text()
        (target / unit).write_text(text.replace(PREFIX, venv_bin))
    return target


def test_units_pass_systemd_analyze_verify(tmp_path):
    analyze = tool("systemd-analyze")
    units = installed_units(tmp_path)
    result = subprocess.run([analyze, "verify", "msgrelay.service", "msgrelay.socket"],
                            capture_output=True, text=True, cwd=units, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


def test_shipped_units_differ_only_by_the_missing_install_prefix(tmp_path):
    """Verifying the files exactly as shipped fails for one reason only: no /opt/msgrelay here."""
    analyze = tool("systemd-analyze")
    if Path(PREFIX + "twistd").exists():
        expected_rc = 0
    else:
        expected_rc = 1
    result = subprocess.run([analyze, "verify", str(UNITS / "msgrelay.service"), str(UNITS / "msgrelay.socket")],
                            capture_output=True, text=True, timeout=120)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == expected_rc, output
    if expected_rc:
        assert output.splitlines() == [f"msgrelay.service: Command {PREFIX}twistd is not executable: "
                                       "No such file or directory"]


def test_service_unit_runs_the_documented_command_hardened(tmp_path):
    analyze = tool("systemd-analyze")
    text = (UNITS / "msgrelay.service").read_text()
    settings = [line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")]
    values: dict[str, list[str]] = {}
    for key, value in settings:
        values.setdefault(key, []).append(value)
    assert values["ExecStart"] == [
        PREFIX + "twistd --nodaemon --pidfile= msgrelay --config /etc/msgrelay/msgrelay.toml"]
    assert values["User"] == ["msgrelay"] and values["StateDirectory"] == ["msgrelay"]
    assert values["Restart"] == ["on-failure"]
    for key, expected in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                          "PrivateTmp": "yes", "ReadWritePaths": "/var/lib/msgrelay",
                          "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
                          "AmbientCapabilities": "CAP_NET_BIND_SERVICE"}.items():
        assert values[key] == [expected], key
    assert "@system-service" in values["SystemCallFilter"]
    # systemd's own exposure score of the unit as written (0 = locked down, 10 = none);
    # --threshold is in tenths: fail above 2.0.
    units = installed_units(tmp_path)
    result = subprocess.run([analyze, "security", "--offline=true", "--threshold=20", "--no-pager",
                             str(units / "msgrelay.service")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Overall exposure level for msgrelay.service: 1." in result.stdout, result.stdout


def test_socket_activation_serves_through_the_systemd_endpoint(tmp_path):
    """systemd-socket-activate binds the port, and starts the relay on the first connection
    with the socket passed as LISTEN_FDS, exactly as msgrelay.socket does."""
    activate = tool("systemd-socket-activate")
    port = free_port()
    # --fdname: systemd always sets LISTEN_FDNAMES (the socket unit's name by default), and
    # Twisted ignores LISTEN_FDS without it; systemd-socket-activate sets it only when asked.
    command = [activate, "--listen", f"127.0.0.1:{port}", "--fdname=msgrelay.socket",
               twistd_path(), "--nodaemon", "--pidfile=", f"--logfile={tmp_path / 'relay.log'}", "msgrelay",
               "--listen", "systemd:domain=INET:index=0", "--state-dir", str(tmp_path / "state"),
               "--server-name", "relay.test"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        answer = None
        while time.monotonic() < deadline and answer is None:
            try:
                # The first connection waits in the listen queue while the relay starts.
                answer = sync_request("GET", f"http://127.0.0.1:{port}/api/v1/server", timeout=30)
            except OSError:
                time.sleep(0.2)
        assert answer is not None and answer.status == 200 and answer.body["name"] == "relay.test"
        assert sync_request("GET", f"http://127.0.0.1:{port}/api/v1/health").body == {"status": "ok"}
        log = (tmp_path / "relay.log").read_text()
        assert "listening on systemd:domain=INET:index=0" in log
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_systemd_endpoint_without_a_passed_socket_is_one_line(tmp_path):
    result = subprocess.run([twistd_path(), "--nodaemon", "--pidfile=", "msgrelay", "--listen",
                             "systemd:domain=INET:index=0", "--state-dir", str(tmp_path / "s")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2 and output.count("\n") == 0, output
    assert "no such socket was passed by systemd" in output
