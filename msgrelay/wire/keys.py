"""RSA keys, user ids and fingerprints (docs/protocol.md section 2)."""

from __future__ import annotations

import base64
import functools
import hashlib
import re

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .errors import ProtocolError

MIN_MODULUS_BITS = 2048
MAX_MODULUS_BITS = 8192
PUBLIC_EXPONENT = 65537

USER_ID_RE = re.compile(r"[a-z2-7]{32}")  # fullmatch: the whole string, ASCII only


def load_public_key(pem: str, field: str = "key") -> rsa.RSAPublicKey:
    """Parse a PEM SubjectPublicKeyInfo RSA key within the accepted sizes (errno 101)."""
    if "-----BEGIN PUBLIC KEY-----" not in pem:
        raise ProtocolError(101, f"{field} is not a PEM SubjectPublicKeyInfo (-----BEGIN PUBLIC KEY-----)")
    try:
        key = serialization.load_pem_public_key(pem.encode("utf-8"))
    except (ValueError, TypeError, UnicodeEncodeError) as e:
        raise ProtocolError(101, f"{field} does not parse as a public key: {e}")
    if not isinstance(key, rsa.RSAPublicKey):
        raise ProtocolError(101, f"{field} is not an RSA key")
    if not MIN_MODULUS_BITS <= key.key_size <= MAX_MODULUS_BITS:
        raise ProtocolError(
            101, f"{field} has a {key.key_size}-bit modulus; accepted are {MIN_MODULUS_BITS} to {MAX_MODULUS_BITS}"
        )
    if key.public_numbers().e != PUBLIC_EXPONENT:
        raise ProtocolError(101, f"{field} has public exponent {key.public_numbers().e}; only 65537 is accepted")
    return key


@functools.lru_cache(maxsize=1024)
def cached_public_key(pem: str) -> rsa.RSAPublicKey:
    """`load_public_key` of a stored user's key, parsed once rather than on every signed
    request (keys are immutable objects; a refused key is never cached)."""
    return load_public_key(pem)


def public_key_der(key: rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_pem(key: rsa.RSAPublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def user_id_for_key(key: rsa.RSAPublicKey) -> str:
    """Lowercase unpadded base32 of the first 20 bytes of SHA-256(DER SPKI)."""
    digest = hashlib.sha256(public_key_der(key)).digest()[:20]
    return base64.b32encode(digest).decode("ascii").lower()


def fingerprint(key: rsa.RSAPublicKey) -> str:
    """Lowercase hex SHA-256 of the DER SPKI, used for pinning."""
    return hashlib.sha256(public_key_der(key)).hexdigest()


def is_user_id(text: str) -> bool:
    return bool(USER_ID_RE.fullmatch(text))
