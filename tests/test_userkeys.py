"""`UserKeys`, the relay's bounded map of user id to public key (msgrelay/userkeys.py)."""

from __future__ import annotations

from msgrelay.userkeys import UserKeys


def test_keys_are_kept_up_to_the_bound_least_recently_used_dropped_first():
    keys = UserKeys(size=2)
    keys.remember("a", "key a")
    keys.remember("b", "key b")
    assert keys.get("a") == "key a"  # a is now the most recently used
    keys.remember("c", "key c")
    assert (keys.get("a"), keys.get("b"), keys.get("c"), len(keys)) == ("key a", None, "key c", 2)


def test_a_forgotten_key_is_gone_and_forgetting_an_unknown_one_is_harmless():
    keys = UserKeys()
    keys.remember("a", "key a")
    keys.forget("a")
    keys.forget("never")
    assert keys.get("a") is None and len(keys) == 0
