"""`msgrelay-admin`'s end of the control channel: blocking, short timeouts, no reactor."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from . import control_socket_path


class ControlUnavailable(Exception):
    """No relay answers on the control socket; `str()` says why."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class ControlClient:
    def __init__(self, state_dir: Path, timeout: float = 10.0):
        self.path = control_socket_path(state_dir)
        self.timeout = timeout

    def call(self, method: str, route: str) -> dict[str, Any]:
        """One request; the JSON answer, or ControlUnavailable."""
        connection = _UnixConnection(self.path, self.timeout)
        try:
            connection.request(method, route, headers={"Accept": "application/json"})
            response = connection.getresponse()
            body = response.read()
        except FileNotFoundError:
            raise ControlUnavailable(f"{self.path} does not exist")
        except (OSError, http.client.HTTPException) as e:
            raise ControlUnavailable(f"{self.path}: {getattr(e, 'strerror', None) or e}")
        finally:
            connection.close()
        try:
            answer = json.loads(body)
        except ValueError:
            raise ControlUnavailable(f"{self.path} answered HTTP {response.status} without JSON")
        if response.status != 200:
            raise ControlUnavailable(f"{self.path} answered HTTP {response.status}: {answer.get('error')}")
        return answer
