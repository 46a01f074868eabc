"""What a store check found, and the quarantine folder where damaged entries are moved aside.

Nothing found damaged is ever deleted: it is renamed into ``<state>/quarantine/<UTC time>/``
under its path relative to the state directory (so it can be inspected or moved back), and
an ``fsck-report.json`` beside it says why. A rename keeps it on the same filesystem.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..durable import create_durably, fsync_dir
from .maildir_layout import DIR_MODE

QUARANTINE = "quarantine"


@dataclass(frozen=True)
class Finding:
    path: str  # relative to the state directory
    problem: str
    action: str
    damage: bool = True


@dataclass
class FsckReport:
    findings: list[Finding] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    quarantine: Optional[str] = None  # folder the damaged entries went to, if any

    @property
    def damaged(self) -> bool:
        return any(f.damage for f in self.findings)

    def to_json(self) -> dict[str, Any]:
        return {
            "damaged": self.damaged, "checked": self.checked, "quarantine": self.quarantine,
            "findings": [asdict(f) for f in self.findings],
        }


class Quarantine:
    """Moves entries aside under one timestamped folder of the state directory (or only says so)."""

    def __init__(self, state_dir: Path, dry_run: bool, now: float):
        self.state_dir = state_dir
        self.dry_run = dry_run
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        self.folder = state_dir / QUARANTINE / stamp
        suffix = 1
        while self.folder.exists():
            suffix += 1
            self.folder = state_dir / QUARANTINE / f"{stamp}-{suffix}"
        self.used = False

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.state_dir))

    def move(self, path: Path, problem: str) -> Optional[Finding]:
        """Move `path` aside; None if it vanished meanwhile (nothing to report)."""
        rel = self.relative(path)
        if self.dry_run:
            return Finding(rel, problem, "would be moved to quarantine") if os.path.lexists(path) else None
        target = self.folder / rel
        target.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return None
        self.used = True
        fsync_dir(path.parent)
        fsync_dir(target.parent)
        return Finding(rel, problem, f"moved to {self.relative(target)}")

    def write_report(self, report: FsckReport) -> None:
        """A record of why each entry is there, beside the entries; names the folder in `report`."""
        if self.used:
            report.quarantine = self.relative(self.folder)
            data = json.dumps(report.to_json(), indent=2, sort_keys=True).encode("utf-8")
            create_durably(self.folder / "fsck-report.json", data)
