"""DNS for push and federation (issue 9 item 1, issue 8): an asynchronous, bounded resolver
with a cache that includes failures. On a Clock with a scripted upstream, then over real UDP
sockets against a tiny name server, and last against the running relay: push endpoints whose
lookups hang do not delay unrelated sends or /api/v1/health."""

from __future__ import annotations

import statistics
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.names import dns, error

from conftest import _key
from apiclient import User, request
from dnsserver import TinyNameServer, listen
from msgrelay.federation.resolver import (CachingResolver, DnsConfig, LookupFailed, parse_server,
                                          read_hosts_file, servers_from_resolv_conf)
from test_federation_fakes import config_file, eventually, logs  # noqa: F401 (fixture)

ensure = pytest_twisted.ensureDeferred


# -- on a Clock, with a scripted upstream --------------------------------------------


class ScriptedUpstream:
    """An IResolver whose answers the test gives; records every query."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []
        self.pending: dict[tuple[str, int], defer.Deferred] = {}

    def _lookup(self, name, kind):
        self.calls.append((name, kind))
        d = defer.Deferred()
        self.pending[(name, kind)] = d
        return d

    def lookupAddress(self, name, timeout=None):
        return self._lookup(name, dns.A)

    def lookupIPV6Address(self, name, timeout=None):
        return self._lookup(name, dns.AAAA)

    def answer(self, name, a=(), aaaa=(), ttl=300):
        self.pending.pop((name, dns.A)).callback(
            ([dns.RRHeader(name, dns.A, ttl=ttl, payload=dns.Record_A(x, ttl)) for x in a], [], []))
        self.pending.pop((name, dns.AAAA)).callback(
            ([dns.RRHeader(name, dns.AAAA, ttl=ttl, payload=dns.Record_AAAA(x, ttl)) for x in aaaa], [], []))

    def fail(self, name, exception):
        for kind in (dns.A, dns.AAAA):
            self.pending.pop((name, kind)).errback(exception)


def make(clock, **config):
    upstream = ScriptedUpstream()
    resolver = CachingResolver(clock, DnsConfig(**config), servers=[("192.0.2.53", 53)],
                               hosts={"peer.local": ["10.1.2.3"]}, upstream=upstream)
    return resolver, upstream


def result_of(d):
    results = []
    d.addBoth(results.append)
    return results


def test_answers_are_cached_for_their_ttl_at_most_cache_ttl():
    clock = task.Clock()
    resolver, upstream = make(clock, cache_ttl=300)
    first = result_of(resolver.resolve("Push.Example.", 443))
    second = result_of(resolver.resolve("push.example", 443))  # same name, same query
    assert upstream.calls == [("push.example", dns.A), ("push.example", dns.AAAA)]
    upstream.answer("push.example", a=["192.0.2.7"], aaaa=["2001:db8::7"], ttl=30)
    assert first == second == [["192.0.2.7", "2001:db8::7"]]
    clock.advance(29)
    assert result_of(resolver.resolve("push.example", 443)) == [["192.0.2.7", "2001:db8::7"]]
    assert len(upstream.calls) == 2 and resolver.cache_hits == 1
    clock.advance(2)  # the record's TTL of 30 s is over
    resolver.resolve("push.example", 443)
    assert len(upstream.calls) == 4


def test_failures_are_cached_for_negative_ttl():
    clock = task.Clock()
    resolver, upstream = make(clock, negative_ttl=60)
    first = result_of(resolver.resolve("gone.example", 443))
    upstream.fail("gone.example", error.DNSNameError())
    assert first[0].check(LookupFailed) and "no such name" in str(first[0].value)
    clock.advance(59)
    again = result_of(resolver.resolve("gone.example", 443))
    assert again[0].check(LookupFailed) and len(upstream.calls) == 2  # from the cache
    clock.advance(2)
    resolver.resolve("gone.example", 443)
    assert len(upstream.calls) == 4


def test_a_lookup_that_never_answers_fails_at_the_timeout_and_is_cached():
    clock = task.Clock()
    resolver, upstream = make(clock, timeout=5, negative_ttl=60)
    waiting = result_of(resolver.resolve("slow.example", 443))
    clock.advance(4.9)
    assert waiting == [] and resolver.pending == 1
    clock.advance(0.2)
    assert waiting[0].check(LookupFailed) and "within 5s" in str(waiting[0].value)
    assert resolver.pending == 0
    assert result_of(resolver.resolve("slow.example", 443))[0].check(LookupFailed)
    assert len(upstream.calls) == 2


def test_concurrent_lookups_are_capped_and_a_refusal_is_not_cached():
    clock = task.Clock()
    resolver, upstream = make(clock, max_concurrent=2)
    resolver.resolve("a.example", 443)
    resolver.resolve("b.example", 443)
    refused = result_of(resolver.resolve("c.example", 443))
    assert refused[0].check(LookupFailed) and "dns.max_concurrent" in str(refused[0].value)
    assert resolver.refused == 1 and ("c.example", dns.A) not in upstream.calls
    upstream.answer("a.example", a=["192.0.2.1"])
    assert result_of(resolver.resolve("c.example", 443)) == []  # now looked up
    assert ("c.example", dns.A) in upstream.calls


def test_one_family_failing_still_gives_the_other_and_cname_chains_are_followed():
    clock = task.Clock()
    resolver, upstream = make(clock)
    got = result_of(resolver.resolve("v4only.example", 443))
    upstream.pending.pop(("v4only.example", dns.A)).callback(
        ([dns.RRHeader(b"v4only.example", dns.CNAME, ttl=60, payload=dns.Record_CNAME(b"real.example", 60))], [], []))
    upstream.pending.pop(("v4only.example", dns.AAAA)).errback(error.DNSServerError())
    assert ("real.example", dns.A) in upstream.calls
    upstream.pending.pop(("real.example", dns.A)).callback(
        ([dns.RRHeader(b"real.example", dns.A, ttl=60, payload=dns.Record_A("192.0.2.9", 60))], [], []))
    assert got == [["192.0.2.9"]]


def test_ip_literals_and_the_hosts_file_need_no_query():
    clock = task.Clock()
    resolver, upstream = make(clock)
    assert result_of(resolver.resolve("192.0.2.1", 80)) == [["192.0.2.1"]]
    assert result_of(resolver.resolve("PEER.local", 80)) == [["10.1.2.3"]]
    assert upstream.calls == []


def test_stopping_cancels_lookups_in_progress():
    clock = task.Clock()
    resolver, upstream = make(clock)
    resolver.startService()
    waiting = result_of(resolver.resolve("slow.example", 443))
    resolver.stopService()
    assert waiting[0].check(LookupFailed) and resolver.pending == 0


def test_server_entries_resolv_conf_and_hosts_file(tmp_path):
    assert parse_server("192.0.2.53") == ("192.0.2.53", 53)
    assert parse_server("192.0.2.53:5353") == ("192.0.2.53", 5353)
    assert parse_server("2001:db8::53") == ("2001:db8::53", 53)
    assert parse_server("[2001:db8::53]:5353") == ("2001:db8::53", 5353)
    for bad in ("ns.example", "192.0.2.53:x", "192.0.2.53:70000", "[2001:db8::53]x"):
        with pytest.raises(ValueError):
            parse_server(bad)
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch example\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nnameserver bogus\n")
    assert servers_from_resolv_conf(str(conf)) == [("192.0.2.53", 53), ("fe80::1", 53)]
    conf.write_text("")
    assert servers_from_resolv_conf(str(conf)) == [("127.0.0.1", 53)]
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost Local.Test # x\n::1 localhost\nnot-an-ip name\n")
    assert read_hosts_file(str(hosts)) == {"localhost": ["127.0.0.1", "::1"], "local.test": ["127.0.0.1"]}


def test_a_bad_name_server_setting_stops_start_up():
    from msgrelay.settings import SettingError, resolve

    with pytest.raises(SettingError, match="dns.servers"):
        resolve({"dns.servers": ["ns.example"]}, {})


# -- over real UDP sockets -------------------------------------------------------------


@pytest.fixture
def name_server():
    server = TinyNameServer({"push.test": ["127.0.0.1"], "dual.test": ["192.0.2.5", "2001:db8::5"]},
                            hang=(".hang.test",))
    port = listen(reactor, server)
    yield server
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def real_resolver(server, **config):
    return CachingResolver(reactor, DnsConfig(**config), servers=[("127.0.0.1", server.port)], hosts={})


@ensure
async def test_real_lookups_answers_and_failures_are_cached(name_server):
    resolver = real_resolver(name_server)
    assert await resolver.resolve("dual.test", 443) == ["192.0.2.5", "2001:db8::5"]
    assert await resolver.resolve("dual.test", 443) == ["192.0.2.5", "2001:db8::5"]
    with pytest.raises(LookupFailed, match="no such name"):
        await resolver.resolve("nothing.test", 443)
    with pytest.raises(LookupFailed, match="no such name"):
        await resolver.resolve("nothing.test", 443)
    assert sorted(name_server.queries) == sorted([("dual.test", dns.A), ("dual.test", dns.AAAA),
                                                  ("nothing.test", dns.A), ("nothing.test", dns.AAAA)])


@ensure
async def test_a_name_server_that_never_answers_is_asked_once(name_server):
    resolver = real_resolver(name_server, timeout=1)
    with pytest.raises(LookupFailed, match="no answer"):
        await resolver.resolve("x.hang.test", 443)
    with pytest.raises(LookupFailed, match="no answer"):  # negative cache: no new query
        await resolver.resolve("x.hang.test", 443)
    assert sorted(name_server.queries) == sorted([("x.hang.test", dns.A), ("x.hang.test", dns.AAAA)])


# -- against the running relay -----------------------------------------------------------


def dns_config(tmp_path, server, timeout: int = 30, extra: str = "") -> str:
    return config_file(tmp_path / "dns.toml", f'[dns]\nservers = ["127.0.0.1:{server.port}"]\ntimeout = {timeout}\n'
                                              + extra)


@ensure
async def test_push_to_a_name_resolving_to_loopback_is_refused(start_relay, users, tmp_path, name_server, logs):
    """The guard still checks every address the resolver gives (push.test is 127.0.0.1 here)."""
    relay = await start_relay("--config", dns_config(tmp_path, name_server))
    alice = users[0]
    await relay.client.register(alice)
    await relay.core.store.set_push_endpoint(alice.user_id, "https://push.test/hook/secret")
    token = await relay.client.mint(alice)
    assert (await relay.client.send(alice, token)).status == 200
    line = await eventually(lambda: next((x for x in logs() if x.startswith("push to push.test refused")), None))
    assert "127.0.0.1 is a loopback address" in line and "secret" not in line
    assert ("push.test", dns.A) in name_server.queries


async def timed(call) -> float:
    started = time.monotonic()
    answer = await call()
    assert answer.status == 200, answer.body
    return time.monotonic() - started


@ensure
async def test_hanging_push_lookups_do_not_delay_unrelated_requests(start_relay, users, tmp_path, name_server):
    """Issue 8 and 9 item 1: a dozen push endpoints on a name server that never answers."""
    relay = await start_relay("--config", dns_config(tmp_path, name_server, timeout=60))
    client = relay.client
    alice = users[0]
    await client.register(alice)
    token = await client.mint(alice)
    victims = [User(_key(10 + i)) for i in range(12)]
    victim_tokens = []
    for i, victim in enumerate(victims):
        assert (await client.register(victim)).status == 200
        await relay.core.store.set_push_endpoint(victim.user_id, f"https://v{i}.hang.test/push")
        victim_tokens.append(await client.mint(victim))

    async def samples(count: int) -> tuple[list[float], list[float]]:
        sends, healths = [], []
        for _ in range(count):
            sends.append(await timed(lambda: client.send(alice, token)))
            healths.append(await timed(lambda: request("GET", relay.url + "/api/v1/health")))
        return sends, healths

    await samples(3)  # warm up
    base_send, base_health = await samples(15)
    for victim, victim_token in zip(victims, victim_tokens):
        assert (await client.send(victim, victim_token)).status == 200
    # Every victim's push is now stuck in a lookup nobody will answer.
    await eventually(lambda: len(name_server.names()) >= len(victims) and relay.service.resolver.pending >= 12)
    hung_send, hung_health = await samples(15)
    # The unrelated requests all completed while the lookups were still pending.
    assert relay.service.resolver.pending >= 12 and name_server.answered == 0
    assert relay.service.metrics.registry.get_sample_value("msgrelay_dns_lookups_pending") >= 12
    delay_send = statistics.median(hung_send) - statistics.median(base_send)
    delay_health = statistics.median(hung_health) - statistics.median(base_health)
    print(f"\nmedian send {statistics.median(base_send) * 1000:.1f} ms -> {statistics.median(hung_send) * 1000:.1f} ms, "
          f"health {statistics.median(base_health) * 1000:.1f} ms -> {statistics.median(hung_health) * 1000:.1f} ms, "
          f"max while hanging {max(hung_send + hung_health) * 1000:.1f} ms, {relay.service.resolver.pending} lookups pending")
    assert delay_send < 0.1 and delay_health < 0.1
