"""Packets (docs/protocol.md section 6): what a sender seals to a relay."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .addresses import Address, parse_address
from .envelope import AES_GCM, canonical_b64decode, check_envelope_fields, normalise_algorithm
from .errors import ProtocolError

PACKET_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")  # fullmatch: the whole string
_FIELDS = {"id", "user_id", "token", "data", "algorithm", "password", "ttl", "signature"}
#: Opaque binary fields the relay stores: canonical base64 (revision 2), so that what the
#: quota counts is what is stored, and a recipient never meets text it cannot decode.
BASE64_FIELDS = ("data", "password", "signature")


@dataclass(frozen=True)
class Packet:
    id: str
    address: Address
    token: str
    data: str
    algorithm: str  # normalised upper case
    password: str
    ttl: Optional[int]
    signature: Optional[str]

    def to_json(self) -> dict[str, Any]:
        """The packet as a sender would send it (used when forwarding)."""
        obj: dict[str, Any] = {
            "id": self.id,
            "user_id": str(self.address),
            "token": self.token,
            "data": self.data,
            "algorithm": self.algorithm,
            "password": self.password,
        }
        if self.ttl is not None:
            obj["ttl"] = self.ttl
        if self.signature is not None:
            obj["signature"] = self.signature
        return obj


def _check_base64(name: str, value: str) -> None:
    try:
        canonical_b64decode(value)
    except ValueError as e:
        raise ProtocolError(104, f"packet {name} must be canonical standard base64: {e}")
    if not value:
        raise ProtocolError(104, f"packet {name} is empty")


def parse_packet(obj: Mapping[str, Any]) -> Packet:
    """Check a decrypted packet: fields (104), inner algorithm (102), address (106)."""
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise ProtocolError(104, f"packet has unknown field {unknown[0]!r}")
    for name in ("id", "user_id", "token"):
        if not isinstance(obj.get(name), str):
            raise ProtocolError(104, f"packet {name} is missing or not a string")
    check_envelope_fields(obj, errno=104, where="packet ")
    if not PACKET_ID_RE.fullmatch(obj["id"]):
        raise ProtocolError(104, "packet id must be 1 to 128 characters of [A-Za-z0-9._-]")
    if not obj["token"]:
        raise ProtocolError(104, "packet token is empty")
    ttl = obj.get("ttl")
    if ttl is not None:
        if not isinstance(ttl, int) or isinstance(ttl, bool):
            raise ProtocolError(104, "packet ttl must be an integer number of seconds")
        if ttl < 1:
            raise ProtocolError(104, "packet ttl must be at least 1 second")
    signature = obj.get("signature")
    if signature is not None and not isinstance(signature, str):
        raise ProtocolError(104, "packet signature must be a string")
    for name in BASE64_FIELDS:
        if obj.get(name) is not None:  # a null signature is no signature
            _check_base64(name, obj[name])
    algorithm = normalise_algorithm(obj["algorithm"], (AES_GCM,), field="packet algorithm")
    address = parse_address(obj["user_id"], field="packet user_id")
    return Packet(obj["id"], address, obj["token"], obj["data"], algorithm, obj["password"], ttl, signature)
