"""Server key rotation: retired keys kept on disk for a grace period, and a running relay told.

Layout in the state directory (directory 0700, files 0600, each written atomically)::

    previous_keys/<until>-<fingerprint>.pem   a retired private key, accepted until <until>

    key_transitions.json                      old key -> new key statements (keytransitions.py)

`until` (POSIX seconds) is part of the file name, so a key and its deadline can never be
separated by a crash. `rotate` writes the retired copy first, then the transition signed by
the old key, and only then replaces the current key: interrupted in between, the relay still
has its current key (a retired copy of the current key is ignored, and a transition to a key
that never became current leads nowhere). A running relay notices a changed key file or listing on its
`KeyringWatcher` timer and reloads; the same timer deletes keys whose grace period is over.
"""

from __future__ import annotations

import fcntl
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Optional

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.logger import Logger

from .keytransitions import TRANSITIONS_FILE, append_transition, load_transitions, transitions_path
from .serverkey import (
    SERVER_KEY_BITS, PreviousKey, ServerKeyError, ServerKeyring, load_or_create, read_private_key,
    write_private_key,
)
from .settings import EVERY_RELOAD, Reload, Settings
from .wire.keys import fingerprint
from .wire.transitions import sign_transition

log = Logger()

PREVIOUS_DIR = "previous_keys"
RETIRED_NAME = re.compile(r"([0-9]{1,15})-([0-9a-f]{64})\.pem")


@dataclass(frozen=True)
class RetiredKeyFile:
    """One file of previous_keys/, described by its name alone (the key is not read)."""

    path: Path
    until: int
    fingerprint: str


@dataclass(frozen=True)
class Rotation:
    new_fingerprint: str
    old_fingerprint: Optional[str]  # None: there was no key yet
    until: Optional[int]  # when the old key stops being accepted


def previous_keys_dir(settings: Settings) -> Path:
    return settings.state_dir / PREVIOUS_DIR


def key_is_external(settings: Settings) -> bool:
    """Whether server.key_file names a key outside the state directory (operator-managed)."""
    if not settings.server.key_file:
        return False
    key = settings.key_path().resolve()
    return not key.is_relative_to(settings.state_dir.resolve())


def list_retired(directory: Path) -> list[RetiredKeyFile]:
    """Retired key files by name, oldest deadline first; temporary and foreign names skipped."""
    found = []
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    for name in names:
        match = RETIRED_NAME.fullmatch(name)
        if match:
            found.append(RetiredKeyFile(directory / name, int(match.group(1)), match.group(2)))
    return sorted(found, key=lambda f: (f.until, f.fingerprint))


def load_previous(directory: Path, current: rsa.RSAPrivateKey, now: float) -> list[PreviousKey]:
    """Unexpired retired keys other than `current`, one per fingerprint (the latest deadline).

    An unreadable file is logged and skipped: it must not stop the relay, and fsck reports it.
    """
    current_fp = fingerprint(current.public_key())
    chosen: dict[str, PreviousKey] = {}
    for entry in list_retired(directory):
        if entry.until <= now or entry.fingerprint == current_fp:
            continue
        try:
            key = read_private_key(entry.path)
        except ServerKeyError as e:
            log.warn("ignoring retired server key: {problem}", problem=str(e))
            continue
        if fingerprint(key.public_key()) != entry.fingerprint:
            log.warn("ignoring retired server key {path}: its name does not match its key", path=str(entry.path))
            continue
        if entry.fingerprint not in chosen or chosen[entry.fingerprint].until < entry.until:
            chosen[entry.fingerprint] = PreviousKey(key, entry.until)
    return sorted(chosen.values(), key=lambda p: p.until)


def load_keyring(settings: Settings, now: float) -> ServerKeyring:
    """The relay's keyring at start-up: the current key (created if absent) and retired ones."""
    current = load_or_create(settings.key_path())
    return ServerKeyring(current, load_previous(previous_keys_dir(settings), current, now),
                         load_transitions(transitions_path(settings)))


