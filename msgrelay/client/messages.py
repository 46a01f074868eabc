"""Message objects (docs/protocol.md section 6): build and sign, open and verify.

`{from, to, key, data_type, data, date, signature}` is the client convention the relays
never see: it travels inside the packet's inner envelope, sealed to the recipient. The
signature is RSA-PSS over the canonical JSON of the object without `signature`; the
receiver checks it, that `to` is itself, and that `from`'s user id is the hash of `key`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from cryptography.hazmat.primitives.asymmetric import rsa

from ..wire.addresses import Address, parse_address
from ..wire.canonical import canonical_json, parse_json_object
from ..wire.dates import format_date, parse_date
from ..wire.envelope import AES_GCM, b64encode, open_envelope, seal
from ..wire.errors import ProtocolError
from ..wire.keys import fingerprint, load_public_key, user_id_for_key
from ..wire.signing import sign_base, verify_signature
from .errors import MessageRejected
from .identity import Identity

RAW_DATA, RAW_MESSAGE, TOKEN_REQUEST = 1, 2, 3
TYPE_NAMES = {RAW_DATA: "file", RAW_MESSAGE: "text", TOKEN_REQUEST: "token_request"}
_REQUIRED = ("to", "key", "data_type", "data", "date", "signature")


def message_ref(message: Mapping[str, Any]) -> str:
    """A reference both ends can compute for a signed message: `last_id` points at these.

    Packet ids and relay message ids differ between sender and receiver; the signed object
    is the one thing both hold, byte for byte once canonicalised.
    """
    return hashlib.sha256(canonical_json(dict(message))).hexdigest()[:32]


def build_message(
    identity: Identity, to: str, data_type: int, data: Any, now: Optional[float] = None
) -> dict[str, Any]:
    """A signed message object from `identity` to the qualified address `to`."""
    obj: dict[str, Any] = {
        "from": identity.address,
        "to": to,
        "key": identity.public_pem,
        "data_type": data_type,
        "data": data,
        "date": format_date(time.time() if now is None else now),
    }
    obj["signature"] = sign_base(identity.private_key, canonical_json(obj))
    return obj


def text_data(content: str, last_id: Optional[str], name: str = "") -> dict[str, Any]:
    """Type 2: `name` is the sender's self-chosen display name (may be empty)."""
    return {"last_id": last_id, "name": name, "content": content}


def file_data(raw: bytes) -> str:
    """Type 1: the bytes as standard base64."""
    return b64encode(raw)


def token_request_data(own_address: str, token: str) -> dict[str, Any]:
    """Type 3: where to write back, and the token to do it with."""
    return {"user_id": own_address, "token": token}


def seal_message(recipient_key: rsa.RSAPublicKey, message: Mapping[str, Any]) -> dict[str, str]:
    """The packet's inner envelope: AES-256-GCM, as section 3 requires for user envelopes."""
    return seal(recipient_key, canonical_json(dict(message)), AES_GCM)


@dataclass(frozen=True)
class VerifiedMessage:
    """A message whose signature, recipient and sender key all checked out."""

    sender_user_id: str
    sender_address: Optional[str]  # None when the message carried no `from`
    key: rsa.RSAPublicKey
    fingerprint: str
    data_type: int
    data: Any
    date: str
    ref: str
    obj: Mapping[str, Any]

    @property
    def type_name(self) -> str:
        return TYPE_NAMES[self.data_type]


def _is_me(address: Address, me: Identity) -> bool:
    """`to` must be us: our user id, and our relay when it is qualified."""
    return address.user_id == me.user_id and (address.server_name is None or address.is_local_to(me.server_name))


