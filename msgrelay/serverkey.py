"""The relay's own RSA key: created once (0600), reused, and kept as a keyring for rotation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.logger import Logger

from .durable import replace_durably
from .wire.keys import fingerprint, public_key_pem
from .wire.transitions import Transition

SERVER_KEY_BITS = 3072
log = Logger()


class ServerKeyError(Exception):
    """The key file exists but cannot be used; str() names the file and the problem."""


@dataclass
class PreviousKey:
    """A rotated-out key still accepted for envelopes until `until` (POSIX seconds)."""

    key: rsa.RSAPrivateKey
    until: int


@dataclass
class ServerKeyring:
    current: rsa.RSAPrivateKey
    previous: list[PreviousKey] = field(default_factory=list)
    #: Every key transition written by rotations, oldest first (public; kept after the keys go).
    transitions: list[Transition] = field(default_factory=list)

    @property
    def public_pem(self) -> str:
        return public_key_pem(self.current.public_key())

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.current.public_key())

    def decryption_keys(self, now: float) -> list[rsa.RSAPrivateKey]:
        """The current key, then every previous key still inside its grace period."""
        return [self.current] + [p.key for p in self.previous if now < p.until]


def write_private_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    """Write a PEM private key atomically with mode 0600 from its first byte."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    replace_durably(path, pem, mode=0o600)


def read_private_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ServerKeyError(f"{path}: cannot read the server key: {e.strerror}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ServerKeyError(f"{path}: not an unencrypted PEM private key: {e}")
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ServerKeyError(f"{path}: the server key must be RSA")
    return key


def load_or_create(path: Path) -> rsa.RSAPrivateKey:
    """Load the key at `path`, or create a 3072-bit one there on first start."""
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warn("server key {path} has mode {mode:o}; it should be 0600", path=str(path), mode=mode)
        return read_private_key(path)
    key = rsa.generate_private_key(public_exponent=65537, key_size=SERVER_KEY_BITS)
    try:
        write_private_key(path, key)
    except OSError as e:
        raise ServerKeyError(f"{path}: cannot create the server key: {e.strerror}")
    log.info("created a new {bits}-bit server key at {path}", bits=SERVER_KEY_BITS, path=str(path))
    return key
