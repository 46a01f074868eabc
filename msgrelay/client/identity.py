"""The user's own key pair: generation, (optionally encrypted) PEM storage, addresses."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ..wire.keys import fingerprint, public_key_pem, user_id_for_key
from .errors import ProfileError

KEY_BITS = 3072


def generate_private_key(bits: int = KEY_BITS) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def private_key_to_pem(key: rsa.RSAPrivateKey, passphrase: Optional[bytes] = None) -> bytes:
    """PKCS#8 PEM, encrypted with the best scheme cryptography offers when a passphrase is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def pem_is_encrypted(pem: bytes) -> bool:
    return b"ENCRYPTED" in pem.split(b"\n", 1)[0]


def private_key_from_pem(pem: bytes, passphrase: Optional[bytes] = None, *, checked: bool = True) -> rsa.RSAPrivateKey:
    """Load a private key; a wrong or missing passphrase is a ProfileError, not a traceback.

    `checked=False` skips OpenSSL's RSA consistency check (about 0.1 s of every command's
    start-up here): only for the profile's own key file, which this client wrote after
    making or fully checking the key. Signing stays safe with a damaged file: OpenSSL checks
    each CRT result with the public exponent before releasing it.
    """
    if pem_is_encrypted(pem) and not passphrase:
        raise ProfileError("the private key is passphrase-protected and no passphrase was given")
    try:
        key = serialization.load_pem_private_key(pem, passphrase if pem_is_encrypted(pem) else None,
                                                 unsafe_skip_rsa_key_validation=not checked)
    except ValueError as e:
        if pem_is_encrypted(pem):
            raise ProfileError("wrong passphrase for the private key") from e
        raise ProfileError(f"the private key file does not parse: {e}") from e
    except TypeError as e:
        raise ProfileError(f"the private key file does not parse: {e}") from e
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ProfileError("the private key is not an RSA key")
    return key


@dataclass(frozen=True)
class Identity:
    """Who we are: the private key and the relay we are registered at."""

    private_key: rsa.RSAPrivateKey
    server_name: str

    @cached_property
    def public_key(self) -> rsa.RSAPublicKey:
        return self.private_key.public_key()

    @cached_property
    def user_id(self) -> str:
        return user_id_for_key(self.public_key)

    @property
    def address(self) -> str:
        """The qualified address others write to."""
        return f"{self.user_id}@{self.server_name}"

    @cached_property
    def public_pem(self) -> str:
        return public_key_pem(self.public_key)

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)
