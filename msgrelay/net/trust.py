"""Trust roots from a PEM bundle, for the client (`--ca-file`) and the relay (`*.ca_file`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import ssl


class TrustRootError(ValueError):
    """The CA file cannot be used; `str()` names the file and the problem."""


def load_certificates(ca_file: str) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle (TrustRootError if unreadable or holding none)."""
    try:
        pem = Path(ca_file).read_bytes()
    except OSError as e:
        raise TrustRootError(f"cannot read the CA file {ca_file}: {e.strerror or e}")
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise TrustRootError(f"the CA file {ca_file} does not hold PEM certificates: {e}")
    return certificates


def load_trust_root(ca_file: Optional[str]) -> Any:
    """Only the certificates of `ca_file` (like curl's --cacert); the platform's roots if empty."""
    if not ca_file:
        return ssl.platformTrust()
    certificates = [ssl.Certificate.load(c.public_bytes(Encoding.DER)) for c in load_certificates(ca_file)]
    return ssl.trustRootFromCertificates(certificates)

