"""The plaintext of a fetch answer (docs/protocol.md section 6): a JSON list bounded in bytes."""

from __future__ import annotations

import json
from typing import Any, Iterable


class EncodedJSON(bytes):
    """An answer already encoded as compact UTF-8 JSON (in a worker thread, for a big one);
    the web layer sends it as it is."""


def bounded_json_list(items: Iterable[Any], max_bytes: int) -> tuple[bytes, int]:
    """Compact JSON list of the leading `items` that fit in `max_bytes`, and how many that is.

    Stops before the item that would pass the bound, but always holds the first item, so
    one large message can never block a mailbox. CPU work that grows with the answer:
    callers run it off the reactor thread.
    """
    parts: list[bytes] = []
    size = 2  # the brackets
    for item in items:
        part = json.dumps(item, separators=(",", ":")).encode("utf-8")
        grown = size + len(part) + (1 if parts else 0)
        if parts and grown > max_bytes:
            break
        parts.append(part)
        size = grown
    return b"[" + b",".join(parts) + b"]", len(parts)
