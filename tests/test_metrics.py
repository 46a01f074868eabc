"""Prometheus metrics: scraped from a real running relay after traffic, the counters moved;
off by default; the bearer token is required where configured."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from apiclient import SyncClient, request, sync_request
from msgrelay.metrics import FederationCollector, RelayMetrics, RoutePatterns, UNMATCHED
from msgrelay.web.api import RelayAPI
from relayproc import RelayProcess, free_port

ensure = pytest_twisted.ensureDeferred
TOKEN = "metrics-token-0123456789"


def scrape(url: str, token: str | None = TOKEN) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from a /metrics page."""
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# -- units -----------------------------------------------------------------------


def test_route_patterns_keep_label_cardinality_low():
    routes = RoutePatterns(RelayAPI.app.url_map, {b"/metrics": None})
    assert routes("GET", "/api/v1/user/abcdefghijklmnopqrstuvwxyz234567") == "/api/v1/user/<user_id>"
    assert routes("GET", "/api/v1/user/anything-at-all") == "/api/v1/user/<user_id>"
    assert routes("POST", "/api/v1/message") == "/api/v1/message"
    assert routes("PATCH", "/api/v1/message") == "/api/v1/message"  # 405, still the route
    assert routes("GET", "/wp-admin/" + "x" * 50) == UNMATCHED
    assert routes("GET", "/metrics") == "/metrics"


def test_federation_collector_reads_queue_gauges_when_present():
    class FakeFederation:
        def queue_gauges(self):
            return [
                {"destination": "b.test", "queued": 3, "oldest_age_seconds": 12.5, "backoff_seconds": 4,
                 "failures": 2, "next_attempt": None},
                {"destination": "c.test", "queued": 0, "oldest_age_seconds": None, "backoff_seconds": 0},
            ]

    assert all(not family.samples for family in FederationCollector(None).collect())  # none: empty families
    collector = FederationCollector(FakeFederation())
    got = {(f.name, s.labels["destination"]): s.value for f in collector.collect() for s in f.samples}
    assert got == {
        ("msgrelay_federation_queue_messages", "b.test"): 3,
        ("msgrelay_federation_queue_messages", "c.test"): 0,
        ("msgrelay_federation_queue_oldest_age_seconds", "b.test"): 12.5,
        ("msgrelay_federation_backoff_seconds", "b.test"): 4,
        ("msgrelay_federation_backoff_seconds", "c.test"): 0,
        ("msgrelay_federation_queue_failures", "b.test"): 2,
    }

    class Broken:
        def queue_gauges(self):
            raise RuntimeError("boom")

    assert all(not family.samples for family in FederationCollector(Broken()).collect())


def test_store_stats_set_the_gauges():
    metrics = RelayMetrics(process=False)
    metrics.set_store_stats({"users": 2, "messages": 5, "bytes": 900, "oldest_received": 1000}, now=1060)
    text = metrics.exposition(None)[0].decode()
    assert "msgrelay_store_messages 5.0" in text and "msgrelay_store_bytes 900.0" in text
    assert "msgrelay_store_oldest_message_age_seconds 60.0" in text


# -- a real running relay --------------------------------------------------------


