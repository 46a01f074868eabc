"""Signed requests (docs/protocol.md section 4): parameter shape, signature base, RSA-PSS, time window."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .canonical import MAX_SAFE_INTEGER, canonical_json
from .dates import parse_date
from .envelope import canonical_b64decode
from .errors import ProtocolError, malformed
from .keys import is_user_id

SALT_LENGTH = 32
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=SALT_LENGTH)
RESERVED = frozenset({"method", "path", "server"})
AUTH_FIELDS = ("user_id", "date", "validity", "signature")
#: Query-string parameters that are integers in the signature base; all others are strings.
QUERY_INTEGERS = frozenset({"validity", "limit"})
_DECIMAL = re.compile(r"-?[0-9]{1,16}")  # fullmatch: "300\n" and non-ASCII digits are not integers

# Parameter kinds an endpoint may declare.
STR, INT, STR_LIST = "string", "integer", "list of strings"


@dataclass(frozen=True)
class SignedRequest:
    """A signed request whose shape, user id syntax and time window were checked."""

    user_id: str
    date: float
    validity: int
    signature: str
    params: dict[str, Any]  # every parameter but `signature`: what the base is made of
    own: dict[str, Any] = field(default_factory=dict)  # the endpoint's own parameters

    def base(self, method: str, path: str, server: str) -> bytes:
        return signature_base(self.params, method, path, server)


def signature_base(params: Mapping[str, Any], method: str, path: str, server: str) -> bytes:
    """Canonical JSON of the parameters (less `signature`) plus method, path and server."""
    obj = {k: v for k, v in params.items() if k != "signature"}
    obj.update({"method": method.upper(), "path": path, "server": server})
    return canonical_json(obj)


def sign_params(
    private_key: rsa.RSAPrivateKey, params: Mapping[str, Any], method: str, path: str, server: str
) -> dict[str, Any]:
    """`params` plus the `signature` over them, as a client sends them."""
    signed = dict(params)
    signed["signature"] = sign_base(private_key, signature_base(params, method, path, server))
    return signed


def sign_base(private_key: rsa.RSAPrivateKey, base: bytes) -> str:
    """Canonical base64 RSA-PSS signature of `base`: the one signature scheme of the protocol.

    Shared by signed requests and the client's message objects (section 6), so that both
    use exactly the parameters `verify_signature` accepts.
    """
    return base64.b64encode(private_key.sign(base, _PSS, hashes.SHA256())).decode("ascii")


def verify_signature(public_key: rsa.RSAPublicKey, signature: str, base: bytes) -> None:
    """Check a canonical base64 PSS signature of exactly the modulus size (errno 110)."""
    size = (public_key.key_size + 7) // 8
    try:
        raw = canonical_b64decode(signature)
    except ValueError:
        raise ProtocolError(110, f"signature must be the canonical base64 of exactly {size} bytes")
    if len(raw) != size:
        raise ProtocolError(110, f"signature must be the canonical base64 of exactly {size} bytes")
    try:
        public_key.verify(raw, base, _PSS, hashes.SHA256())
    except InvalidSignature:
        raise ProtocolError(110, "signature does not verify against the user's key")


def check_time_window(date: float, validity: int, now: float, skew: int, max_validity: int) -> None:
    """Errno 105 for a bad validity or a date too far ahead, 111 once expired."""
    if not 1 <= validity <= max_validity:
        raise ProtocolError(105, f"validity must be between 1 and {max_validity} seconds")
    if date > now + skew:
        raise ProtocolError(105, f"date is more than {skew} seconds ahead of the server clock")
    if now > date + validity:
        raise ProtocolError(111, "request expired: date + validity is in the past")


def _typed(name: str, value: Any, kind: str) -> Any:
    if kind == STR and isinstance(value, str):
        return value
    if kind == INT and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > MAX_SAFE_INTEGER:
            raise malformed(f"{name} is outside ±(2^53-1)")
        return value
    if kind == STR_LIST and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise malformed(f"{name} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}")


def _parse(params: dict[str, Any], spec: Mapping[str, tuple[str, bool]]) -> SignedRequest:
    """Shape (100), user id (106) of an already typed parameter dict."""
    kinds = {"user_id": STR, "date": STR, "validity": INT, "signature": STR}
    for name in params:
        if name in RESERVED:
            raise malformed(f"parameter {name!r} is reserved for the signature base")
        if name not in kinds and name not in spec:
            raise malformed(f"unknown parameter {name!r}")
    for name in AUTH_FIELDS:
        if name not in params:
            raise malformed(f"{name} is missing")
        _typed(name, params[name], kinds[name])
    own = {}
    for name, (kind, required) in spec.items():
        if name in params:
            own[name] = _typed(name, params[name], kind)
        elif required:
            raise malformed(f"{name} is missing")
    if not is_user_id(params["user_id"]):
        raise ProtocolError(106, "user_id must be a bare 32-character user id of [a-z2-7]")
    date = parse_date(params["date"])
    signed = {k: v for k, v in params.items() if k != "signature"}
    try:
        canonical_json(signed)
    except ValueError as e:
        raise malformed(f"parameters cannot be signed: {e}")
    return SignedRequest(params["user_id"], date, params["validity"], params["signature"], signed, own)


def parse_signed_body(body: Mapping[str, Any], spec: Mapping[str, tuple[str, bool]]) -> SignedRequest:
    """Signed parameters from a JSON object body; `spec` maps own names to (kind, required)."""
    return _parse(dict(body), spec)


def parse_signed_query(
    args: Mapping[str, list[str]], spec: Mapping[str, tuple[str, bool]]
) -> SignedRequest:
    """Signed parameters from a decoded query string (each name mapped to its values)."""
    params: dict[str, Any] = {}
    for name, values in args.items():
        if len(values) != 1:
            raise malformed(f"query parameter {name!r} is repeated")
        value = values[0]
        if name in QUERY_INTEGERS:
            if not _DECIMAL.fullmatch(value):
                raise malformed(f"{name} must be an integer")
            params[name] = int(value)
        else:
            params[name] = value
    return _parse(params, spec)

