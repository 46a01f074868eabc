"""The federation sender driven by a `task.Clock` and `treq.testing.StubTreq`: queue order,
backoff, Retry-After, permanent refusals, key refresh and pins, expiry, restarts, policy."""

from __future__ import annotations

import json
import os
import random
import stat
from typing import Any, Optional

import pytest
from treq.testing import StubTreq
from twisted.internet import task
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from msgrelay.federation.backoff import Backoff, parse_retry_after
from msgrelay.federation.deliverer import Deliverer, Outcome, classify
from msgrelay.federation.outbox import BackoffState, FederationOutbox, OutboxBusy
from msgrelay.federation.peerkeys import PeerKeys
from msgrelay.federation.peers import FederationPolicy, PeerError, parse_peer, parse_peer_table
from msgrelay.federation.queue import QueueState
from msgrelay.federation.service import FederationService
from msgrelay.wire.errors import ProtocolError
from msgrelay.wire.packet import parse_packet
from test_federation_fakes import FakePeer, logs, peer_key  # noqa: F401 (fixture)

UID = "a" * 32
T0 = 1_800_000_000


def fired(d: Deferred) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def packet(dest: str, n: int = 0, ttl: Any = None) -> Any:
    obj = {"id": f"p{n}", "user_id": f"{UID}@{dest}", "token": "tok", "data": "AAAA",
           "algorithm": "AES-256-GCM", "password": "BBBB"}
    if ttl is not None:
        obj["ttl"] = ttl
    return parse_packet(obj)


class HostRouter(Resource):
    """Send each request to the fake peer named by its Host header."""

    isLeaf = True

    def __init__(self, peers: dict[str, FakePeer]):
        super().__init__()
        self.peers = peers

    def render(self, request: Any) -> Any:
        host = request.getHeader(b"host").decode().split(":")[0]
        return self.peers[host].render(request)


class Harness:
    def __init__(self, tmp_path, peers: dict[str, FakePeer], mode: str = "allowlist", pins: Optional[dict[str, str]] = None,
                 **config: Any):
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.peers = peers
        pins = pins or {}
        entries = [f"{name}=https://{name}" + (f"#{pins[name]}" if name in pins else "") for name in peers]
        self.policy = FederationPolicy(mode, parse_peer_table(entries), "a.test")
        self.tmp_path = tmp_path
        self.config = {"backoff_min": 1, "backoff_max": 60, "timeout": 10, "key_refresh": 3600, "max_queue": 100000,
                       **config}
        self.sender = self.new_sender()

    def new_sender(self) -> FederationService:
        c = self.config
        http = StubTreq(HostRouter(self.peers))
        keys = PeerKeys(http, self.clock, c["key_refresh"], c["timeout"])
        deliverer = Deliverer(http, keys, self.clock, "a.test", c["timeout"])
        backoff = Backoff(c["backoff_min"], c["backoff_max"], random.Random(7))
        sender = FederationService(FederationOutbox.open(self.tmp_path / "outbox"), deliverer, backoff, self.policy,
                                   self.clock, c["max_queue"], run=maybeDeferred)
        sender.startService()
        return sender

    def send(self, dest: str, n: int, ttl: Any = None) -> dict:
        p = packet(dest, n, ttl)
        received = int(self.clock.seconds())
        expires = received + (ttl or 3600)
        return fired(Deferred.fromCoroutine(self.sender.forwarder.forward(p, received, expires, None)))

    def status(self, dest: str) -> dict:
        return next(s for s in self.sender.queue_status() if s["destination"] == dest)