def _check_data(data_type: Any, data: Any, sender_user_id: str) -> None:
    if type(data_type) is not int:
        raise MessageRejected(f"data_type {data_type!r} is not an integer")
    if data_type == RAW_DATA:
        if not isinstance(data, str):
            raise MessageRejected("type 1 data is not a base64 string")
        try:
            base64.b64decode(data.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise MessageRejected("type 1 data is not standard base64")
    elif data_type == RAW_MESSAGE:
        if not isinstance(data, dict) or not isinstance(data.get("content"), str):
            raise MessageRejected("type 2 data has no string `content`")
        if not isinstance(data.get("name", ""), str) or not isinstance(data.get("last_id"), (str, type(None))):
            raise MessageRejected("type 2 `name` or `last_id` has the wrong type")
    elif data_type == TOKEN_REQUEST:
        if not isinstance(data, dict) or not isinstance(data.get("token"), str) or not data["token"]:
            raise MessageRejected("type 3 data has no token")
        if not isinstance(data.get("user_id"), str):
            raise MessageRejected("type 3 data has no user_id")
        try:
            answer_to = parse_address(data["user_id"])
        except ProtocolError as e:
            raise MessageRejected(f"type 3 user_id is invalid: {e.message}")
        if answer_to.user_id != sender_user_id or answer_to.server_name is None:
            raise MessageRejected("type 3 asks to answer someone other than its signer")
    else:
        raise MessageRejected(f"unknown data_type {data_type!r}")


def verify_message(obj: Mapping[str, Any], me: Identity) -> VerifiedMessage:
    """Check a decrypted message object; MessageRejected says why it cannot be trusted."""
    for name in _REQUIRED:
        if name not in obj:
            raise MessageRejected(f"message has no `{name}`")
    if not isinstance(obj["key"], str) or not isinstance(obj["signature"], str) or not isinstance(obj["to"], str):
        raise MessageRejected("message `key`, `to` or `signature` is not a string")
    try:
        key = load_public_key(obj["key"])
    except ProtocolError as e:
        raise MessageRejected(f"message key is unusable: {e.message}")
    sender = user_id_for_key(key)
    unsigned = {k: v for k, v in obj.items() if k != "signature"}
    try:
        verify_signature(key, obj["signature"], canonical_json(unsigned))
    except (ProtocolError, ValueError) as e:
        raise MessageRejected(f"the signature does not verify ({getattr(e, 'message', e)})")
    sender_address = obj.get("from")
    if sender_address is not None:
        try:
            parsed = parse_address(sender_address) if isinstance(sender_address, str) else None
        except ProtocolError:
            parsed = None
        if parsed is None:
            raise MessageRejected("message `from` is not an address")
        if parsed.user_id != sender:
            raise MessageRejected(f"message claims to be from {parsed.user_id} but is signed by the key of {sender}")
        sender_address = str(parsed)
    try:
        to = parse_address(obj["to"])
    except ProtocolError:
        raise MessageRejected("message `to` is not an address")
    if not _is_me(to, me):
        raise MessageRejected(f"message is addressed to {obj['to']}, not to us: possibly passed on by someone else")
    if not isinstance(obj["date"], str):
        raise MessageRejected("message `date` is not a string")
    try:
        parse_date(obj["date"])
    except ProtocolError as e:
        raise MessageRejected(f"message date is invalid: {e.message}")
    _check_data(obj["data_type"], obj["data"], sender)
    return VerifiedMessage(
        sender_user_id=sender,
        sender_address=sender_address,
        key=key,
        fingerprint=fingerprint(key),
        data_type=obj["data_type"],
        data=obj["data"],
        date=obj["date"],
        ref=message_ref(obj),
        obj=obj,
    )


def open_message(server_message: Mapping[str, Any], me: Identity) -> VerifiedMessage:
    """Decrypt a fetched server message object's inner envelope and verify what is inside."""
    try:
        plaintext = open_envelope([me.private_key], server_message, allowed=(AES_GCM,))
    except ProtocolError as e:
        raise MessageRejected(f"does not decrypt (tampered with or corrupted): {e.message}")
    try:
        obj = parse_json_object(plaintext, errno=104, what="message")
    except ProtocolError as e:
        raise MessageRejected(f"decrypts to something that is not a message: {e.message}")
    return verify_message(obj, me)
