"""fsck of the server key files: the current key and previous_keys/ (keyrotation's layout).

A broken current key is only reported: moving it away would make the next start create a
new key, a silent change of the relay's identity. Broken or foreign files in previous_keys/
are moved to the quarantine; a key file readable by others is set to 0600 (if it is ours).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..keyrotation import RETIRED_NAME, key_is_external, previous_keys_dir
from ..serverkey import ServerKeyError, read_private_key
from ..settings import Settings
from ..store.quarantine import Finding, Quarantine
from ..wire.keys import fingerprint


def _show(settings: Settings, path: Path) -> str:
    try:
        return str(path.relative_to(settings.state_dir))
    except ValueError:
        return str(path)


def _mode_finding(settings: Settings, path: Path, quarantine: Quarantine, ours: bool) -> list[Finding]:
    mode = os.lstat(path).st_mode & 0o777
    if not mode & 0o077:
        return []
    problem = f"private key has mode {mode:04o}: others may read it"
    if not ours:
        return [Finding(_show(settings, path), problem, "left alone (operator-managed); chmod 600 it")]
    if not quarantine.dry_run:
        os.chmod(path, 0o600)
    return [Finding(_show(settings, path), problem, "would be set to 0600" if quarantine.dry_run else "set to 0600")]


def check_key_files(settings: Settings, quarantine: Quarantine, now: float, min_tmp_age: float,
                    store_initialized: bool) -> tuple[list[Finding], int]:
    """(findings, number of key files checked)."""
    findings: list[Finding] = []
    checked = 0
    key_path = settings.key_path()
    ours = not key_is_external(settings)
    if not key_path.exists():
        if store_initialized:
            findings.append(Finding(_show(settings, key_path), "server key is missing",
                                    "none: the next start creates a NEW key, which clients pinning the old one refuse"))
    else:
        checked += 1
        try:
            read_private_key(key_path)
            findings += _mode_finding(settings, key_path, quarantine, ours)
        except ServerKeyError as e:
            findings.append(Finding(_show(settings, key_path), str(e).split(": ", 1)[-1],
                                    "left in place: restore it from a backup (the relay cannot start with it)"))
    directory = previous_keys_dir(settings)
    try:
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        names = []
    for name in names:
        path = directory / name
        match = RETIRED_NAME.fullmatch(name)
        if match is None:
            try:
                fresh = os.lstat(path).st_mtime >= now - min_tmp_age
            except FileNotFoundError:
                continue
            if name.startswith(".") and fresh:
                continue  # a rotation writing right now
            problem = "leftover of an interrupted write" if name.startswith(".") else "does not belong in previous_keys/"
            moved = quarantine.move(path, problem)
            findings += [moved] if moved else []
            continue
        try:
            checked += 1
            key = read_private_key(path)
        except ServerKeyError as e:
            moved = quarantine.move(path, f"retired key is unusable: {str(e).split(': ', 1)[-1]}")
            findings += [moved] if moved else []
            continue
        if fingerprint(key.public_key()) != match.group(2):
            moved = quarantine.move(path, "retired key does not match the fingerprint in its name")
            findings += [moved] if moved else []
            continue
        findings += _mode_finding(settings, path, quarantine, True)
    return findings, checked