@pytest.fixture
def harness(tmp_path):
    made: list[Harness] = []

    def make(*names: str, **kw: Any) -> Harness:
        h = Harness(tmp_path, {n: FakePeer(n, peer_key(0)) for n in names}, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        if h.sender.running:
            h.sender.stopService()


def test_packets_are_delivered_in_order_with_the_forwarding_header(harness):
    h = harness("b.test")
    ids = [h.send("b.test", n, ttl=600) for n in range(3)]
    assert len({i for i, _ in ids}) == 3
    peer = h.peers["b.test"]
    assert [p["id"] for p in peer.packets()] == ["p0", "p1", "p2"]
    first, headers = peer.received[0]
    assert headers["msgrelay-forwarded-by"] == ["a.test"]
    assert first["user_id"] == f"{UID}@b.test" and first["ttl"] == 600 and first["token"] == "tok"
    assert h.status("b.test")["queued"] == 0
    assert os.listdir(h.tmp_path / "outbox" / "b.test") == []


def test_forwarded_ttl_is_what_remains(harness):
    h = harness("b.test")
    h.peers["b.test"].script = [(503, {"errno": 180}, {})]
    h.send("b.test", 0, ttl=600)
    h.clock.advance(100)
    assert 495 <= h.peers["b.test"].packets()[0]["ttl"] <= 500


def test_503_is_retried_with_backoff_then_delivered(harness, logs):
    h = harness("b.test")
    h.peers["b.test"].script = [(503, {"errno": 180}, {}), (503, {"errno": 180}, {})]
    h.send("b.test", 0)
    status = h.status("b.test")
    assert status["queued"] == 1 and 0.5 <= status["backoff_seconds"] <= 1
    assert status["next_attempt"] == pytest.approx(T0 + status["backoff_seconds"])
    h.clock.advance(1)
    second = h.status("b.test")["backoff_seconds"]
    assert 1 <= second <= 2
    h.clock.advance(2)
    assert [p["id"] for p in h.peers["b.test"].packets()] == ["p0"]
    assert h.status("b.test") == {"destination": "b.test", "queued": 0, "oldest_age_seconds": 0.0,
                                  "backoff_seconds": 0.0, "failures": 0, "next_attempt": None, "pinned_ok": True}
    assert any("HTTP 503" in line for line in logs())


def test_backoff_doubles_to_its_ceiling_with_jitter():
    backoff = Backoff(1, 3600, random.Random(1))
    for failures, ceiling in [(1, 1), (2, 2), (3, 4), (7, 64), (13, 3600), (500, 3600)]:
        for _ in range(50):
            assert ceiling / 2 <= backoff.delay(failures) <= ceiling
    assert len({backoff.delay(5) for _ in range(20)}) > 1
    assert backoff.delay(1, at_least=30) == 30
    with pytest.raises(ValueError):
        Backoff(10, 5)


def test_retry_after_is_honoured(harness):
    h = harness("b.test")
    h.peers["b.test"].script = [(429, {"errno": 150}, {"Retry-After": "30"})]
    h.send("b.test", 0)
    assert h.status("b.test")["backoff_seconds"] == 30
    h.clock.advance(29)
    assert h.peers["b.test"].packets() == []
    h.clock.advance(1)
    assert len(h.peers["b.test"].packets()) == 1
    assert parse_retry_after(b"Wed, 21 Oct 2015 07:28:00 GMT", 1445412470) == 10
    assert parse_retry_after(b"junk", 0) is None and parse_retry_after(b"999999999", 0) == 86400


def test_permanent_refusal_drops_the_packet_and_the_queue_goes_on(harness, logs):
    h = harness("b.test")
    h.peers["b.test"].script = [(400, {"errno": 104, "message": "bad packet"}, {})]
    h.send("b.test", 0)
    h.send("b.test", 1)
    assert [p["id"] for p in h.peers["b.test"].packets()] == ["p1"]
    assert any("refused" in line and "errno 104" in line and "dropped" in line for line in logs())
    assert h.sender.queues["b.test"].dropped == 1 and h.sender.queues["b.test"].state is QueueState.IDLE


def test_errno_103_refetches_the_key_and_retries_at_once(harness):
    h = harness("b.test")
    peer = h.peers["b.test"]
    peer.advertised_key = peer_key(1)  # we seal to a key the peer no longer decrypts with
    h.send("b.test", 0)
    assert peer.key_fetches == 2 and peer.packets() == []
    assert h.status("b.test")["queued"] == 1  # not dropped: retried later
    peer.advertised_key = peer.key  # the peer now publishes its real key
    h.clock.advance(1)
    assert [p["id"] for p in peer.packets()] == ["p0"]


def test_key_is_cached_then_refreshed_on_schedule(harness):
    h = harness("b.test", key_refresh=100)
    h.send("b.test", 0)
    h.send("b.test", 1)
    assert h.peers["b.test"].key_fetches == 1
    h.clock.advance(101)
    h.send("b.test", 2)
    assert h.peers["b.test"].key_fetches == 2


def test_pin_mismatch_stops_delivery_and_says_so_every_time(harness, logs):
    h = harness("b.test", pins={"b.test": "0" * 64})
    h.send("b.test", 0)
    h.clock.advance(1)
    h.clock.advance(2)
    assert h.peers["b.test"].posts == 0
    assert h.status("b.test")["pinned_ok"] is False
    assert sum("NOT delivering to b.test" in line and "pinned" in line for line in logs()) == 3


def test_pin_match_delivers(harness):
    h = harness("b.test", pins={"b.test": FakePeer("x", peer_key(0)).fingerprint})
    h.send("b.test", 0)
    assert len(h.peers["b.test"].packets()) == 1 and h.status("b.test")["pinned_ok"] is True


def test_peer_calling_itself_another_name_is_not_delivered_to(harness, logs):
    h = harness("b.test")
    h.peers["b.test"].advertised_name = "c.test"
    h.send("b.test", 0)
    assert h.peers["b.test"].posts == 0
    assert any("calls itself 'c.test'" in line for line in logs())


def test_a_hanging_peer_delays_only_its_own_queue(harness):
    h = harness("b.test", "c.test")
    h.peers["b.test"].hang = True
    h.send("b.test", 0)
    h.send("c.test", 1)
    assert [p["id"] for p in h.peers["c.test"].packets()] == ["p1"]
    h.clock.advance(10)  # the request timeout
    assert h.status("b.test")["queued"] == 1 and h.sender.queues["b.test"].last_error.startswith("timed out")
    h.peers["b.test"].hang = False
    h.clock.advance(1)
    assert [p["id"] for p in h.peers["b.test"].packets()] == ["p0"]


def test_expired_packets_are_dropped_not_sent(harness, logs):
    h = harness("b.test")
    h.peers["b.test"].script = [(503, {}, {})]
    h.send("b.test", 0, ttl=5)
    h.clock.advance(60)
    assert h.peers["b.test"].packets() == [] and h.status("b.test")["queued"] == 0
    assert any("expired" in line for line in logs())


def test_a_restart_resumes_the_queue_in_order(harness):
    h = harness("b.test")
    h.peers["b.test"].script = [(503, {}, {})]
    for n in range(4):
        h.send("b.test", n)
    h.sender.stopService()
    assert h.peers["b.test"].packets() == []
    h.sender = h.new_sender()
    assert h.peers["b.test"].packets() == []  # the saved backoff (under a second) still applies
    h.clock.advance(1)
    assert [p["id"] for p in h.peers["b.test"].packets()] == ["p0", "p1", "p2", "p3"]


def test_a_restart_keeps_the_saved_backoff_instead_of_hammering_the_peer(harness):
    h = harness("b.test", "c.test", backoff_min=8, backoff_max=64)
    for name in ("b.test", "c.test"):
        h.peers[name].script = [(503, {}, {})] * 3
    h.send("b.test", 0)
    h.send("c.test", 1)
    h.clock.advance(8)  # second failure of each: 8..16 s to wait now
    saved = {name: h.sender.outbox.load_backoff(name) for name in ("b.test", "c.test")}
    assert all(s.attempts == 2 and s.next_attempt > h.clock.seconds() for s in saved.values())
    assert "HTTP 503" in saved["b.test"].last_error
    h.sender.stopService()
    posts = {name: h.peers[name].posts for name in ("b.test", "c.test")}
    h.sender = h.new_sender()
    assert {name: h.peers[name].posts for name in posts} == posts  # nothing sent at start
    queue = h.sender.queues["b.test"]
    assert queue.state is QueueState.BACKING_OFF and queue.failures == 2
    h.clock.advance(max(s.next_attempt for s in saved.values()) - h.clock.seconds())
    assert all(h.peers[name].posts == posts[name] + 1 for name in posts)  # the third attempt, on time
    h.clock.advance(64)
    assert [p["id"] for p in h.peers["b.test"].packets()] == ["p0"]
    assert h.sender.outbox.load_backoff("b.test") == BackoffState()  # cleared by the delivery


def test_duplicate_packet_answers_the_first_id_and_queues_nothing(harness):
    h = harness("b.test")
    h.peers["b.test"].script = [(503, {}, {})]
    first = h.send("b.test", 0)
    h.clock.advance(0.2)
    assert h.send("b.test", 0) == first
    assert h.status("b.test")["queued"] == 1


def test_outbox_files_are_private_and_durable_names_sort(tmp_path):
    outbox = FederationOutbox.open(tmp_path / "outbox")
    entry, duplicate = outbox.add("b.test:8443", {"id": "x"}, 100, 200, "k" * 64)
    assert not duplicate
    path = tmp_path / "outbox" / "b.test_8443" / entry.file_name
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["packet"] == {"id": "x"}
    assert outbox.destinations() == ["b.test:8443"]
    later, _ = outbox.add("b.test:8443", {"id": "y"}, 100, 200)
    assert [e.id for e in outbox.entries("b.test:8443")] == [entry.id, later.id]
    assert outbox.add("b.test:8443", {"id": "x"}, 150, 250, "k" * 64) == (entry, True)
    assert outbox.sweep_dedup(199) == 0 and outbox.sweep_dedup(200) == 1
    lock = outbox.lock()
    with pytest.raises(OutboxBusy):
        outbox.lock()
    assert outbox.is_locked()
    lock.release()
    assert not outbox.is_locked()


def test_operator_retry_skips_the_backoff(harness):
    h = harness("b.test", backoff_min=600, backoff_max=600)
    h.peers["b.test"].script = [(503, {}, {})]
    h.send("b.test", 0)
    assert h.sender.queues["b.test"].state is QueueState.BACKING_OFF
    assert h.sender.retry_now("b.test")
    assert not h.sender.retry_now("nowhere.test")
    assert len(h.peers["b.test"].packets()) == 1
    assert h.sender.status_document()["destinations"]["b.test"]["delivered"] == 1
    assert h.sender.queues["b.test"].state is QueueState.IDLE


def test_queue_full_is_refused(harness):
    h = harness("b.test", max_queue=1)
    h.peers["b.test"].script = [(503, {}, {})]
    h.send("b.test", 0)
    with pytest.raises(ProtocolError) as info:
        h.send("b.test", 1)
    assert info.value.errno == 160


def test_policy_modes():
    peers = parse_peer_table(["b.test=https://b.example:8443/relay#" + "AB" * 32])
    assert peers["b.test"].url == "https://b.example:8443/relay" and peers["b.test"].pin == "ab" * 32
    for mode, dest, errno in [("off", "b.test", 122), ("allowlist", "c.test", 122), ("open", "10.0.0.1", 122),
                              ("open", "127.0.0.1:8080", 122)]:
        with pytest.raises(ProtocolError) as info:
            FederationPolicy(mode, peers, "a.test").check(dest)
        assert info.value.errno == errno, (mode, dest)
    assert FederationPolicy("allowlist", peers, "a.test").check("B.test").url == "https://b.example:8443/relay"
    open_peer = FederationPolicy("open", peers, "a.test").check("c.test:444")
    assert open_peer.url == "https://c.test:444" and not open_peer.listed


@pytest.mark.parametrize("entry", ["b.test", "=https://x", "not a name=https://x", "b.test=ftp://x",
                                   "b.test=https://x#abc", "b.test=https://x?q=1", "b.test=https://:99999"])
def test_bad_peer_entries_are_named(entry):
    with pytest.raises(PeerError):
        parse_peer(entry)
    with pytest.raises(PeerError, match="twice"):
        parse_peer_table(["b.test=https://x", "B.test=https://y"])


@pytest.mark.parametrize("values, named", [
    ({"federation.mode": "maybe"}, "federation.mode"),
    ({"federation.peers": ["b.test"]}, "federation.peers"),
    ({"federation.peers": ["a.test=https://a.test"]}, "federation.peers"),
    ({"federation.backoff_min": 10, "federation.backoff_max": 5}, "federation.backoff_min"),
    ({"federation.ca_file": "/nonexistent/ca.pem"}, "federation.ca_file"),
    ({"push.retries": 11}, "push.retries"),
    ({"push.allow_private": "yes"}, "push.allow_private"),
])
def test_bad_federation_settings_are_named(values, named):
    from msgrelay.settings import SettingError, resolve

    with pytest.raises(SettingError) as info:
        resolve({"server.name": "a.test", **values}, {})
    assert str(info.value).startswith(named)


@pytest.mark.parametrize("code, body, retry_after, outcome, delay", [
    (200, b"{}", None, Outcome.DELIVERED, None),
    (201, b"", None, Outcome.DELIVERED, None),
    (400, b'{"errno": 103}', None, Outcome.REFETCH_KEY, None),
    (400, b'{"errno": 104, "message": "bad"}', None, Outcome.DROP, None),
    (404, b"<html>", None, Outcome.DROP, None),
    (408, b"", None, Outcome.RETRY_AFTER, None),
    (429, b'{"errno": 150}', b"30", Outcome.RETRY_AFTER, 30),
    (503, b"", b"Wed, 21 Oct 2015 07:28:00 GMT", Outcome.RETRY_AFTER, 10),
    (302, b"", None, Outcome.RETRY_AFTER, None),
    (500, b"not json", b"junk", Outcome.RETRY_AFTER, None),
])
def test_http_answers_are_classified(code, body, retry_after, outcome, delay):
    answer = classify(code, body, retry_after, 1445412470)
    assert (answer.outcome, answer.delay) == (outcome, delay)


class Unreachable(Resource):
    """Every made-up relay answers 503 to everything."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setResponseCode(503)
        return b'{"errno": 180}'


def test_open_federation_to_made_up_relays_leaves_nothing_behind(tmp_path):
    from msgrelay.metrics import FederationCollector

    clock = task.Clock()
    clock.advance(T0)
    http = StubTreq(Unreachable())
    deliverer = Deliverer(http, PeerKeys(http, clock, 3600, 10), clock, "a.test", 10)
    policy = FederationPolicy("open", {}, "a.test")
    service = FederationService(FederationOutbox.open(tmp_path / "outbox"), deliverer,
                                Backoff(1, 60, random.Random(3)), policy, clock, 1000, run=maybeDeferred)
    service.startService()
    try:
        names = [f"made-up-{n}.example" for n in range(200)]
        for n, name in enumerate(names):
            fired(Deferred.fromCoroutine(service.forwarder.forward(packet(name, n, ttl=2), int(T0), int(T0) + 2, None)))
        assert len(service.queue_status()) == 200
        assert len(os.listdir(tmp_path / "outbox")) == 200 + 2  # .lock, .dedup
        assert {q.state for q in service.queues.values()} == {QueueState.BACKING_OFF}
        timers = len(clock.getDelayedCalls())
        assert timers <= 200 + 1  # one per queue, and the idempotency sweep

        clock.advance(2)  # every packet expires; each queue's own timer drops them
        assert service.queue_status() == [] and len(service.queues) == 0
        assert sorted(os.listdir(tmp_path / "outbox")) == [".dedup", ".lock"]
        assert [f.samples for f in FederationCollector(service).collect()] == [[], [], [], []]
        assert service.status_document()["destinations"] == {}
        assert len(clock.getDelayedCalls()) == 1  # only the idempotency sweep is left
        clock.advance(60)
        assert os.listdir(tmp_path / "outbox" / ".dedup") == []
    finally:
        service.stopService()


def test_packets_accepted_while_the_outbox_loads_are_sent_after_the_old_ones(tmp_path):
    clock = task.Clock()
    clock.advance(T0)
    outbox = FederationOutbox.open(tmp_path / "outbox")
    for n in range(2):  # what a previous process left
        outbox.add("b.test", packet("b.test", n).to_json(), T0, T0 + 600)
    peer = FakePeer("b.test", peer_key(0))
    http = StubTreq(HostRouter({"b.test": peer}))
    held: list[Deferred] = []

    def run(function: Any, *args: Any) -> Deferred:
        if getattr(function, "__name__", "") == "_load":  # the outbox load takes its time
            d: Deferred = Deferred()
            held.append(d)
            d.addCallback(lambda _: function(*args))
            return d
        return maybeDeferred(function, *args)

    service = FederationService(outbox, Deliverer(http, PeerKeys(http, clock, 3600, 10), clock, "a.test", 10),
                                Backoff(1, 60), FederationPolicy("allowlist", parse_peer_table(["b.test=https://b.test"]),
                                                                 "a.test"), clock, 1000, run=run)
    service.startService()
    try:
        fired(Deferred.fromCoroutine(service.forwarder.forward(packet("b.test", 2), T0, T0 + 600, None)))
        assert peer.packets() == []  # accepted (200) but not sent before the older packets are known
        held[0].callback(None)
        assert [p["id"] for p in peer.packets()] == ["p0", "p1", "p2"]
    finally:
        service.stopService()
