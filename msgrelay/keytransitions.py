"""The relay's key transitions on disk: `<state_dir>/key_transitions.json`.

Each rotation appends one entry signed by the old key (msgrelay.wire.transitions). The file
holds only public material, and outlives the retired private keys: a client or peer that
pinned a key long gone still follows the chain to the current one. Entries are never
removed by the relay; `/api/v1/server` lists those younger than
`server.key_transition_keep` seconds. Written whole, atomically and durably, under the
rotation lock.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from twisted.logger import Logger

from .durable import replace_durably
from .serverkey import ServerKeyError
from .settings import Settings
from .wire.dates import parse_date
from .wire.errors import ProtocolError
from .wire.transitions import Transition, TransitionError

TRANSITIONS_FILE = "key_transitions.json"
log = Logger()


def transitions_path(settings: Settings) -> Path:
    return settings.state_dir / TRANSITIONS_FILE


def load_transitions(path: Path) -> list[Transition]:
    """Entries in the file, oldest first; a missing file is none, a damaged one an error."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ServerKeyError(f"{path}: cannot read the key transitions: {e.strerror}")
    try:
        obj: Any = json.loads(raw)
        return [Transition.from_json(entry) for entry in obj["transitions"]]
    except (ValueError, KeyError, TypeError, TransitionError) as e:
        raise ServerKeyError(f"{path}: not a key transitions file: {e}")


def append_transition(path: Path, entry: Transition) -> None:
    """Add one entry (the caller holds the rotation lock)."""
    entries = load_transitions(path) + [entry]
    data = json.dumps({"transitions": [e.to_json() for e in entries]}, indent=2) + "\n"
    replace_durably(path, data.encode("ascii"), mode=0o644)


def listed(entries: Iterable[Transition], now: float, keep_seconds: int) -> list[dict[str, str]]:
    """The `key_transitions` of the server info: entries made within `keep_seconds`."""
    shown = []
    for entry in entries:
        try:
            made = parse_date(entry.date)
        except ProtocolError:
            continue
        if now - made <= keep_seconds:
            shown.append(entry.to_json())
    return shown
