"""What a relay was started with, recorded in its state directory for `msgrelay-admin`.

`twistd msgrelay --server-name ... --peer ...` settings live only on its command line, yet
`msgrelay-admin` needs them: the server name is what a key transition is signed for, and the
peer table is what `queue retry-now` delivers with. At each start the relay writes
`<state_dir>/relay-options.json` (its `--config` path and command-line overrides, no
secrets: none of those settings is secret); the admin command reads it back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from .durable import replace_durably
from .settings import BY_NAME

RECORD_NAME = "relay-options.json"
#: Not recorded: where the record itself lives.
_SKIPPED = frozenset({"server.state_dir"})


def record_path(state_dir: Path) -> Path:
    return Path(state_dir) / RECORD_NAME


def write_record(state_dir: Path, config: Optional[str], overrides: dict[str, Any]) -> None:
    """Record the config path (absolute) and the command-line overrides of this start."""
    kept = {name: value for name, value in overrides.items()
            if name not in _SKIPPED and name in BY_NAME and not BY_NAME[name].secret}
    document = {"config": os.path.abspath(config) if config else None, "overrides": kept}
    Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    replace_durably(record_path(state_dir), (json.dumps(document, indent=2) + "\n").encode("utf-8"))


def read_record(state_dir: Path) -> tuple[Optional[str], dict[str, Any]]:
    """(config path, overrides) the relay last started with; (None, {}) if none or unreadable."""
    try:
        document = json.loads(record_path(state_dir).read_bytes())
    except (OSError, ValueError):
        return None, {}
    if not isinstance(document, dict):
        return None, {}
    config = document.get("config")
    overrides = document.get("overrides")
    overrides = {k: v for k, v in overrides.items() if k in BY_NAME and k not in _SKIPPED} \
        if isinstance(overrides, dict) else {}
    return (config if isinstance(config, str) else None), overrides
