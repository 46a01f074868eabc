"""Strict JSON in and canonical JSON out (PROTOCOL.md sections 1 and 4)."""

from __future__ import annotations

import json
from typing import Any

from .errors import ProtocolError

MAX_SAFE_INTEGER = 2**53 - 1


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
    """Parse `raw` as one JSON object: UTF-8, no duplicate keys, no NaN/Infinity.

    Every failure is a ProtocolError with `errno`, naming `what` was wrong.
    """
    value = parse_json(raw, errno, what)
    if not isinstance(value, dict):
        raise ProtocolError(errno, f"{what} is not a JSON object")
    return value


def parse_json(raw: bytes, errno: int = 100, what: str = "body") -> Any:
    """Parse `raw` as any JSON value with the strictness of `parse_json_object`.

    For the places where the protocol carries a list, such as a fetch response's plaintext.
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
    return value


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
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
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
