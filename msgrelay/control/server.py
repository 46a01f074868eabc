"""The relay's end of the control channel (see the package docstring for the routes)."""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote

from twisted.application.service import Service
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from .. import __version__
from . import control_dir, control_socket_path

log = Logger(namespace="msgrelay.control")

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlError(Exception):
    """The control socket cannot be set up safely; `str()` says why."""


def prepare_directory(directory: Path) -> None:
    """Make `directory` (0700) or check it: ours, a real directory, closed to others."""
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(directory)
    except OSError as e:
        raise ControlError(f"{directory}: {e.strerror}")
    if not stat.S_ISDIR(info.st_mode):
        raise ControlError(f"{directory} is not a directory")
    if info.st_uid != os.geteuid():
        raise ControlError(f"{directory} belongs to another user (uid {info.st_uid})")
    if info.st_mode & 0o077:
        raise ControlError(f"{directory} has mode {stat.S_IMODE(info.st_mode):04o}; it must be 0700")


def peer_uid(sock: Any) -> Optional[int]:
    """The uid of the process at the other end of a UNIX socket (Linux), else None."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except (AttributeError, OSError):
        return None
    return int(_PEERCRED.unpack(raw)[1])


class ControlResource(Resource):
    """JSON answers only; every unknown path is a 404 with a JSON body."""

    isLeaf = True

    def __init__(self, server_name: str, federation: Any, keyring_watcher: Any):
        super().__init__()
        self.server_name = server_name
        self.federation = federation
        self.keyring_watcher = keyring_watcher

    def render(self, request: Any) -> bytes:
        uid = peer_uid(getattr(request.channel.transport, "getHandle", lambda: None)())
        if uid is not None and uid not in (0, os.geteuid()):
            return self._answer(request, 403, {"error": "only the relay's own user or root may use this socket"})
        method = request.method.decode("ascii", "replace")
        parts = [unquote(p.decode("utf-8", "replace")) for p in request.postpath if p]
        try:
            code, body = self._route(method, parts)
        except Exception as e:
            log.failure("control request {method} {path} failed", method=method, path="/".join(parts))
            code, body = 500, {"error": f"{type(e).__name__}: {e}"}
        return self._answer(request, code, body)

    def _route(self, method: str, parts: list[str]) -> tuple[int, dict[str, Any]]:
        if parts[:1] != ["v1"]:
            return 404, {"error": "unknown path"}
        route = parts[1:]
        if method == "GET" and route == ["status"]:
            return 200, {"pid": os.getpid(), "server_name": self.server_name, "version": __version__}
        if method == "GET" and route == ["queues"]:
            return 200, self.federation.status_document()
        if method == "POST" and len(route) == 3 and route[0] == "queues" and route[2] == "retry":
            destination = route[1].lower()
            retrying = self.federation.retry_now(destination)
            queue = self.federation.queues.queues.get(destination)
            return 200, {"destination": destination, "retrying": retrying,
                         "queued": len(queue.entries) if queue is not None else 0}
        if method == "POST" and route == ["keys", "reload"]:
            changed = self.keyring_watcher.reload()
            log.info("control: server key files read again at the operator's request (changed: {changed})",
                     changed=changed)
            return 200, {"changed": bool(changed), "fingerprint": self.keyring_watcher.keyring.fingerprint}
        return 404, {"error": f"no route {method} /{'/'.join(parts)}"}

    @staticmethod
    def _answer(request: Any, code: int, body: dict[str, Any]) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(body).encode("utf-8")


class ControlService(Service):
    """Listens on `<state_dir>/run/control.sock` while the relay runs.

    The outbox lock, taken before this starts, guarantees no other relay uses this state
    directory, so a socket file left by a crashed process is removed and made anew.
    """

    def __init__(self, state_dir: Path, resource: ControlResource, reactor: Any):
        self.setName("control")
        self.directory = control_dir(state_dir)
        self.path = control_socket_path(state_dir)
        self.site = Site(resource)
        self.site.displayTracebacks = False
        self.site.noisy = False
        self.reactor = reactor
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        try:
            prepare_directory(self.directory)
            if os.path.lexists(self.path):
                os.unlink(self.path)
        except (ControlError, OSError) as e:
            log.error("control socket not available: {problem}; msgrelay-admin falls back to files",
                      problem=str(e))
            return
        endpoint = UNIXServerEndpoint(self.reactor, str(self.path), mode=0o600)
        d = endpoint.listen(self.site)
        d.addCallback(self._listening)
        d.addErrback(lambda f: log.error("control socket {path} not available: {problem}", path=str(self.path),
                                         problem=f.getErrorMessage()))

    def _listening(self, port: Any) -> None:
        self.port = port
        log.info("control socket at {path}", path=str(self.path))

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


def build_control(settings: Any, federation: Any, keyring_watcher: Any, reactor: Any) -> ControlService:
    """The control channel of a relay with these settings, federation and key watcher."""
    resource = ControlResource(settings.server.name, federation, keyring_watcher)
    return ControlService(settings.state_dir, resource, reactor)