@pytest.mark.slow
def test_counters_move_on_a_real_running_relay(tmp_path, users):
    metrics_port, dead_port = free_port(), free_port()
    config = tmp_path / "relay.toml"
    config.write_text(
        "[store]\nexpire_interval = 1\n"
        '[rate_limits]\nregister_per_address = "3/3600"\n'
        f'[metrics]\nlisten = ["tcp:{metrics_port}:interface=127.0.0.1"]\ntoken = "{TOKEN}"\nstats_interval = 1\n'
        f'[federation]\nmode = "allowlist"\npeers = ["b.test=http://127.0.0.1:{dead_port}"]\n'
        "backoff_min = 1\nbackoff_max = 2\n"
    )
    relay = RelayProcess(tmp_path / "state", extra_args=["--config", str(config)]).start()
    try:
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        before = scrape(metrics_url)
        client = SyncClient.connect(relay.url)
        alice, bob, carol, dave = users
        for user in (alice, bob, carol):
            assert client.call("POST", "/api/v1/user", {"key": user.pem}).status == 200
        assert client.call("POST", "/api/v1/user", {"key": dave.pem}).errno == 150
        token = client.mint(alice)
        for ttl in (600, 600):
            envelope = client.packet_envelope(alice, token, body=b'{"t":"hello"}', ttl=ttl)
            assert client.call("POST", "/api/v1/message", envelope).status == 200
        # Fetched before the short-lived message is sent: a message with ttl=1 may have
        # expired by the time of any later request (expiry is counted in whole seconds).
        answer, messages = client.fetch(alice)
        assert answer.status == 200 and len(messages) == 2
        envelope = client.packet_envelope(alice, token, body=b'{"t":"hello"}', ttl=1)
        assert client.call("POST", "/api/v1/message", envelope).status == 200
        assert client.call("POST", "/api/v1/message", {"algorithm": "x", "password": "", "data": ""}).status == 400
        remote = client.packet_envelope(bob, "any-token", user_id=f"{bob.user_id}@b.test")
        assert client.call("POST", "/api/v1/message", remote).status == 200  # queued for b.test
        assert client.call("GET", f"/api/v1/user/{dave.user_id}").errno == 130
        assert client.call("GET", "/no/such/thing").errno == 132
        # The ttl=1 message expires and is swept; federation retries fail meanwhile.
        deadline = time.monotonic() + 30
        while True:
            after = scrape(metrics_url)
            if (value(after, "msgrelay_messages_expired_total") == 1
                    and value(after, "msgrelay_federation_queue_oldest_age_seconds", destination="b.test") >= 2):
                break
            assert time.monotonic() < deadline, "expiry sweep or queue age not seen in the metrics"
            time.sleep(0.1)

        assert value(after, "msgrelay_http_requests_total", endpoint="/api/v1/user", method="POST", status="200") == 3
        assert value(after, "msgrelay_http_requests_total", endpoint="/api/v1/user", method="POST", status="429") == 1
        assert value(after, "msgrelay_http_requests_total", endpoint="/api/v1/message", method="POST",
                     status="200") == 4
        assert value(after, "msgrelay_http_requests_total", endpoint="/api/v1/user/<user_id>", method="GET",
                     status="404") == 1
        assert value(after, "msgrelay_http_requests_total", endpoint=UNMATCHED, method="GET", status="404") == 1
        assert value(after, "msgrelay_errors_total", errno="150") == 1
        assert value(after, "msgrelay_errors_total", errno="130") == 1
        assert value(after, "msgrelay_errors_total", errno="132") == 1
        assert value(after, "msgrelay_rate_limited_total", limit="register") == 1
        assert value(after, "msgrelay_messages_stored_total") == 3  # local only; the remote one is queued
        assert value(after, "msgrelay_message_bytes_stored_total") > 3 * 100
        assert value(after, "msgrelay_message_accept_seconds_count") == 4
        assert value(after, "msgrelay_message_fetch_seconds_count") == 1
        assert value(after, "msgrelay_messages_expired_total") == 1
        assert value(after, "msgrelay_federation_queue_messages", destination="b.test") == 1
        assert value(after, "msgrelay_federation_queue_oldest_age_seconds", destination="b.test") >= 2
        assert value(after, "msgrelay_http_open_connections") >= 0
        assert value(before, "msgrelay_messages_stored_total") == 0
        assert value(after, "process_open_fds") > 0
        # twistd froze its start-up heap once running (msgrelay/heap.py), and every collection is timed.
        assert value(after, "msgrelay_gc_frozen_objects") > 10_000
        assert value(after, "msgrelay_gc_collections_total", generation="0") > 0
        assert value(after, "msgrelay_gc_pause_seconds_total", generation="0") > 0
        assert value(after, "msgrelay_gc_longest_pause_seconds", generation="0") > 0
        # The pools as sized: pools.store's default, and pools.crypto = 0 leaving a CPU spare.
        assert value(after, "msgrelay_thread_pool_size", pool="store") == 32
        assert value(after, "msgrelay_thread_pool_size", pool="crypto") == max(1, len(os.sched_getaffinity(0)) - 1)
        # Every accepted packet was opened on the crypto pool and stored through the store pool.
        assert value(after, "msgrelay_thread_pool_calls_total", pool="crypto") >= 4
        assert value(after, "msgrelay_thread_pool_calls_total", pool="store") >= 8
        assert value(before, "msgrelay_thread_pool_run_seconds_total", pool="crypto") < \
            value(after, "msgrelay_thread_pool_run_seconds_total", pool="crypto")
        assert value(after, "msgrelay_thread_pool_wait_seconds_total", pool="store") >= 0

        # The store gauges are refreshed in the background when a scrape finds them stale.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            gauges = scrape(metrics_url)
            if value(gauges, "msgrelay_store_messages") == 2:
                break
            time.sleep(0.1)
        assert value(gauges, "msgrelay_store_messages") == 2  # three stored, one expired
        assert value(gauges, "msgrelay_store_users") == 3
        assert value(gauges, "msgrelay_store_bytes") > 200

        # The same page on the relay's own listener, with the token only.
        assert scrape(relay.url + "/metrics")[("msgrelay_messages_stored_total", ())] == 3
        for url in (relay.url + "/metrics", metrics_url):
            refused = sync_request("GET", url)
            assert refused.status == 401 and refused.body["errno"] == 110
            assert refused.headers["WWW-Authenticate"].startswith("Bearer")
            req = urllib.request.Request(url, headers={"Authorization": "Bearer wrong"})
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(req, timeout=5)
            assert info.value.code == 401
    finally:
        relay.stop()
    assert TOKEN not in relay.log()


@ensure
async def test_metrics_are_off_by_default(relay):
    answer = await request("GET", relay.url + "/metrics")
    assert answer.status == 404 and answer.errno == 132
    assert relay.service.metrics is not None  # collected, but served nowhere


@ensure
async def test_token_on_the_main_listener_is_reloadable(start_relay, tmp_path):
    config = tmp_path / "relay.toml"
    config.write_text("")
    relay = await start_relay("--config", str(config))
    assert (await request("GET", relay.url + "/metrics")).errno == 132
    config.write_text(f'[metrics]\ntoken = "{TOKEN}"\n')
    relay.service.reloader.reload()
    answer = await request("GET", relay.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status == 200 and b"msgrelay_http_requests_total" in answer.body
    assert (await request("POST", relay.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})).errno == 133
