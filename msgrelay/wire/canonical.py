"""Strict JSON in and canonical JSON out (docs/protocol.md sections 1 and 4)."""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

from .errors import ProtocolError

MAX_SAFE_INTEGER = 2**53 - 1
#: A `\\uD800`-style escape of a surrogate code point: the only way a lone surrogate gets into parsed JSON
#: (the UTF-8 decoder already refuses encoded ones). Seeing one means the strings need a look.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json_object(raw: bytes, errno: int = 100, what: str = "body") -> dict[str, Any]:
    """Parse `raw` as one JSON object: UTF-8, valid Unicode, no duplicate keys, no NaN/Infinity.

    Every failure is a ProtocolError with `errno`, naming `what` was wrong.
    """
    value = parse_json(raw, errno, what)
    if not isinstance(value, dict):
        raise ProtocolError(errno, f"{what} is not a JSON object")
    return value


def parse_json(raw: bytes, errno: int = 100, what: str = "body", allow_surrogates: bool = False) -> Any:
    """Parse `raw` as any JSON value with the strictness of `parse_json_object`.

    For the places where the protocol carries a list, such as a fetch response's plaintext.
    `allow_surrogates` keeps lone surrogates (`"\\ud800"`) for a caller that checks each
    item on its own, so that one bad item cannot make the whole list unreadable.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(errno, f"{what} is not valid UTF-8")
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except _DuplicateKey as e:
        raise ProtocolError(errno, f"{what} has the key {str(e)!r} more than once")
    except (ValueError, RecursionError) as e:
        raise ProtocolError(errno, f"{what} is not JSON: {e}")
    if not allow_surrogates and _SURROGATE_ESCAPE.search(text) and holds_lone_surrogate(value):
        raise ProtocolError(errno, f"{what} holds a string that is not valid Unicode (a lone surrogate)")
    return value


def holds_lone_surrogate(value: Any) -> bool:
    """Whether any string in a parsed JSON value (object keys included) is not valid Unicode."""
    return not all(is_valid_unicode(string) for string in _strings(value))


def is_valid_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (it has no UTF-8 encoding)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _strings(value: Any) -> Iterator[str]:
    """Every string in a parsed JSON value, object keys included (iterative: any depth)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())


def _check(value: Any, where: str) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise ValueError(f"{where}: integer outside ±(2^53-1)")
        return
    if isinstance(value, float):
        raise ValueError(f"{where}: floats are not allowed in a signed object")
    if isinstance(value, str):
        if not is_valid_unicode(value):
            raise ValueError(f"{where}: string is not valid Unicode")
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not key.isascii():
                raise ValueError(f"{where}: object key {key!r} is not ASCII")
            _check(item, f"{where}.{key}")
        return
    raise ValueError(f"{where}: {type(value).__name__} cannot be signed")


def canonical_json(value: Any) -> bytes:
    """Canonical bytes of `value` (sorted ASCII keys, no whitespace, integers only).

    Raises ValueError when `value` cannot be canonicalised.
    """
    _check(value, "$")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
