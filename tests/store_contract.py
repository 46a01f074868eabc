"""The behaviour every IStore backend must show, as one test class to subclass.

Usage in a backend's test module::

    from store_contract import StoreContract

    class TestMyStore(StoreContract):
        @pytest.fixture
        def store(self, ...):
            return ...  # a ready, EMPTY IStore provider (fresh for every test)

Nothing here knows about files or databases: times are passed explicitly (`now`), nothing
sleeps, and every expectation comes from `msgrelay/store/interface.py` and docs/protocol.md
section 6. Conventions pinned down here where the interface is terse:

- a message, dedup record or token is live while `now < expires`; at `now == expires` it
  has expired (as `TokenRecord.is_valid`); a replay entry likewise while `now < until`;
- `deliver` and `add_token` for a user that does not exist fail with a LookupError, and
  store nothing (a delivery racing an erasure must not resurrect the user).
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Optional

import pytest
import pytest_twisted
from twisted.internet import defer
from zope.interface.verify import verifyObject

from msgrelay.store.interface import (
    Accepted, Delivery, IStore, MessageRecord, NewMessage, Quota, QuotaExceeded, TokenRecord, TokenRefused,
    UserRecord,
)

NOW = 1_800_000_000
HOUR = 3600
BIG = Quota(max_messages=10_000, max_bytes=100_000_000)
MESSAGE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
KEY = "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA{}\n-----END PUBLIC KEY-----\n"


def user_id(label: str) -> str:
    """A realistic user id (32 lowercase base32 characters) derived from a label."""
    return base64.b32encode(hashlib.sha256(label.encode()).digest()[:20]).decode().lower()


ALICE, BOB, CAROL = user_id("alice"), user_id("bob"), user_id("carol")


def user(uid: str = ALICE, push: Optional[str] = None, created: int = NOW) -> UserRecord:
    return UserRecord(uid, KEY.format(uid), push, created)


def token(secret: str, created: int = NOW, expires: Optional[int] = NOW + 30 * 86400, label: Optional[str] = None) -> TokenRecord:
    digest = hashlib.sha256(secret.encode()).hexdigest()
    return TokenRecord(digest[:16], digest, label, created, expires)


def message(
    data: str = "ZGF0YQ==", token_id: str = "0123456789abcdef", received: int = NOW,
    expires: int = NOW + HOUR, signature: Optional[str] = None, password: str = "cGFzcw==",
) -> NewMessage:
    return NewMessage(token_id, data, "AES-256-GCM", password, signature, received, expires)


def record_of(delivery: Delivery, sent: NewMessage) -> MessageRecord:
    return MessageRecord(
        delivery.message_id, sent.token_id, sent.data, sent.algorithm, sent.password,
        sent.signature, sent.received, sent.expires,
    )


async def fetch_all(store, uid: str = ALICE, now: int = NOW) -> list[MessageRecord]:
    messages, remaining = await store.fetch(uid, now, 1000)
    assert remaining == 0
    return messages


async def alice_and_bob_with_messages(store, count: int) -> tuple[list[str], str]:
    """Alice with `count` messages and Bob with one: (Alice's ids, Bob's id)."""
    await store.add_user(user(ALICE))
    await store.add_user(user(BOB))
    ids = [(await store.deliver(ALICE, f"k{i}", message(data=f"m{i}"), BIG, NOW)).message_id for i in range(count)]
    return ids, (await store.deliver(BOB, "k0", message(), BIG, NOW)).message_id


class StoreContract:
    """Subclass and provide a `store` fixture yielding a ready, empty IStore provider."""

    # -- the interface itself ----------------------------------------------------------

    def test_provides_istore(self, store):
        assert verifyObject(IStore, store)
        assert isinstance(store.name, str) and store.name

    # -- users -----------------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_add_and_get_user(self, store):
        assert await store.get_user(ALICE) is None
        record = user(ALICE, push="https://push.example/a")
        assert await store.add_user(record) is True
        assert await store.get_user(ALICE) == record
        assert await store.get_user(BOB) is None

    @pytest_twisted.ensureDeferred
    async def test_add_user_is_idempotent_and_leaves_existing_unchanged(self, store):
        first = user(ALICE, created=NOW)
        assert await store.add_user(first) is True
        assert await store.add_user(UserRecord(ALICE, "other key", "https://x.example", NOW + 5)) is False
        assert await store.get_user(ALICE) == first

    @pytest_twisted.ensureDeferred
    async def test_push_endpoint_set_and_clear(self, store):
        await store.add_user(user(ALICE))
        assert await store.set_push_endpoint(ALICE, "https://push.example/x") is True
        assert (await store.get_user(ALICE)).push_endpoint == "https://push.example/x"
        assert await store.set_push_endpoint(ALICE, None) is True
        got = await store.get_user(ALICE)
        assert got.push_endpoint is None and got.key_pem == user(ALICE).key_pem
        assert await store.set_push_endpoint(BOB, "https://push.example/b") is False
        assert await store.get_user(BOB) is None

    @pytest_twisted.ensureDeferred
    async def test_delete_user_erases_key_tokens_messages_and_dedup(self, store):
        await store.add_user(user(ALICE))
        await store.add_user(user(BOB))
        await store.add_token(ALICE, token("t1"))
        await store.deliver(ALICE, "key-1", message(), BIG, NOW)
        await store.deliver(BOB, "key-1", message(), BIG, NOW)
        assert await store.delete_user(ALICE) is True
        assert await store.get_user(ALICE) is None
        assert await store.list_tokens(ALICE) == []
        assert await store.get_token(ALICE, token("t1").id) is None
        assert await store.fetch(ALICE, NOW, 100) == ([], 0)
        assert await store.delete_user(ALICE) is False
        # Bob is untouched.
        assert len(await fetch_all(store, BOB)) == 1
        # Registering the same key again starts empty: no tokens, no messages, no dedup.
        assert await store.add_user(user(ALICE)) is True
        assert await store.list_tokens(ALICE) == []
        assert await fetch_all(store, ALICE) == []
        again = await store.deliver(ALICE, "key-1", message(), BIG, NOW)
        assert again.duplicate is False
        assert len(await fetch_all(store, ALICE)) == 1

    # -- tokens ----------------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_tokens_add_get(self, store):
        await store.add_user(user(ALICE))
        await store.add_user(user(BOB))
        t = token("secret-1", label="for bob")
        assert await store.add_token(ALICE, t) is None
        assert await store.get_token(ALICE, t.id) == t
        assert await store.get_token(ALICE, "ffffffffffffffff") is None
        assert await store.get_token(BOB, t.id) is None  # tokens belong to one user
        forever = token("secret-2", expires=None)
        await store.add_token(ALICE, forever)
        assert await store.get_token(ALICE, forever.id) == forever

    @pytest_twisted.ensureDeferred
    async def test_list_tokens_oldest_first(self, store):
        await store.add_user(user(ALICE))
        made = [token("c", created=NOW + 20), token("a", created=NOW), token("b", created=NOW + 10, expires=None)]
        for t in made:
            await store.add_token(ALICE, t)
        assert await store.list_tokens(ALICE) == sorted(made, key=lambda t: t.created)
        assert await store.list_tokens(BOB) == []

    @pytest_twisted.ensureDeferred
    async def test_revoke_token(self, store):
        await store.add_user(user(ALICE))
        keep, drop = token("keep"), token("drop", created=NOW + 1)
        await store.add_token(ALICE, keep)
        await store.add_token(ALICE, drop)
        assert await store.revoke_token(ALICE, drop.id) is True
        assert await store.revoke_token(ALICE, drop.id) is False
        assert await store.revoke_token(BOB, keep.id) is False
        assert await store.get_token(ALICE, drop.id) is None
        assert await store.list_tokens(ALICE) == [keep]

    @pytest_twisted.ensureDeferred
    async def test_expired_token_is_kept_until_expire_reclaims_it(self, store):
        await store.add_user(user(ALICE))
        old, live, forever = token("old", expires=NOW + 10), token("live", expires=NOW + 1000), token("f", expires=None)
        for t in (old, live, forever):
            await store.add_token(ALICE, t)
        assert await store.get_token(ALICE, old.id) == old  # expired or not, until reclaimed
        await store.expire(NOW + 10)
        assert await store.get_token(ALICE, old.id) is None
        assert await store.get_token(ALICE, live.id) == live
        assert await store.get_token(ALICE, forever.id) == forever

    @pytest_twisted.ensureDeferred
    async def test_add_token_for_unknown_user_fails(self, store):
        with pytest.raises(LookupError):
            await store.add_token(ALICE, token("t"))
        assert await store.list_tokens(ALICE) == []

    # -- deliver, fetch, acknowledge ---------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_deliver_and_fetch_round_trip(self, store):
        await store.add_user(user(ALICE))
        plain = message(data="QUFB", signature=None)
        signed = message(data="QkJC", signature="c2ln", received=NOW + 1, expires=NOW + 2 * HOUR)
        d1 = await store.deliver(ALICE, "k1", plain, BIG, NOW)
        d2 = await store.deliver(ALICE, "k2", signed, BIG, NOW + 1)
        assert d1.duplicate is False and d1.expires == plain.expires
        assert d2.duplicate is False and d2.expires == signed.expires
        for d in (d1, d2):
            assert MESSAGE_ID.match(d.message_id)
        assert d1.message_id != d2.message_id
        assert await fetch_all(store, ALICE, NOW + 1) == [record_of(d1, plain), record_of(d2, signed)]

    @pytest_twisted.ensureDeferred
    async def test_fetch_order_limit_and_remaining(self, store):
        await store.add_user(user(ALICE))
        ids = [(await store.deliver(ALICE, f"k{i}", message(data=f"m{i}"), BIG, NOW)).message_id for i in range(5)]
        assert ids == sorted(ids), "message ids sort in arrival order"
        first, remaining = await store.fetch(ALICE, NOW, 2)
        assert [m.message_id for m in first] == ids[:2] and remaining == 3
        # Nothing acknowledged: fetching again returns the same (at-least-once).
        again, remaining = await store.fetch(ALICE, NOW, 2)
        assert [m.message_id for m in again] == ids[:2] and remaining == 3
        everything, remaining = await store.fetch(ALICE, NOW, 1000)
        assert [m.data for m in everything] == [f"m{i}" for i in range(5)] and remaining == 0

    @pytest_twisted.ensureDeferred
    async def test_remaining_and_usage_leave_out_expired_messages_not_yet_swept(self, store):
        await store.add_user(user(ALICE))
        short = [message(data=f"s{i}xxx==", expires=NOW + 10) for i in range(3)]
        long = [message(data=f"l{i}xxx==", expires=NOW + HOUR) for i in range(4)]
        for i, m in enumerate(short + long):
            await store.deliver(ALICE, f"k{i}", m, BIG, NOW)
        assert await store.usage(ALICE, NOW) == (7, sum(m.size for m in short + long))
        page, remaining = await store.fetch(ALICE, NOW, 2)
        assert len(page) == 2 and remaining == 5
        # Past the short ones' expiry, before any sweep: they are neither fetched nor counted.
        later = NOW + 10
        assert await store.usage(ALICE, later) == (4, sum(m.size for m in long))
        page, remaining = await store.fetch(ALICE, later, 3)
        assert [m.data for m in page] == ["l0xxx==", "l1xxx==", "l2xxx=="] and remaining == 1
        assert await store.expire(later) == 3
        assert await store.usage(ALICE, later) == (4, sum(m.size for m in long))
        page, remaining = await store.fetch(ALICE, later, 1)
        assert len(page) == 1 and remaining == 3

    @pytest_twisted.ensureDeferred
    async def test_fetch_stops_before_the_message_that_would_pass_max_bytes(self, store):
        await store.add_user(user(ALICE))
        sizes = [100, 100, 300, 50]
        sent = [message(data="x" * (n - 8)) for n in sizes]  # password "cGFzcw==" is 8 bytes
        assert [m.size for m in sent] == sizes
        ids = [(await store.deliver(ALICE, f"k{i}", m, BIG, NOW)).message_id for i, m in enumerate(sent)]
        page, remaining = await store.fetch(ALICE, NOW, 1000, max_bytes=250)
        assert [m.message_id for m in page] == ids[:2] and remaining == 2  # 100 + 100; 300 more would pass
        page, remaining = await store.fetch(ALICE, NOW, 1, max_bytes=250)
        assert [m.message_id for m in page] == ids[:1] and remaining == 3  # limit binds first
        page, remaining = await store.fetch(ALICE, NOW, 1000, max_bytes=200)
        assert [m.message_id for m in page] == ids[:2] and remaining == 2  # exactly full
        page, remaining = await store.fetch(ALICE, NOW, 1000, max_bytes=10)
        assert [m.message_id for m in page] == ids[:1] and remaining == 3  # the first always comes
        await store.acknowledge(ALICE, ids[:2])
        page, remaining = await store.fetch(ALICE, NOW, 1000, max_bytes=250)
        assert [m.message_id for m in page] == ids[2:3] and remaining == 1
        page, remaining = await store.fetch(ALICE, NOW, 1000, max_bytes=None)
        assert [m.message_id for m in page] == ids[2:] and remaining == 0

    @pytest_twisted.ensureDeferred
    async def test_many_quick_deliveries_get_unique_ids_in_arrival_order(self, store):
        await store.add_user(user(ALICE))
        ids = []
        for i in range(40):
            ids.append((await store.deliver(ALICE, f"k{i}", message(data=str(i)), BIG, NOW)).message_id)
        assert len(set(ids)) == 40 and ids == sorted(ids)
        assert [m.data for m in await fetch_all(store)] == [str(i) for i in range(40)]

    @pytest_twisted.ensureDeferred
    async def test_fetch_for_unknown_user_is_empty(self, store):
        assert await store.fetch(ALICE, NOW, 10) == ([], 0)
        assert await store.acknowledge(ALICE, ["x"]) == 0

    @pytest_twisted.ensureDeferred
    async def test_acknowledge(self, store):
        ids, bobs = await alice_and_bob_with_messages(store, 3)
        junk = ["", "nope", "../user.json", "../../etc/passwd", "/etc/passwd", "a" * 200, ids[0] + "x"]
        assert await store.acknowledge(ALICE, [ids[0], ids[2], bobs] + junk) == 2
        assert [m.message_id for m in await fetch_all(store)] == [ids[1]]
        assert await store.acknowledge(ALICE, [ids[0]]) == 0  # already gone
        assert await store.acknowledge(ALICE, [ids[1], ids[1]]) == 1
        assert await fetch_all(store) == []
        assert [m.message_id for m in await fetch_all(store, BOB)] == [bobs]
        assert await store.acknowledge(ALICE, []) == 0

    @pytest_twisted.ensureDeferred
    async def test_deliver_to_unknown_user_fails_and_stores_nothing(self, store):
        with pytest.raises(LookupError):
            await store.deliver(ALICE, "k", message(), BIG, NOW)
        await store.add_user(user(ALICE))
        assert await fetch_all(store) == []
        assert (await store.deliver(ALICE, "k", message(), BIG, NOW)).duplicate is False

    # -- the accept path in one call -------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_deliver_checked_stores_only_with_a_valid_token(self, store):
        good, old, other = token("good"), token("old", expires=NOW + 10), token("other")
        sent = message(token_id=good.id, data="hello")
        with pytest.raises(LookupError):
            await store.deliver_checked(ALICE, good.digest, "k", sent, BIG, NOW)
        await store.add_user(user(ALICE, push="https://push.example/a"))
        await store.add_user(user(BOB))
        with pytest.raises(TokenRefused):  # no token at all
            await store.deliver_checked(ALICE, good.digest, "k", sent, BIG, NOW)
        await store.add_token(ALICE, good)
        await store.add_token(ALICE, old)
        await store.add_token(BOB, other)
        # Same 16-character id but another digest: refused (the full digest must match).
        forged = good.id + "0" * 48
        with pytest.raises(TokenRefused):
            await store.deliver_checked(ALICE, forged, "k", sent, BIG, NOW)
        with pytest.raises(TokenRefused):  # Bob's token does not open Alice's mailbox
            await store.deliver_checked(ALICE, other.digest, "k", sent, BIG, NOW)
        with pytest.raises(TokenRefused):  # expired at its expires instant
            await store.deliver_checked(ALICE, old.digest, "k", message(token_id=old.id), BIG, NOW + 10)
        assert await fetch_all(store) == []
        accepted = await store.deliver_checked(ALICE, good.digest, f"{good.digest}:p1", sent, BIG, NOW)
        assert isinstance(accepted, Accepted) and accepted.user == user(ALICE, push="https://push.example/a")
        assert accepted.delivery.duplicate is False
        again = await store.deliver_checked(ALICE, good.digest, f"{good.digest}:p1", sent, BIG, NOW + 1)
        assert again.delivery == Delivery(accepted.delivery.message_id, sent.expires, True)
        assert await fetch_all(store) == [record_of(accepted.delivery, sent)]
        with pytest.raises(QuotaExceeded):
            await store.deliver_checked(ALICE, good.digest, "k2", sent, Quota(1, 10_000), NOW)
        await store.revoke_token(ALICE, good.id)
        with pytest.raises(TokenRefused):
            await store.deliver_checked(ALICE, good.digest, "k3", sent, BIG, NOW)

    # -- dedup -----------------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_dedup_returns_same_id_and_stores_nothing(self, store):
        await store.add_user(user(ALICE))
        first = await store.deliver(ALICE, "tok:packet-1", message(data="first"), BIG, NOW)
        second = await store.deliver(ALICE, "tok:packet-1", message(data="second", expires=NOW + 9 * HOUR), BIG, NOW + 5)
        assert second == Delivery(first.message_id, first.expires, True)
        assert [m.data for m in await fetch_all(store)] == ["first"]  # the first copy wins

    @pytest_twisted.ensureDeferred
    async def test_dedup_survives_acknowledgement(self, store):
        await store.add_user(user(ALICE))
        first = await store.deliver(ALICE, "tok:p", message(), BIG, NOW)
        assert await store.acknowledge(ALICE, [first.message_id]) == 1
        again = await store.deliver(ALICE, "tok:p", message(), BIG, NOW + 10)
        assert again == Delivery(first.message_id, first.expires, True)
        assert await fetch_all(store, now=NOW + 10) == []

    @pytest_twisted.ensureDeferred
    async def test_dedup_key_is_per_token_and_per_user(self, store):
        await store.add_user(user(ALICE))
        await store.add_user(user(BOB))
        a = await store.deliver(ALICE, "token-a:p1", message(), BIG, NOW)
        b = await store.deliver(ALICE, "token-b:p1", message(), BIG, NOW)
        c = await store.deliver(BOB, "token-a:p1", message(), BIG, NOW)
        assert not (a.duplicate or b.duplicate or c.duplicate)
        assert len({a.message_id, b.message_id}) == 2
        assert len(await fetch_all(store)) == 2 and len(await fetch_all(store, BOB)) == 1

    @pytest_twisted.ensureDeferred
    async def test_dedup_ends_at_the_first_copys_expiry(self, store):
        await store.add_user(user(ALICE))
        first = await store.deliver(ALICE, "k", message(expires=NOW + 100), BIG, NOW)
        assert (await store.deliver(ALICE, "k", message(), BIG, NOW + 99)).duplicate is True
        later = await store.deliver(ALICE, "k", message(data="new", expires=NOW + 500), BIG, NOW + 100)
        assert later.duplicate is False and later.message_id != first.message_id
        assert [m.data for m in await fetch_all(store, now=NOW + 100)] == ["new"]
        # Reclaimed by expire too, with the same outcome.
        await store.expire(NOW + 500)
        assert (await store.deliver(ALICE, "k", message(expires=NOW + 900), BIG, NOW + 500)).duplicate is False

    @pytest_twisted.ensureDeferred
    async def test_concurrent_duplicates_store_one_copy(self, store):
        await store.add_user(user(ALICE))
        results = await defer.gatherResults(
            [store.deliver(ALICE, "same", message(data=str(i)), BIG, NOW) for i in range(12)], consumeErrors=True
        )
        assert len({r.message_id for r in results}) == 1
        assert sum(not r.duplicate for r in results) == 1
        assert len(await fetch_all(store)) == 1

    # -- quota -----------------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_quota_by_count(self, store):
        await store.add_user(user(ALICE))
        quota = Quota(max_messages=2, max_bytes=10_000)
        first = await store.deliver(ALICE, "k1", message(), quota, NOW)
        await store.deliver(ALICE, "k2", message(), quota, NOW)
        with pytest.raises(QuotaExceeded):
            await store.deliver(ALICE, "k3", message(), quota, NOW)
        assert len(await fetch_all(store)) == 2
        # A refused packet left no dedup record: after room is made it is stored.
        await store.acknowledge(ALICE, [first.message_id])
        assert (await store.deliver(ALICE, "k3", message(), quota, NOW)).duplicate is False

    @pytest_twisted.ensureDeferred
    async def test_quota_by_bytes(self, store):
        await store.add_user(user(ALICE))
        m = message(data="x" * 60, password="p" * 30, signature="s" * 10)
        assert m.size == 100
        quota = Quota(max_messages=100, max_bytes=250)
        await store.deliver(ALICE, "k1", m, quota, NOW)
        await store.deliver(ALICE, "k2", m, quota, NOW)
        with pytest.raises(QuotaExceeded):
            await store.deliver(ALICE, "k3", m, quota, NOW)
        fits = message(data="x" * 40, password="p" * 10, signature=None)
        assert fits.size == 50
        assert (await store.deliver(ALICE, "k4", fits, quota, NOW)).duplicate is False  # exactly full
        assert len(await fetch_all(store)) == 3

    @pytest_twisted.ensureDeferred
    async def test_quota_counts_utf8_bytes_not_characters(self, store):
        """docs/protocol.md section 6: quotas count stored bytes (an emoji is 4 of them)."""
        await store.add_user(user(ALICE))
        emoji = message(data="\U0001F600" * 20, password="é" * 5, signature=None)
        assert emoji.size == 20 * 4 + 5 * 2
        quota = Quota(max_messages=100, max_bytes=150)
        await store.deliver(ALICE, "k1", emoji, quota, NOW)  # 90 bytes (25 characters)
        with pytest.raises(QuotaExceeded):
            await store.deliver(ALICE, "k2", emoji, quota, NOW)  # 180 bytes would not fit
        stats = await store.stats(NOW)
        assert stats["bytes"] == 90
        [stored] = await fetch_all(store)
        assert stored.data == emoji.data and stored.password == emoji.password

    @pytest_twisted.ensureDeferred
    async def test_usage_counts_one_users_pending_unexpired_messages(self, store):
        assert await store.usage(ALICE, NOW) == (0, 0)  # unknown user
        await store.add_user(user(ALICE))
        await store.add_user(user(BOB))
        assert await store.usage(ALICE, NOW) == (0, 0)
        short = message(data="a" * 10, password="p" * 10, expires=NOW + 10)
        long = message(data="b" * 20, password="p" * 10, signature="s" * 4)
        first = await store.deliver(ALICE, "k1", short, BIG, NOW)
        await store.deliver(ALICE, "k2", long, BIG, NOW)
        await store.deliver(BOB, "k1", long, BIG, NOW)
        assert await store.usage(ALICE, NOW) == (2, short.size + long.size)
        assert await store.usage(ALICE, NOW + 10) == (1, long.size)  # short has expired
        await store.acknowledge(ALICE, [first.message_id])
        assert await store.usage(ALICE, NOW) == (1, long.size)
        assert await store.usage(BOB, NOW) == (1, long.size)

    @pytest_twisted.ensureDeferred
    async def test_duplicate_bypasses_full_quota(self, store):
        await store.add_user(user(ALICE))
        quota = Quota(max_messages=1, max_bytes=10_000)
        first = await store.deliver(ALICE, "k1", message(), quota, NOW)
        again = await store.deliver(ALICE, "k1", message(), quota, NOW)
        assert again == Delivery(first.message_id, first.expires, True)

    @pytest_twisted.ensureDeferred
    async def test_expired_messages_do_not_count_against_quota(self, store):
        await store.add_user(user(ALICE))
        quota = Quota(max_messages=1, max_bytes=10_000)
        await store.deliver(ALICE, "k1", message(expires=NOW + 10), quota, NOW)
        with pytest.raises(QuotaExceeded):
            await store.deliver(ALICE, "k2", message(), quota, NOW + 9)
        assert (await store.deliver(ALICE, "k2", message(expires=NOW + 100), quota, NOW + 10)).duplicate is False

    @pytest_twisted.ensureDeferred
    async def test_concurrent_deliveries_never_exceed_quota(self, store):
        await store.add_user(user(ALICE))
        quota = Quota(max_messages=5, max_bytes=10_000)
        attempts = [store.deliver(ALICE, f"k{i}", message(), quota, NOW) for i in range(15)]
        outcomes = await defer.DeferredList(attempts, consumeErrors=True)
        stored = [r for ok, r in outcomes if ok]
        refused = [r for ok, r in outcomes if not ok]
        assert len(stored) == 5 and len(refused) == 10
        assert all(f.check(QuotaExceeded) for f in refused)
        assert len(await fetch_all(store)) == 5

    # -- expiry ----------------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_expired_messages_are_hidden_then_reclaimed(self, store):
        await store.add_user(user(ALICE))
        await store.add_user(user(BOB))
        short = await store.deliver(ALICE, "k1", message(data="short", expires=NOW + 10), BIG, NOW)
        await store.deliver(ALICE, "k2", message(data="long", expires=NOW + 1000), BIG, NOW)
        await store.deliver(BOB, "k1", message(data="bob", expires=NOW + 10), BIG, NOW)
        assert [m.data for m in await fetch_all(store, now=NOW + 9)] == ["short", "long"]
        messages, remaining = await store.fetch(ALICE, NOW + 10, 1)
        assert [m.data for m in messages] == ["long"] and remaining == 0
        assert await store.fetch(BOB, NOW + 10, 10) == ([], 0)
        assert await store.expire(NOW + 10) == 2
        assert await store.expire(NOW + 10) == 0
        # Gone for good: even an earlier clock does not bring it back.
        assert [m.data for m in await fetch_all(store, now=NOW)] == ["long"]
        assert await store.acknowledge(ALICE, [short.message_id]) == 0

    @pytest_twisted.ensureDeferred
    async def test_expire_on_empty_store(self, store):
        assert await store.expire(NOW) == 0

    # -- replay cache ------------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_replay_cache(self, store):
        digest = hashlib.sha256(b"signature one").digest()
        other = hashlib.sha256(b"signature two").digest()
        assert await store.remember_signature(digest, NOW + 300, NOW) is True
        assert await store.remember_signature(digest, NOW + 300, NOW + 1) is False
        assert await store.remember_signature(digest, NOW + 900, NOW + 299) is False
        assert await store.remember_signature(other, NOW + 300, NOW + 1) is True
        # Past its until the entry counts as absent, and the new use is recorded again.
        assert await store.remember_signature(digest, NOW + 1000, NOW + 301) is True
        assert await store.remember_signature(digest, NOW + 1000, NOW + 302) is False

    @pytest_twisted.ensureDeferred
    async def test_remember_and_fetch_reads_only_on_first_use(self, store):
        await store.add_user(user(ALICE))
        ids = [(await store.deliver(ALICE, f"k{i}", message(data=f"m{i}"), BIG, NOW)).message_id for i in range(3)]
        digest = hashlib.sha256(b"signed fetch").digest()
        page, remaining = await store.remember_and_fetch(digest, NOW + 300, NOW, ALICE, 2, None)
        assert [m.message_id for m in page] == ids[:2] and remaining == 1
        assert await store.remember_and_fetch(digest, NOW + 300, NOW + 1, ALICE, 2, None) is None
        # The entry is the replay cache's own: remember_signature sees it, and the reverse.
        assert await store.remember_signature(digest, NOW + 300, NOW + 2) is False
        other = hashlib.sha256(b"another").digest()
        assert await store.remember_signature(other, NOW + 300, NOW) is True
        assert await store.remember_and_fetch(other, NOW + 300, NOW, ALICE, 10, None) is None
        page, remaining = await store.remember_and_fetch(hashlib.sha256(b"third").digest(), NOW + 300, NOW, ALICE,
                                                         10, 1)
        assert [m.message_id for m in page] == ids[:1] and remaining == 2  # max_bytes reaches fetch
        # A user who does not exist (never added, or erased) is a LookupError, not an empty
        # page: the relay skips looking the user up before fetching when it knows the key.
        with pytest.raises(LookupError):
            await store.remember_and_fetch(hashlib.sha256(b"fourth").digest(), NOW + 300, NOW, "nobody" * 5, 10, None)
        await store.add_user(user(BOB))
        assert await store.remember_and_fetch(hashlib.sha256(b"fifth").digest(), NOW + 300, NOW, BOB,
                                              10, None) == ([], 0)
        assert await store.delete_user(BOB) is True
        with pytest.raises(LookupError):
            await store.remember_and_fetch(hashlib.sha256(b"sixth").digest(), NOW + 300, NOW, BOB, 10, None)

    @pytest_twisted.ensureDeferred
    async def test_remember_and_acknowledge_deletes_only_on_first_use(self, store):
        ids, bobs = await alice_and_bob_with_messages(store, 4)
        digest = hashlib.sha256(b"signed acknowledgement").digest()
        # Bob's id and junk are ignored, as acknowledge does.
        assert await store.remember_and_acknowledge(digest, NOW + 300, NOW, ALICE, [ids[0], bobs, "x" * 20]) == 1
        assert await store.remember_and_acknowledge(digest, NOW + 300, NOW + 1, ALICE, ids) is None  # a replay
        assert await store.remember_signature(digest, NOW + 300, NOW + 2) is False
        other = hashlib.sha256(b"seen before").digest()
        assert await store.remember_signature(other, NOW + 300, NOW) is True
        assert await store.remember_and_acknowledge(other, NOW + 300, NOW, ALICE, ids) is None
        page, remaining = await store.fetch(ALICE, NOW, 10)
        assert [m.message_id for m in page] == ids[1:] and remaining == 0  # a replay deleted nothing
        assert await store.remember_and_acknowledge(hashlib.sha256(b"third").digest(), NOW + 300, NOW, ALICE,
                                                    ids + ids) == 3
        assert (await store.fetch(ALICE, NOW, 10))[0] == [] and (await store.fetch(BOB, NOW, 10))[0] != []
        assert await store.remember_and_acknowledge(hashlib.sha256(b"fourth").digest(), NOW + 300, NOW, ALICE,
                                                    []) == 0
        # The quota sees the room the deletions made.
        quota = Quota(1, 10**9)
        await store.deliver(ALICE, "again", message(), quota, NOW)
        with pytest.raises(LookupError):
            await store.remember_and_acknowledge(hashlib.sha256(b"fifth").digest(), NOW + 300, NOW, "nobody" * 5, ids)
        assert await store.delete_user(BOB) is True
        with pytest.raises(LookupError):
            await store.remember_and_acknowledge(hashlib.sha256(b"sixth").digest(), NOW + 300, NOW, BOB, [bobs])

    @pytest_twisted.ensureDeferred
    async def test_replay_entries_expire(self, store):
        digest = hashlib.sha256(b"sig").digest()
        assert await store.remember_signature(digest, NOW + 300, NOW) is True
        await store.expire(NOW + 200)
        assert await store.remember_signature(digest, NOW + 300, NOW + 200) is False
        await store.expire(NOW + 300)
        assert await store.remember_signature(digest, NOW + 600, NOW + 300) is True

    @pytest_twisted.ensureDeferred
    async def test_concurrent_replays_admit_one(self, store):
        digest = hashlib.sha256(b"raced").digest()
        results = await defer.gatherResults(
            [store.remember_signature(digest, NOW + 300, NOW) for _ in range(12)], consumeErrors=True
        )
        assert sorted(results) == [False] * 11 + [True]
        stale = await defer.gatherResults(
            [store.remember_signature(digest, NOW + 900, NOW + 400) for _ in range(12)], consumeErrors=True
        )
        assert sorted(stale) == [False] * 11 + [True]

    @pytest_twisted.ensureDeferred
    async def test_concurrent_signed_fetches_with_one_signature_answer_once(self, store):
        await store.add_user(user(ALICE))
        await store.deliver(ALICE, "k", message(), BIG, NOW)
        digest = hashlib.sha256(b"one fetch, sent twelve times").digest()
        pages = await defer.gatherResults(
            [store.remember_and_fetch(digest, NOW + 300, NOW, ALICE, 10, None) for _ in range(12)],
            consumeErrors=True,
        )
        answered = [page for page in pages if page is not None]
        assert len(answered) == 1 and len(answered[0][0]) == 1 and answered[0][1] == 0

    @pytest_twisted.ensureDeferred
    async def test_concurrent_signed_acknowledgements_with_one_signature_delete_once(self, store):
        await store.add_user(user(ALICE))
        sent = (await store.deliver(ALICE, "k", message(), BIG, NOW)).message_id
        digest = hashlib.sha256(b"one acknowledgement, sent twelve times").digest()
        answers = await defer.gatherResults(
            [store.remember_and_acknowledge(digest, NOW + 300, NOW, ALICE, [sent]) for _ in range(12)],
            consumeErrors=True,
        )
        assert sorted(answers, key=lambda a: a is None) == [1] + [None] * 11

    # -- health and stats --------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_check_writable(self, store):
        assert await store.check_writable() is None
        assert await store.check_writable() is None

    @pytest_twisted.ensureDeferred
    async def test_stats(self, store):
        stats = await store.stats(NOW)
        assert {k: stats[k] for k in ("users", "messages", "bytes", "oldest_received")} == {
            "users": 0, "messages": 0, "bytes": 0, "oldest_received": None,
        }
        await store.add_user(user(ALICE))
        await store.add_user(user(BOB))
        await store.add_user(user(CAROL))
        a = message(data="a" * 10, password="p" * 10, received=NOW - 50, expires=NOW + 10)
        b = message(data="b" * 20, password="p" * 10, received=NOW - 20)
        c = message(data="c" * 30, password="p" * 10, signature="s" * 5, received=NOW - 5)
        await store.deliver(ALICE, "k1", a, BIG, NOW)
        await store.deliver(ALICE, "k2", b, BIG, NOW)
        await store.deliver(BOB, "k1", c, BIG, NOW)
        stats = await store.stats(NOW)
        assert (stats["users"], stats["messages"], stats["bytes"], stats["oldest_received"]) == (
            3, 3, a.size + b.size + c.size, NOW - 50,
        )
        stats = await store.stats(NOW + 10)  # a has expired (not yet reclaimed)
        assert (stats["messages"], stats["bytes"], stats["oldest_received"]) == (2, b.size + c.size, NOW - 20)
        await store.delete_user(BOB)
        stats = await store.stats(NOW + 10)
        assert (stats["users"], stats["messages"], stats["bytes"]) == (2, 1, b.size)
