"""Hybrid encryption envelopes (docs/protocol.md section 3)."""

from __future__ import annotations

import base64
import binascii
import os
from typing import Callable, Iterable, Mapping, Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .errors import ProtocolError

AES_GCM = "AES-256-GCM"
CHACHA = "CHACHA20-POLY1305"
ALGORITHMS = (AES_GCM, CHACHA)
_CIPHERS: dict[str, Callable[[bytes], Union[AESGCM, ChaCha20Poly1305]]] = {AES_GCM: AESGCM, CHACHA: ChaCha20Poly1305}
ENVELOPE_FIELDS = ("algorithm", "password", "data")
#: One message for every decryption failure: telling an RSA failure from a tag failure
#: would hand an attacker an oracle on the key unwrapping.
DOES_NOT_DECRYPT = "the envelope does not decrypt with this key (wrong key, or tampered with)"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16

_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def b64decode(text: str) -> bytes:
    """Strict standard base64 with padding; ValueError otherwise."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise ValueError(f"not standard base64: {e}")


def canonical_b64decode(text: str) -> bytes:
    """Bytes of `text` when it is their one canonical standard base64 form (padding, zero
    padding bits, no whitespace); ValueError naming what is wrong otherwise."""
    raw = b64decode(text)
    if b64encode(raw) != text:
        raise ValueError("not canonical base64 (padding bits must be zero)")
    return raw


def normalise_algorithm(name: str, allowed: Iterable[str] = ALGORITHMS, field: str = "algorithm") -> str:
    """Upper-cased algorithm name if it is one of `allowed` (errno 102)."""
    upper = name.upper()
    if upper not in allowed:
        raise ProtocolError(102, f"{field} {name!r} is not supported here; use one of {', '.join(allowed)}")
    return upper


def check_envelope_fields(obj: Mapping[str, object], errno: int = 100, where: str = "") -> None:
    """All three envelope fields present and strings."""
    for name in ENVELOPE_FIELDS:
        if name not in obj:
            raise ProtocolError(errno, f"{where}{name} is missing")
        if not isinstance(obj[name], str):
            raise ProtocolError(errno, f"{where}{name} must be a string")


def seal(public_key: rsa.RSAPublicKey, plaintext: bytes, algorithm: str = AES_GCM) -> dict[str, str]:
    """Encrypt `plaintext` to `public_key` with a fresh key and nonce."""
    algorithm = normalise_algorithm(algorithm)
    key = os.urandom(KEY_BYTES)
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = _CIPHERS[algorithm](key).encrypt(nonce, plaintext, None)
    return {
        "algorithm": algorithm,
        "password": b64encode(public_key.encrypt(key, _OAEP)),
        "data": b64encode(nonce + ciphertext),
    }


def open_envelope(
    private_keys: Iterable[rsa.RSAPrivateKey],
    envelope: Mapping[str, object],
    allowed: Iterable[str] = ALGORITHMS,
) -> bytes:
    """Decrypt an envelope with the first of `private_keys` that opens its password.

    Several keys serve a relay during key rotation. Errors: 100 (fields), 102, 103.
    """
    check_envelope_fields(envelope)
    algorithm = normalise_algorithm(str(envelope["algorithm"]), tuple(allowed))
    try:
        wrapped = b64decode(str(envelope["password"]))
    except ValueError as e:
        raise ProtocolError(103, f"password is {e}")
    try:
        sealed = b64decode(str(envelope["data"]))
    except ValueError as e:
        raise ProtocolError(103, f"data is {e}")
    key = None
    for private_key in private_keys:
        try:
            key = private_key.decrypt(wrapped, _OAEP)
            break
        except ValueError:
            continue
    if key is None or len(key) != KEY_BYTES:
        key = os.urandom(KEY_BYTES)  # go on with a key that cannot work: same work, same answer
    try:
        if len(sealed) < NONCE_BYTES + TAG_BYTES:
            raise InvalidTag()
        return _CIPHERS[algorithm](key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], None)
    except InvalidTag:
        raise ProtocolError(103, DOES_NOT_DECRYPT)
