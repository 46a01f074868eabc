"""The plaintext of a fetch answer (docs/protocol.md section 6): a JSON list bounded in bytes."""

from __future__ import annotations

import json
from typing import Iterable


class EncodedJSON(bytes):
    """An answer already encoded as compact UTF-8 JSON (in a worker thread, for a big one);
    the web layer sends it as it is."""


#: ASCII bytes `json.dumps` escapes: control characters, DEL, the quote, the backslash.
_NEEDS_ESCAPE = bytes(range(0x20)) + b'\x7f"\\'


def json_string(value: str) -> bytes:
    """`value` as a JSON string literal, byte for byte as `json.dumps` writes it (ASCII only).

    Most strings in an answer are base64, ids and dates: ASCII that needs no escape. Two C
    passes over the bytes (`str.isascii` is constant time on CPython) recognise them at a third
    of the cost of the JSON encoder's character loop, which on a slow core was a fifth of a
    fetch's time holding the GIL (bench/README.md). Anything else goes to the encoder.
    """
    if value.isascii():
        raw = value.encode("ascii")
        if len(raw.translate(None, _NEEDS_ESCAPE)) == len(raw):
            return b'"' + raw + b'"'
    return json.dumps(value).encode("ascii")


def bounded_encoded_list(encoded: Iterable[bytes], max_bytes: int) -> tuple[bytes, int]:
    """JSON list of the leading `encoded` values (each already compact JSON) that fit in
    `max_bytes`, and how many that is.

    Stops before the item that would pass the bound, but always holds the first item, so
    one large message can never block a mailbox. The values are encoded lazily, so none is
    encoded past the bound. CPU work that grows with the answer: callers run it off the
    reactor thread when it is big.
    """
    parts: list[bytes] = []
    size = 2  # the brackets
    for part in encoded:
        grown = size + len(part) + (1 if parts else 0)
        if parts and grown > max_bytes:
            break
        parts.append(part)
        size = grown
    return b"[" + b",".join(parts) + b"]", len(parts)
