"""The relay's domain operations (docs/protocol.md sections 4-6), free of HTTP.

The store, clock and keyring are injected; the web layer only translates. Observers
hear of each stored message (push) and a forwarder, when set, takes remote packets.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from typing import Any, Callable, ClassVar, Optional, Protocol, Sequence, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from cryptography.hazmat.primitives.asymmetric import rsa

from . import __version__
from .keytransitions import listed
from .serverkey import ServerKeyring
from .settings import Reload, Settings
from .userkeys import UserKeys
from .store.interface import (
    IStore, MessageRecord, NewMessage, Quota, QuotaExceeded, StoreUnavailable, TokenRecord, TokenRefused, UserRecord,
)
from .wire.canonical import parse_json_object
from .wire.dates import format_date
from .wire.envelope import AES_GCM, ALGORITHMS, open_envelope, seal
from .wire.errors import ProtocolError, malformed
from .wire.fetchanswer import EncodedJSON, bounded_encoded_list
from .wire.keys import cached_public_key, fingerprint, is_user_id, load_public_key, public_key_pem, user_id_for_key
from .wire.packet import Packet, parse_packet
from .wire.signing import SignedRequest, check_time_window, verify_signature

log = Logger()

#: The longest token lifetime a client may ask for (ten years), beyond which `expires_in` is refused.
MAX_TOKEN_SECONDS = 10 * 365 * 86400
MAX_LABEL_CHARS = 200
MAX_ACK_IDS = 1000  # message ids in one acknowledgement
MAX_FETCH_LIMIT = 1000  # messages in one fetch answer (`limit`, `limits.fetch_default`)
MAX_PUSH_URL_CHARS = 2048

#: Runs a CPU-bound call off the reactor thread and fires its result: `run(fn, *args)`.
Executor = Callable[..., Deferred]


class Forwarder(Protocol):
    """Takes packets for users of other relays (federation, docs/protocol.md section 7)."""

    def forward(self, packet: Packet, received: int, expires: int, forwarded_by: Optional[str]) -> Any:
        """Queue durably; fire (message id, expires), the first packet's for a duplicate.
        Raise ProtocolError(122) for a refused destination."""


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_push_endpoint(value: str) -> Optional[str]:
    """`None` for "" (clear), else the https URL; errno 100 for anything else."""
    if value == "":
        return None
    if len(value) > MAX_PUSH_URL_CHARS or not value.startswith("https://") or len(value) <= len("https://"):
        raise malformed(f"push_endpoint must be an https:// URL of at most {MAX_PUSH_URL_CHARS} characters, or \"\"")
    return value


#: Fetch answers whose messages carry at most this many payload characters (data, password
#: and signature) are sealed on the reactor thread: bounded work (0.44 ms for ten 2 KiB
#: messages on a slow 2-core machine) that costs less than the two thread hand-offs of the
#: crypto pool under load (bench/README.md, "Where the time goes"). Bigger answers go to the
#: crypto pool.
SEAL_INLINE_BYTES = 32 * 1024


def seal_fetch_answer(key: rsa.RSAPublicKey, messages: list[MessageRecord], max_bytes: int,
                      remaining: int) -> EncodedJSON:
    """The whole fetch answer, encoded: the leading messages that fit in `max_bytes`, sealed
    to `key` (AES-256-GCM), with `count` and `remaining` (`remaining` counts those left in
    the store). The answer grows with the messages (hundreds of kilobytes of base64 to
    check, encrypt and encode), so a big one runs in a worker thread, answer JSON included."""
    plaintext, count = bounded_encoded_list((m.encoded() for m in messages), max_bytes)
    sealed = seal(key, plaintext, AES_GCM)
    # What json.dumps would write, without scanning the big base64 string for characters to
    # escape: base64 and the algorithm name have none.
    return EncodedJSON(
        f'{{"algorithm":"{sealed["algorithm"]}","password":"{sealed["password"]}","data":"{sealed["data"]}",'
        f'"count":{count},"remaining":{remaining + len(messages) - count}}}'.encode("ascii"))


def _tell(observers: list[Callable[..., None]], *args: Any) -> None:
    """Call every observer; one that fails is logged and never fails the request."""
    for observer in observers:
        try:
            observer(*args)
        except Exception:
            log.failure("observer {observer!r} failed", observer=observer)


def _replayed() -> ProtocolError:
    return ProtocolError(112, "this signed request was already used; sign every request afresh")


def _unknown_user(user_id: str) -> ProtocolError:
    return ProtocolError(130, f"no user {user_id} on this relay")


async def _guard(deferred: Any) -> Any:
    """Await a store call, turning a store outage into errno 180."""
    try:
        return await deferred
    except StoreUnavailable as e:
        raise ProtocolError(180, f"storage unavailable: {e}")


class RelayCore:
    #: Reconfigurable: a reload hands over the whole new settings object.
    settings_sections: ClassVar[frozenset[str]] = frozenset({"server", "limits", "registration"})

    def __init__(self, settings: Settings, store: IStore, keyring: ServerKeyring, clock: IReactorTime, *,
                 forwarder: Optional[Forwarder] = None,
                 message_observers: Sequence[Callable[[UserRecord, str], None]] = (),
                 stored_observers: Sequence[Callable[[NewMessage], None]] = (),
                 expired_observers: Sequence[Callable[[int], None]] = (),
                 run_crypto: Optional[Executor] = None):
        """`run_crypto` runs work that grows with input size (opening packets: RSA, which
        releases the GIL, so it uses another core; sealing fetch answers) off the reactor
        thread: the relay's crypto pool (msgrelay/pools.py); by default a small pool of the
        core's own, stopped at shutdown."""
        self.settings = settings
        self.store = store
        self.keyring = keyring
        self.clock = clock
        #: Takes packets for other relays; None: federation is not wired (errno 122).
        self.forwarder = forwarder
        #: Told (recipient, message id) of each stored message (push).
        self.message_observers = list(message_observers)
        #: Told each newly stored message (not duplicates), e.g. for metrics.
        self.stored_observers = list(stored_observers)
        #: Told how many messages each expiry sweep removed.
        self.expired_observers = list(expired_observers)
        self._own_pool: Optional[ThreadPool] = None
        self._own_pool_trigger: Any = None
        self.run_crypto: Executor = run_crypto or self._in_own_pool
        #: Keys of users who fetched or acknowledged lately: their next such request skips
        #: the user lookup.
        self.user_keys = UserKeys()

    def reconfigure(self, reload: Reload) -> None:
        self.settings = reload.running

    def _in_own_pool(self, function: Callable[..., Any], *args: Any) -> Deferred:
        if self._own_pool is None:
            self._own_pool = ThreadPool(0, 2, "msgrelay-seal")
            self._own_pool.start()
            self._own_pool_trigger = self.clock.addSystemEventTrigger(  # type: ignore[attr-defined]
                "during", "shutdown", self.close)
        return deferToThreadPool(cast(Any, self.clock), self._own_pool, function, *args)

    def close(self) -> None:
        """Stop the core's own worker threads, if it started any (the service stops it)."""
        pool, self._own_pool = self._own_pool, None
        if pool is not None:
            self.clock.removeSystemEventTrigger(self._own_pool_trigger)  # type: ignore[attr-defined]
            pool.stop()

    @property
    def name(self) -> str:
        return self.settings.server.name

    def now(self) -> int:
        return int(self.clock.seconds())

    # -- server ---------------------------------------------------------------

    def server_info(self) -> dict[str, Any]:
        limits = self.settings.limits
        now = self.clock.seconds()
        return {
            "name": self.name,
            "key": self.keyring.public_pem,
            "fingerprint": self.keyring.fingerprint,
            "algorithms": list(ALGORITHMS),
            "max_body_bytes": limits.max_body_bytes,
            "max_fetch_bytes": limits.max_fetch_bytes,
            "default_ttl": limits.default_ttl,
            "max_ttl": limits.max_ttl,
            "max_validity": limits.max_validity,
            "version": __version__,
            "previous_keys": [
                {
                    "key": public_key_pem(p.key.public_key()),
                    "fingerprint": fingerprint(p.key.public_key()),
                    "until": format_date(p.until),
                }
                for p in self.keyring.previous
                if now < p.until
            ],
            "key_transitions": listed(self.keyring.transitions, now, self.settings.server.key_transition_keep),
        }

    async def health(self) -> dict[str, str]:
        await _guard(self.store.check_writable())
        return {"status": "ok"}

    # -- users ----------------------------------------------------------------

    async def register(self, body: dict[str, Any]) -> dict[str, str]:
        if "push_endpoint" in body:
            # Revision 2: anyone may register anyone's public key, so an endpoint set here
            # would let a stranger watch the victim's mail arrive.
            raise malformed("push_endpoint cannot be set at registration; use the signed PUT /api/v1/user")
        for name in body:
            if name not in ("key", "registration_token"):
                raise malformed(f"unknown parameter {name!r}")
        for name in body:
            if not isinstance(body[name], str):
                raise malformed(f"{name} must be a string")
        if "key" not in body:
            raise malformed("key is missing")
        key = load_public_key(body["key"])
        user_id = user_id_for_key(key)
        if await _guard(self.store.get_user(user_id)) is not None:
            return {"user_id": user_id}
        self._check_registration_allowed(body.get("registration_token"))
        record = UserRecord(user_id, public_key_pem(key), None, self.now())
        added = await _guard(self.store.add_user(record))
        if added:
            log.info("registered user {user_id}", user_id=user_id)
        return {"user_id": user_id}

    def _check_registration_allowed(self, offered: Optional[str]) -> None:
        mode = self.settings.registration.mode
        if mode == "closed":
            raise ProtocolError(121, "registration is closed on this relay")
        if mode == "token":
            if offered is None:
                raise ProtocolError(121, "registration_token is required on this relay")
            offered_bytes = offered.encode("utf-8")
            if not any(hmac.compare_digest(offered_bytes, t.encode("utf-8")) for t in self.settings.registration.tokens):
                raise ProtocolError(121, "registration_token is not valid")

    async def lookup_user(self, user_id: str) -> dict[str, str]:
        if not is_user_id(user_id):
            raise ProtocolError(106, "user id in the path must be a bare 32-character id of [a-z2-7]")
        user = await _guard(self.store.get_user(user_id))
        if user is None:
            raise _unknown_user(user_id)
        return {"user_id": user.user_id, "key": user.key_pem}

    async def authenticate(
        self, request: SignedRequest, method: str, path: str, limit: Optional[Callable[[str], None]] = None
    ) -> UserRecord:
        """Time window (105, 111), user (130), signature (110), replay (112), in that order.

        `limit`, the endpoint's per-user rate limit, runs once the signature verified and
        before the replay cache is written: a refused request costs no durable write.
        """
        user, replay = await self._verify(request, method, path, limit)
        if not await _guard(self.store.remember_signature(*replay)):
            raise _replayed()
        return user

    async def _verify(
        self, request: SignedRequest, method: str, path: str, limit: Optional[Callable[[str], None]]
    ) -> tuple[UserRecord, tuple[bytes, int, int]]:
        """`authenticate` up to the replay cache: the user, and the replay entry to record
        (digest, until, now) as `IStore.remember_signature` takes it."""
        now = self._in_window(request)
        user = await _guard(self.store.get_user(request.user_id))
        if user is None:
            raise _unknown_user(request.user_id)
        return user, self._verified(request, method, path, user.key_pem, limit, now)

    def _in_window(self, request: SignedRequest) -> float:
        """Date and validity (105, 111); the current time."""
        limits = self.settings.limits
        now = self.clock.seconds()
        check_time_window(request.date, request.validity, now, limits.max_skew, limits.max_validity)
        return now

    def _verified(self, request: SignedRequest, method: str, path: str, key_pem: str,
                  limit: Optional[Callable[[str], None]], now: float) -> tuple[bytes, int, int]:
        """Signature (110) and the per-user limit; the replay entry to record."""
        verify_signature(cached_public_key(key_pem), request.signature, request.base(method, path, self.name))
        if limit is not None:
            limit(request.user_id)
        digest = hashlib.sha256(request.signature.encode("ascii")).digest()
        # Live while now < until: strictly past the last instant the request is valid.
        until = math.floor(request.date + request.validity + self.settings.limits.max_skew) + 1
        return digest, until, int(now)

    async def account(self, user: UserRecord) -> dict[str, Any]:
        """The caller's own account (signed GET /user): what is stored about it, and its quota."""
        now = self.now()
        pending, pending_bytes = await _guard(self.store.usage(user.user_id, now))
        tokens = await _guard(self.store.list_tokens(user.user_id))
        limits = self.settings.limits
        return {
            "user_id": user.user_id,
            "created": format_date(user.created),
            "push_endpoint": user.push_endpoint,
            "pending": pending,
            "pending_bytes": pending_bytes,
            "tokens": sum(1 for t in tokens if t.is_valid(now)),
            "quota_messages": limits.quota_messages,
            "quota_bytes": limits.quota_bytes,
        }

    async def set_push_endpoint(self, user: UserRecord, value: str) -> dict[str, Any]:
        endpoint = check_push_endpoint(value)
        await _guard(self.store.set_push_endpoint(user.user_id, endpoint))
        return {}

    async def delete_user(self, user: UserRecord) -> dict[str, Any]:
        self.user_keys.forget(user.user_id)
        await _guard(self.store.delete_user(user.user_id))
        log.info("user {user_id} erased their account", user_id=user.user_id)
        return {}

    # -- tokens ---------------------------------------------------------------

    def check_token_request(self, expires_in: Optional[int], label: Optional[str]) -> None:
        """Shape checks of POST /token parameters (errno 100), done before authentication."""
        if expires_in is not None:
            if expires_in < 0 or expires_in > MAX_TOKEN_SECONDS:
                raise malformed(f"expires_in must be between 0 and {MAX_TOKEN_SECONDS} seconds")
            if expires_in == 0 and not self.settings.limits.allow_permanent_tokens:
                raise malformed("expires_in 0 (never expires) is not allowed on this relay")
        if label is not None and len(label) > MAX_LABEL_CHARS:
            raise malformed(f"label is longer than {MAX_LABEL_CHARS} characters")

    async def mint_token(self, user: UserRecord, expires_in: Optional[int], label: Optional[str]) -> dict[str, Any]:
        lifetime = self.settings.limits.token_lifetime if expires_in is None else expires_in
        now = self.now()
        cap = self.settings.limits.max_tokens_per_user
        held = await _guard(self.store.list_tokens(user.user_id))
        if sum(1 for t in held if t.is_valid(now)) >= cap:
            raise ProtocolError(160, f"this user already holds {cap} live tokens (limits.max_tokens_per_user); "
                                     "revoke one before minting another")
        token = secrets.token_urlsafe(32)
        digest = token_digest(token)
        expires = None if lifetime == 0 else now + lifetime
        record = TokenRecord(digest[:16], digest, label, now, expires)
        try:
            await _guard(self.store.add_token(user.user_id, record))
        except LookupError:
            raise _unknown_user(user.user_id)
        return {"token": token, "id": record.id, "expires": None if expires is None else format_date(expires)}

    async def list_tokens(self, user: UserRecord) -> dict[str, Any]:
        tokens = await _guard(self.store.list_tokens(user.user_id))
        return {"tokens": [t.to_json() for t in tokens]}

    async def revoke_token(self, user: UserRecord, token: Optional[str], token_id: Optional[str]) -> dict[str, Any]:
        wanted = token_digest(token)[:16] if token is not None else token_id
        assert wanted is not None
        if not await _guard(self.store.revoke_token(user.user_id, wanted)):
            raise ProtocolError(131, "no such token for this user")
        return {"revoked": 1}

    # -- messages -------------------------------------------------------------

    def open_packet(self, envelope: dict[str, Any]) -> Packet:
        """Decrypt the outer envelope (100, 102, 103) and check the packet (104, 102, 106)."""
        plaintext = open_envelope(self.keyring.decryption_keys(self.clock.seconds()), envelope)
        return parse_packet(parse_json_object(plaintext, errno=104, what="packet"))

    async def accept_message(self, envelope: dict[str, Any], forwarded_by: Optional[str] = None) -> dict[str, Any]:
        packet = await self.run_crypto(self.open_packet, envelope)
        now = self.now()
        limits = self.settings.limits
        ttl = min(packet.ttl if packet.ttl is not None else limits.default_ttl, limits.max_ttl)
        expires = now + ttl
        if not packet.address.is_local_to(self.name):
            if forwarded_by is not None:
                raise ProtocolError(122, "a forwarded packet is never forwarded again")
            if self.forwarder is None:
                raise ProtocolError(122, f"federation is off; {packet.address.server_name} is not this relay")
            message_id, expires = await self.forwarder.forward(packet, now, expires, forwarded_by)
            return {"message_id": message_id, "expires": format_date(expires)}
        # User, token and delivery in one store call: the token id is the digest's first
        # 16 characters, so the message and its dedup key are known before any lookup.
        user_id, digest = packet.address.user_id, token_digest(packet.token)
        message = NewMessage(digest[:16], packet.data, packet.algorithm, packet.password, packet.signature, now, expires)
        quota = Quota(limits.quota_messages, limits.quota_bytes)
        try:
            accepted = await _guard(self.store.deliver_checked(user_id, digest, f"{digest}:{packet.id}", message, quota, now))
        except LookupError:
            raise _unknown_user(user_id)
        except TokenRefused:
            raise ProtocolError(120, "access token is invalid, expired or revoked")
        except QuotaExceeded as e:
            raise ProtocolError(160, f"the recipient's mailbox is full: {e}")
        delivery = accepted.delivery
        if not delivery.duplicate:
            _tell(self.stored_observers, message)
            _tell(self.message_observers, accepted.user, delivery.message_id)
        return {"message_id": delivery.message_id, "expires": format_date(delivery.expires)}

    async def signed_fetch(self, request: SignedRequest, method: str, path: str, limit: Optional[int],
                           rate_limit: Optional[Callable[[str], None]] = None) -> EncodedJSON:
        """`authenticate` then `fetch`, with the replay entry and the read in one store call
        (`IStore.remember_and_fetch`)."""
        count, max_bytes = self._fetch_bounds(limit)
        key_pem, page = await self._signed_store_call(
            request, method, path, rate_limit,
            lambda replay: self.store.remember_and_fetch(*replay, request.user_id, count, max_bytes))
        return await self._seal_answer(key_pem, page[0], max_bytes, page[1])

    async def signed_acknowledge(self, request: SignedRequest, method: str, path: str, ids: list[str],
                                 rate_limit: Optional[Callable[[str], None]] = None) -> dict[str, int]:
        """`authenticate` then `acknowledge`, in one store call (`IStore.remember_and_acknowledge`)."""
        _, deleted = await self._signed_store_call(
            request, method, path, rate_limit,
            lambda replay: self.store.remember_and_acknowledge(*replay, request.user_id, ids))
        return {"deleted": deleted}

    async def _signed_store_call(self, request: SignedRequest, method: str, path: str,
                                 rate_limit: Optional[Callable[[str], None]],
                                 call: Callable[[tuple[bytes, int, int]], Any]) -> tuple[str, Any]:
        """`authenticate` with its replay entry written by `call(replay)`, a store call that
        also does the request's work and says whether the user still exists (LookupError):
        (the user's key, what `call` fired). The key comes from `user_keys` when the user
        signed lately, so the request costs one store round trip; else the user is looked up
        first, as `authenticate` does."""
        key_pem = self.user_keys.get(request.user_id)
        if key_pem is None:
            user, replay = await self._verify(request, method, path, rate_limit)
            key_pem = user.key_pem
        else:
            now = self._in_window(request)
            try:
                replay = self._verified(request, method, path, key_pem, rate_limit, now)
            except ProtocolError as e:
                if e.errno != 110:
                    raise
                # The protocol answers an unknown user (130) before a bad signature: ask
                # the store whether the user is still there before answering 110.
                self.user_keys.forget(request.user_id)
                user, replay = await self._verify(request, method, path, rate_limit)
        try:
            result = await _guard(call(replay))
        except LookupError:
            self.user_keys.forget(request.user_id)
            raise _unknown_user(request.user_id)
        self.user_keys.remember(request.user_id, key_pem)
        if result is None:
            raise _replayed()
        return key_pem, result

    def _fetch_bounds(self, limit: Optional[int]) -> tuple[int, int]:
        """(messages, payload bytes) one fetch may return."""
        return (self.settings.limits.fetch_default if limit is None else limit), self.settings.limits.max_fetch_bytes

    async def _seal_answer(self, key_pem: str, messages: list[MessageRecord], max_bytes: int,
                           remaining: int) -> EncodedJSON:
        # The store stopped on payload sizes (bounding memory); the exact cut on the encoded
        # plaintext, and the sealing, run off the reactor thread unless the answer is small.
        key = cached_public_key(key_pem)
        if sum(len(m.data) + len(m.password) + len(m.signature or "") for m in messages) <= SEAL_INLINE_BYTES:
            return seal_fetch_answer(key, messages, max_bytes, remaining)
        return await self.run_crypto(seal_fetch_answer, key, messages, max_bytes, remaining)

    async def expire(self) -> int:
        removed = await self.store.expire(self.now())
        _tell(self.expired_observers, removed)
        return removed