@contextmanager
def rotation_lock(directory: Path) -> Iterator[None]:
    """Serialise admin commands that change the retired keys (flock on the directory)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def retire(directory: Path, key: rsa.RSAPrivateKey, until: int) -> RetiredKeyFile:
    """Keep `key` accepted until `until`: write it (atomic, 0600) and drop older copies of it."""
    fp = fingerprint(key.public_key())
    path = directory / f"{until}-{fp}.pem"
    write_private_key(path, key)
    for entry in list_retired(directory):
        if entry.fingerprint == fp and entry.path != path:
            _remove(entry.path)
    return RetiredKeyFile(path, until, fp)


def rotate(settings: Settings, grace: int, now: float) -> Rotation:
    """Make a new key current and keep the old one accepted for `grace` seconds.

    Refused (ServerKeyError) for a key outside the state directory: that file belongs to the
    operator's key management, which replaces it; `keep-key` keeps the old one accepted.
    """
    key_path = settings.key_path()
    if key_is_external(settings):
        raise ServerKeyError(
            f"server.key_file {key_path} is outside the state directory, so rotate-key leaves it "
            "alone: run `msgrelay-admin keep-key` on it (with --successor NEW_KEY), then install the new key there yourself"
        )
    if not settings.state_dir.is_dir():
        raise ServerKeyError(f"state directory {settings.state_dir} does not exist")
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=SERVER_KEY_BITS)
    directory = previous_keys_dir(settings)
    with rotation_lock(directory):
        old_fp: Optional[str] = None
        until: Optional[int] = None
        if key_path.exists():
            old_key = read_private_key(key_path)
            until = int(now) + grace
            old_fp = retire(directory, old_key, until).fingerprint
            endorse(settings, old_key, new_key.public_key(), now)
        try:
            write_private_key(key_path, new_key)
        except OSError as e:
            raise ServerKeyError(f"{key_path}: cannot write the new server key: {e.strerror}")
        prune(directory, now)
    return Rotation(fingerprint(new_key.public_key()), old_fp, until)


def endorse(settings: Settings, old_key: rsa.RSAPrivateKey, new_key: rsa.RSAPublicKey, now: float) -> None:
    """Write the transition old -> new, signed by the old key (caller holds the rotation lock)."""
    entry = sign_transition(old_key, new_key, settings.server.name, now)
    try:
        append_transition(transitions_path(settings), entry)
    except OSError as e:
        raise ServerKeyError(f"{transitions_path(settings)}: cannot write the key transition: {e.strerror}")


def retire_file(settings: Settings, source: Path, grace: int, now: float,
                successor: Optional[rsa.RSAPublicKey] = None) -> RetiredKeyFile:
    """Copy an operator-managed key into previous_keys/ before the operator replaces it
    (and, given its successor, write the transition to it)."""
    key = read_private_key(source)
    directory = previous_keys_dir(settings)
    if not settings.state_dir.is_dir():
        raise ServerKeyError(f"state directory {settings.state_dir} does not exist")
    with rotation_lock(directory):
        entry = retire(directory, key, int(now) + grace)
        if successor is not None:
            endorse(settings, key, successor, now)
        return entry


def destroy_retired(settings: Settings, now: float, only: Optional[str] = None,
                    before_grace_ends: bool = False) -> tuple[list[RetiredKeyFile], list[RetiredKeyFile]]:
    """Delete retired private keys whose grace period is over (or, forced, still running).

    Returns (destroyed, kept: still inside their grace period). `only` limits it to one
    fingerprint. The public key transitions stay: they are what lets holders of an old pin
    follow the rotation.
    """
    directory = previous_keys_dir(settings)
    with rotation_lock(directory):
        chosen = [e for e in list_retired(directory) if only is None or e.fingerprint == only]
        destroyed = [e for e in chosen if e.until <= now or before_grace_ends]
        for entry in destroyed:
            _remove(entry.path)
    return destroyed, [e for e in chosen if e not in destroyed]


def prune(directory: Path, now: float) -> list[RetiredKeyFile]:
    """Delete retired keys whose grace period is over; returns those removed."""
    removed = [entry for entry in list_retired(directory) if entry.until <= now]
    for entry in removed:
        _remove(entry.path)
    return removed


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class KeyringWatcher:
    """Keeps a running relay's keyring in step with its key files (called on a short timer).

    The keyring object is changed in place, so every holder of it sees the new keys.
    A SIGHUP re-reads the key files at once, whatever else it changes.
    """

    settings_sections: ClassVar[frozenset[str]] = EVERY_RELOAD

    def __init__(self, keyring: ServerKeyring, key_path: Path, directory: Path, clock: Any,
                 transitions: Optional[Path] = None):
        self.keyring = keyring
        self.key_path = key_path
        self.directory = directory
        self.clock = clock
        self.transitions = transitions if transitions is not None else directory.parent / TRANSITIONS_FILE
        self._seen = self._signature()
        self._failed: Optional[tuple] = None

    def _signature(self) -> tuple:
        """Cheap change detector: the key and transitions files' identities, the retired keys' names."""
        return (_identity(self.key_path), tuple(entry.path.name for entry in list_retired(self.directory)),
                _identity(self.transitions))

    def reconfigure(self, reload: Reload) -> None:
        self.check()

    def check(self) -> bool:
        """Prune expired keys, then reload if the files changed. True if the keyring changed."""
        now = self.clock.seconds()
        changed = self._prune(now)
        signature = self._signature()
        if signature != self._seen and signature != self._failed:
            changed = self.reload(now, signature) or changed
        return changed

    def reload(self, now: Optional[float] = None, signature: Optional[tuple] = None) -> bool:
        """Read the key files again now (also for SIGHUP). A broken current key keeps the old one."""
        now = self.clock.seconds() if now is None else now
        signature = self._signature() if signature is None else signature
        try:
            current = read_private_key(self.key_path)
        except ServerKeyError as e:
            log.error("server key not reloaded, still using {fingerprint}: {problem}",
                      fingerprint=self.keyring.fingerprint, problem=str(e))
            self._failed = signature
            return False
        try:
            transitions = load_transitions(self.transitions)
        except ServerKeyError as e:
            log.error("key transitions not reloaded: {problem}", problem=str(e))
            transitions = self.keyring.transitions
        before = self.keyring.fingerprint
        self.keyring.transitions = transitions
        self.keyring.current = current
        self.keyring.previous = load_previous(self.directory, current, now)
        self._seen, self._failed = signature, None
        if self.keyring.fingerprint != before:
            log.info("server key is now {fingerprint} (was {before})", fingerprint=self.keyring.fingerprint, before=before)
        log.info("server keyring reloaded: {count} previous key(s) accepted", count=len(self.keyring.previous))
        return True

    def _prune(self, now: float) -> bool:
        kept = [p for p in self.keyring.previous if now < p.until]
        dropped = len(self.keyring.previous) - len(kept)
        self.keyring.previous = kept
        removed: list[RetiredKeyFile] = []
        try:
            removed = prune(self.directory, now)
        except OSError as e:
            log.warn("cannot remove an expired server key from {directory}: {reason}",
                     directory=str(self.directory), reason=e.strerror)
        for entry in removed:
            log.info("removed server key {fingerprint}: its grace period ended", fingerprint=entry.fingerprint)
        # Our own removals are not a change to reload for; anything else still is.
        gone = {entry.path.name for entry in removed}
        self._seen = (self._seen[0], tuple(name for name in self._seen[1] if name not in gone), self._seen[2])
        return dropped > 0


def _identity(path: Path) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_ino, st.st_mtime_ns, st.st_size)
