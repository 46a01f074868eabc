"""Key transitions (docs/protocol.md section 5) in the pure wire layer, against fixed vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from msgrelay.wire.dates import parse_date
from msgrelay.wire.keys import fingerprint
from msgrelay.wire.transitions import (
    Transition, TransitionError, follow_chain, parse_transitions, sign_transition, statement, verify_transition,
)

VECTOR = json.loads((Path(__file__).parent / "vectors" / "transitions.json").read_text())
SERVER = VECTOR["server"]
FPS = VECTOR["fingerprints"]
KEYS = [serialization.load_pem_private_key(pem.encode(), None) for pem in VECTOR["keys"]]
STEPS = [Transition.from_json(step["entry"]) for step in VECTOR["transitions"]]


def test_statement_bytes_match_the_hand_written_vector():
    for step, raw in zip(STEPS, VECTOR["transitions"]):
        assert statement(SERVER, step.from_fp, step.to_fp, step.date) == raw["statement"].encode()


def test_vector_steps_verify():
    for step in STEPS:
        verify_transition(step, SERVER)


def test_chain_from_the_first_key_reaches_the_current_one():
    assert follow_chain(FPS[0], FPS[2], STEPS, SERVER) == STEPS
    assert follow_chain(FPS[1], FPS[2], STEPS, SERVER) == STEPS[1:]
    assert follow_chain(FPS[2], FPS[2], STEPS, SERVER) == []
    # order in the list does not matter
    assert follow_chain(FPS[0], FPS[2], list(reversed(STEPS)), SERVER) == STEPS


def test_forged_transition_signed_by_another_key_is_refused():
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = sign_transition(attacker, attacker.public_key(), SERVER, parse_date("2026-07-01T00:00:00Z"))
    # claims to come from the pinned key, but carries the attacker's key and signature
    claimed = Transition(FPS[0], forged.to_fp, forged.from_key, forged.date, forged.signature)
    with pytest.raises(TransitionError, match="from_key is not the key"):
        verify_transition(claimed, SERVER)
    # the pinned key's PEM with the attacker's signature
    swapped = Transition(FPS[0], forged.to_fp, STEPS[0].from_key, forged.date, forged.signature)
    with pytest.raises(TransitionError, match="does not verify"):
        verify_transition(swapped, SERVER)
    with pytest.raises(TransitionError, match="no valid chain"):
        follow_chain(FPS[0], forged.to_fp, [claimed, swapped], SERVER)


def test_tampered_fields_break_the_signature():
    step = STEPS[0]
    for changed in (
        Transition(step.from_fp, FPS[0], step.from_key, step.date, step.signature),  # other successor
        Transition(step.from_fp, step.to_fp, step.from_key, "2026-01-10T09:00:01Z", step.signature),
    ):
        with pytest.raises(TransitionError):
            verify_transition(changed, SERVER)
    with pytest.raises(TransitionError):
        verify_transition(step, "other.example.org")  # bound to one relay's name


def test_missing_step_is_a_broken_chain():
    with pytest.raises(TransitionError, match="no valid chain"):
        follow_chain(FPS[0], FPS[2], STEPS[1:], SERVER)
    with pytest.raises(TransitionError):
        follow_chain(FPS[0], FPS[2], [], SERVER)


def test_cycle_and_dangling_branch_do_not_confuse_the_walk():
    back = sign_transition(KEYS[1], KEYS[0].public_key(), SERVER, parse_date("2026-03-01T00:00:00Z"))
    ghost_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    dangling = sign_transition(KEYS[0], ghost_key.public_key(), SERVER, parse_date("2026-02-01T00:00:00Z"))
    assert follow_chain(FPS[0], FPS[2], [dangling, back, *STEPS], SERVER) == STEPS


def test_parse_skips_malformed_entries():
    raw = [step["entry"] for step in VECTOR["transitions"]] + [{"from": 1}, "x", None]
    assert parse_transitions(raw) == STEPS
    assert parse_transitions(None) == []


def test_sign_round_trip_with_fresh_keys():
    entry = sign_transition(KEYS[2], KEYS[0].public_key(), SERVER, 1780000000)
    assert entry.from_fp == FPS[2] and entry.to_fp == fingerprint(KEYS[0].public_key())
    verify_transition(Transition.from_json(json.loads(json.dumps(entry.to_json()))), SERVER)
