"""The local control channel between `msgrelay-admin` and a running relay.

Small HTTP with JSON bodies over a UNIX socket in the state directory,
`<state_dir>/run/control.sock`: the folder is 0700 and the socket 0600, both owned by the
relay's user, so only that user (and root) can reach it. Routes (all under `/v1`):

    GET  /v1/status                       pid, server name, version
    GET  /v1/queues                       live per-destination federation state
    POST /v1/queues/<destination>/retry   forget that queue's backoff and send now
    POST /v1/keys/reload                  read the server key files again (after rotate-key)
"""

from __future__ import annotations

from pathlib import Path

RUN_DIR = "run"
SOCKET_NAME = "control.sock"


def control_dir(state_dir: Path) -> Path:
    return Path(state_dir) / RUN_DIR


def control_socket_path(state_dir: Path) -> Path:
    return control_dir(state_dir) / SOCKET_NAME
