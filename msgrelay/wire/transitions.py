"""Key transitions (docs/protocol.md section 5): the old server key endorses its successor.

A relay that rotates its key signs, with the OLD private key, the canonical JSON of
`{"type": "msgrelay-key-transition", "server", "from", "to", "date"}`. Whoever pinned an old
key follows the chain pin -> ... -> current fingerprint, checking each step, instead of being
locked out. Pure: no I/O; the relay stores entries, clients and peers verify them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from cryptography.hazmat.primitives.asymmetric import rsa

from .canonical import canonical_json
from .dates import format_date, parse_date
from .errors import ProtocolError
from .keys import fingerprint, load_public_key, public_key_pem
from .signing import sign_base, verify_signature

TRANSITION_TYPE = "msgrelay-key-transition"
#: Longest chain followed: a relay rotating monthly for years stays far below it.
MAX_CHAIN = 64


class TransitionError(ValueError):
    """A transition entry that does not verify, or no chain from the pin; str() says why."""


@dataclass(frozen=True)
class Transition:
    """One verified-shape entry of `key_transitions`: `{from, to, from_key, date, signature}`."""

    from_fp: str
    to_fp: str
    from_key: str  # PEM of the old public key
    date: str  # RFC 3339, as signed
    signature: str

    def to_json(self) -> dict[str, str]:
        return {"from": self.from_fp, "to": self.to_fp, "from_key": self.from_key,
                "date": self.date, "signature": self.signature}

    @classmethod
    def from_json(cls, obj: Any) -> "Transition":
        if not isinstance(obj, Mapping):
            raise TransitionError("a key transition must be a JSON object")
        values = []
        for name in ("from", "to", "from_key", "date", "signature"):
            value = obj.get(name)
            if not isinstance(value, str):
                raise TransitionError(f"key transition field {name!r} must be a string")
            values.append(value)
        return cls(*values)


def statement(server: str, from_fp: str, to_fp: str, date: str) -> bytes:
    """The bytes the old key signs: canonical JSON of the transition statement."""
    return canonical_json({"type": TRANSITION_TYPE, "server": server, "from": from_fp, "to": to_fp, "date": date})


def sign_transition(old_key: rsa.RSAPrivateKey, new_key: rsa.RSAPublicKey, server: str, when: float) -> Transition:
    """The transition old -> new of relay `server` at time `when`, signed by the old key."""
    from_fp, to_fp, date = fingerprint(old_key.public_key()), fingerprint(new_key), format_date(when)
    signature = sign_base(old_key, statement(server, from_fp, to_fp, date))
    return Transition(from_fp, to_fp, public_key_pem(old_key.public_key()), date, signature)


def verify_transition(entry: Transition, server: str) -> None:
    """Check one step: `from_key` hashes to `from`, and the signature verifies under it."""
    try:
        key = load_public_key(entry.from_key, "from_key")
        parse_date(entry.date, "date")
    except ProtocolError as e:
        raise TransitionError(f"transition from {entry.from_fp[:16]}...: {e.message}")
    if fingerprint(key) != entry.from_fp:
        raise TransitionError(f"transition from {entry.from_fp[:16]}...: from_key is not the key with that fingerprint")
    try:
        verify_signature(key, entry.signature, statement(server, entry.from_fp, entry.to_fp, entry.date))
    except ProtocolError:
        raise TransitionError(f"transition from {entry.from_fp[:16]}... to {entry.to_fp[:16]}...: "
                              f"the signature does not verify under the old key for server {server!r}")


def parse_transitions(raw: Any) -> list[Transition]:
    """`key_transitions` of a server info; entries of the wrong shape are skipped (not trusted)."""
    if not isinstance(raw, list):
        return []
    found = []
    for obj in raw:
        try:
            found.append(Transition.from_json(obj))
        except TransitionError:
            continue
    return found


def follow_chain(pin: str, current: str, transitions: Iterable[Transition], server: str) -> list[Transition]:
    """The verified steps leading from `pin` to `current` (empty when they are equal).

    Only steps that verify are used, so a forged entry (signed by another key) is simply no
    edge; breadth-first, so the shortest chain wins and a cycle cannot loop. Raises
    TransitionError when no verified chain reaches `current`.
    """
    if pin == current:
        return []
    edges: dict[str, list[Transition]] = {}
    refused: list[str] = []
    for entry in transitions:
        try:
            verify_transition(entry, server)
        except TransitionError as e:
            refused.append(str(e))
            continue
        edges.setdefault(entry.from_fp, []).append(entry)
    came_from: dict[str, Optional[Transition]] = {pin: None}
    queue = deque([pin])
    while queue:
        at = queue.popleft()
        for step in edges.get(at, []):
            if step.to_fp in came_from:
                continue
            came_from[step.to_fp] = step
            if step.to_fp == current:
                return _path(came_from, current)
            queue.append(step.to_fp)
    why = f"; refused: {refused[0]}" if refused else ""
    raise TransitionError(f"no valid chain of key transitions from {pin} to {current}{why}")


def _path(came_from: Mapping[str, Optional[Transition]], end: str) -> list[Transition]:
    steps: list[Transition] = []
    step = came_from[end]
    while step is not None:
        steps.append(step)
        step = came_from[step.from_fp]
    steps.reverse()
    if len(steps) > MAX_CHAIN:
        raise TransitionError(f"the chain of key transitions is longer than {MAX_CHAIN} steps")
    return steps
