"""Server key rotation: retired keys on disk, the keyring of a running relay, and the real thing.

Unit tests drive `KeyringWatcher` with a task.Clock over real files; the end-to-end tests run
`msgrelay-admin rotate-key` as a subprocess on the state directory of a real relay.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.task import Clock

from apiclient import ApiClient, SyncClient, sync_request
from msgrelay.keyrotation import (
    KeyringWatcher, list_retired, load_keyring, load_previous, previous_keys_dir, retire, retire_file, rotate,
)
from msgrelay.serverkey import ServerKeyError, read_private_key, write_private_key
from msgrelay.settings import resolve
from msgrelay.wire.dates import parse_date
from msgrelay.wire.envelope import open_envelope, seal
from msgrelay.wire.errors import ProtocolError
from msgrelay.wire.keys import fingerprint
from relayproc import RelayProcess

ensure = pytest_twisted.ensureDeferred
ADMIN = str(Path(sys.executable).with_name("msgrelay-admin"))
T0 = 1_800_000_000


def fp(key: rsa.RSAPrivateKey) -> str:
    return fingerprint(key.public_key())


def small_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def settings(tmp_path):
    (tmp_path / "state").mkdir()
    return resolve({}, {"server.state_dir": str(tmp_path / "state"), "server.name": "relay.test"})


@pytest.fixture
def keyring(settings):
    return load_keyring(settings, T0)


def watcher_for(settings, keyring, clock: Clock) -> KeyringWatcher:
    return KeyringWatcher(keyring, settings.key_path(), previous_keys_dir(settings), clock)


def opens_with(keyring, now: float, key: rsa.RSAPrivateKey) -> bool:
    """Whether an envelope sealed to `key` opens with the keyring at that time."""
    envelope = seal(key.public_key(), b"{}")
    try:
        open_envelope(keyring.decryption_keys(now), envelope)
        return True
    except ProtocolError as e:
        assert e.errno == 103
        return False


def test_rotation_reaches_the_keyring_and_expires_on_the_clock(settings, keyring):
    clock = Clock()
    clock.advance(T0)
    watcher = watcher_for(settings, keyring, clock)
    old = keyring.current
    done = rotate(settings, 100, T0)
    assert done.old_fingerprint == fp(old) and done.until == T0 + 100
    assert watcher.check() is True
    assert fp(keyring.current) == done.new_fingerprint
    assert [fp(p.key) for p in keyring.previous] == [fp(old)]
    assert opens_with(keyring, clock.seconds(), old)
    retired = list_retired(previous_keys_dir(settings))
    assert [(r.until, r.fingerprint) for r in retired] == [(T0 + 100, fp(old))]
    assert stat.S_IMODE(retired[0].path.stat().st_mode) == 0o600
    assert stat.S_IMODE(previous_keys_dir(settings).stat().st_mode) == 0o700

    clock.advance(99)
    assert watcher.check() is False and len(keyring.previous) == 1
    clock.advance(1)  # `until` itself is past the grace period
    assert not opens_with(keyring, clock.seconds(), old)
    assert watcher.check() is True
    assert keyring.previous == [] and list_retired(previous_keys_dir(settings)) == []
    assert opens_with(keyring, clock.seconds(), keyring.current)


def test_start_up_loads_only_usable_unexpired_keys(settings, keyring):
    directory = previous_keys_dir(settings)
    good, expired = small_key(), small_key()
    retire(directory, good, T0 + 50)
    retire(directory, expired, T0 - 1)
    retire(directory, keyring.current, T0 + 50)  # a crash between the two steps of a rotation
    (directory / f"{T0 + 50}-{'0' * 64}.pem").write_text("not a key")
    impostor = small_key()
    write_private_key(directory / f"{T0 + 50}-{'1' * 64}.pem", impostor)  # name does not match key
    (directory / ".half.pem.tmp123").write_text("partial")
    loaded = load_previous(directory, keyring.current, T0)
    assert [(fp(p.key), p.until) for p in loaded] == [(fp(good), T0 + 50)]


def test_retiring_a_key_again_keeps_one_file_with_the_new_deadline(settings, keyring):
    directory = previous_keys_dir(settings)
    key = small_key()
    retire(directory, key, T0 + 10)
    retire(directory, key, T0 + 20)
    assert [(r.until, r.fingerprint) for r in list_retired(directory)] == [(T0 + 20, fp(key))]


def test_interrupted_rotation_leaves_the_current_key_in_service(settings, keyring):
    """Step one (retired copy) done, step two (new current key) not: nothing changes for clients."""
    current = keyring.current
    retire(previous_keys_dir(settings), current, T0 + 100)
    reloaded = load_keyring(settings, T0)
    assert fp(reloaded.current) == fp(current) and reloaded.previous == []
    done = rotate(settings, 100, T0)  # running it again completes the rotation
    assert done.old_fingerprint == fp(current)
    assert [r.fingerprint for r in list_retired(previous_keys_dir(settings))] == [fp(current)]


def test_a_broken_key_file_keeps_the_running_keyring(settings, keyring):
    clock = Clock()
    clock.advance(T0)
    watcher = watcher_for(settings, keyring, clock)
    before = fp(keyring.current)
    settings.key_path().write_text("-----BEGIN PRIVATE KEY-----\ntruncated")
    assert watcher.check() is False
    assert fp(keyring.current) == before
    replacement = small_key()
    write_private_key(settings.key_path(), replacement)  # e.g. the operator restores the file
    assert watcher.check() is True and fp(keyring.current) == fp(replacement)


def test_pruning_does_not_hide_a_rotation_made_in_the_same_interval(settings, keyring):
    clock = Clock()
    clock.advance(T0)
    directory = previous_keys_dir(settings)
    retire(directory, small_key(), T0 + 5)
    watcher = watcher_for(settings, keyring, clock)
    watcher.check()
    clock.advance(10)
    done = rotate(settings, 100, clock.seconds())  # prunes the expired file itself, too
    assert watcher.check() is True
    assert fp(keyring.current) == done.new_fingerprint
    assert [p.until for p in keyring.previous] == [T0 + 110]


def test_operator_managed_key_is_not_rotated_but_can_be_retired(tmp_path):
    (tmp_path / "state").mkdir()
    external = tmp_path / "etc" / "relay-key.pem"
    key = small_key()
    write_private_key(external, key)
    settings = resolve({}, {"server.state_dir": str(tmp_path / "state"), "server.key_file": str(external),
                            "server.name": "relay.test"})
    with pytest.raises(ServerKeyError, match="outside the state directory"):
        rotate(settings, 100, T0)
    assert fp(read_private_key(external)) == fp(key)
    entry = retire_file(settings, external, 100, T0)
    assert entry.fingerprint == fp(key) and entry.until == T0 + 100
    assert entry.path.parent == tmp_path / "state" / "previous_keys"


# -- the real relay ----------------------------------------------------------------------------

def admin(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([ADMIN, *args], capture_output=True, text=True, timeout=120)


@ensure
async def test_relay_started_during_a_grace_period_accepts_the_previous_key(start_relay, users, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    settings = resolve({}, {"server.state_dir": str(state), "server.name": "relay.test"})
    old = load_keyring(settings, time.time()).current
    done = rotate(settings, 3600, time.time())
    relay = await start_relay(state_dir=state)
    info = relay.core.server_info()
    assert info["fingerprint"] == done.new_fingerprint
    assert [p["fingerprint"] for p in info["previous_keys"]] == [fp(old)]
    alice = users[0]
    client = relay.client
    await client.register(alice)
    token = await client.mint(alice)
    old_client = ApiClient(relay.url, "relay.test", info["previous_keys"][0]["key"])
    assert (await old_client.send(alice, token)).status == 200
    assert (await client.send(alice, token)).status == 200


def wait_for(predicate, timeout: float = 15.0, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


@pytest.mark.slow
def test_rotate_key_on_a_running_relay(tmp_path, users):
    """Sealed to the old key: accepted during the grace period, errno 103 after; file removed."""
    config = tmp_path / "relay.toml"
    config.write_text("[server]\nkey_check_interval = 1\n")
    state = tmp_path / "state"
    relay = RelayProcess(state, extra_args=["--config", str(config)]).start()
    try:
        client = SyncClient.connect(relay.url)
        old_info = sync_request("GET", relay.url + "/api/v1/server").body
        old_fp = old_info["fingerprint"]
        alice = users[0]
        assert client.call("POST", "/api/v1/user", {"key": alice.pem}).status == 200
        token = client.mint(alice)
        during, after = client.packet_envelope(alice, token), client.packet_envelope(alice, token)

        rotated = admin("rotate-key", "--config", str(config), "--state-dir", str(state),
                        "--grace-period", "4", "--json")
        assert rotated.returncode == 0, rotated.stderr
        result = json.loads(rotated.stdout)
        assert result["previous"]["fingerprint"] == old_fp
        info = wait_for(lambda: (body := sync_request("GET", relay.url + "/api/v1/server").body)
                        ["fingerprint"] == result["fingerprint"] and body)
        assert info["previous_keys"] == [{
            "key": old_info["key"], "fingerprint": old_fp, "until": result["previous"]["until"],
        }]
        retired = state / "previous_keys"
        assert [p.name.endswith(f"-{old_fp}.pem") for p in retired.iterdir()] == [True]

        assert client.call("POST", "/api/v1/message", during).status == 200
        new_client = SyncClient.connect(relay.url)
        assert new_client.call("POST", "/api/v1/message", new_client.packet_envelope(alice, token)).status == 200

        until = info["previous_keys"][0]["until"]
        # The relay's own clock (the Timestamp header) passes the end of the grace period.
        wait_for(lambda: int(sync_request("GET", relay.url + "/api/v1/health").headers["Timestamp"])
                 > parse_date(until))
        refused = client.call("POST", "/api/v1/message", after)
        assert (refused.status, refused.errno) == (400, 103)
        wait_for(lambda: not list(retired.iterdir()))
        assert sync_request("GET", relay.url + "/api/v1/server").body["previous_keys"] == []
        assert len(new_client.fetch(alice)[1]) == 2
    finally:
        relay.stop()
    log = relay.log()
    assert "Traceback" not in log and "PRIVATE KEY" not in log
    assert "removed server key" in log and old_fp in log


@ensure
async def test_sighup_reload_reads_the_key_files_at_once(start_relay, tmp_path):
    config = tmp_path / "slow-check.toml"
    config.write_text("[server]\nkey_check_interval = 3600\n")
    relay = await start_relay("--config", str(config))
    before = relay.core.keyring.fingerprint
    settings = resolve({}, {"server.state_dir": str(relay.state_dir), "server.name": "relay.test"})
    done = rotate(settings, 600, time.time())
    assert relay.core.keyring.fingerprint == before  # the timer is an hour away
    relay.service.reloader.reload()  # what SIGHUP does
    assert relay.core.keyring.fingerprint == done.new_fingerprint
    assert [fp(p.key) for p in relay.core.keyring.previous] == [before]


# -- key transitions (docs/protocol.md section 5) ------------------------------------------------------

def test_rotations_write_transitions_signed_by_the_old_key(settings, keyring):
    from msgrelay.keytransitions import load_transitions, transitions_path
    from msgrelay.relay import RelayCore
    from msgrelay.wire.transitions import follow_chain

    clock = Clock()
    clock.advance(T0)
    watcher = watcher_for(settings, keyring, clock)
    first = fp(keyring.current)
    one = rotate(settings, 100, T0)
    two = rotate(settings, 100, T0 + 10)
    entries = load_transitions(transitions_path(settings))
    assert [(e.from_fp, e.to_fp) for e in entries] == [(first, one.new_fingerprint),
                                                       (one.new_fingerprint, two.new_fingerprint)]
    assert follow_chain(first, two.new_fingerprint, entries, "relay.test") == entries
    assert watcher.check() is True
    assert keyring.transitions == entries
    core = RelayCore(settings, None, keyring, clock)
    assert [t["to"] for t in core.server_info()["key_transitions"]] == [one.new_fingerprint, two.new_fingerprint]
    # Listed for server.key_transition_keep seconds (400 days by default), then no longer.
    clock.advance(settings.server.key_transition_keep + 5)
    assert [t["to"] for t in core.server_info()["key_transitions"]] == [two.new_fingerprint]
    # The private keys go at the end of their grace period; the transitions stay.
    watcher.check()
    assert list_retired(previous_keys_dir(settings)) == []
    assert load_transitions(transitions_path(settings)) == entries


def test_retire_key_destroys_only_after_the_grace_period_unless_forced(settings, keyring):
    first = fp(keyring.current)
    rotate(settings, 3600, time.time())
    refused = admin("retire-key", first, "--state-dir", str(settings.state_dir))
    assert refused.returncode == 1
    assert "--before-grace-period-ends" in refused.stderr and "still accepted until" in refused.stdout
    assert [e.fingerprint for e in list_retired(previous_keys_dir(settings))] == [first]
    nothing = admin("retire-key", "--state-dir", str(settings.state_dir))
    assert nothing.returncode == 0 and "kept " + first in nothing.stdout
    forced = admin("retire-key", first, "--before-grace-period-ends", "--state-dir", str(settings.state_dir), "--json")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["destroyed"] == [first]
    assert list_retired(previous_keys_dir(settings)) == []
    keys = json.loads(admin("keys", "--state-dir", str(settings.state_dir), "--json").stdout)
    assert [t["from"] for t in keys["transitions"]] == [first]


def test_keep_key_with_a_successor_writes_the_transition(tmp_path):
    from msgrelay.keytransitions import load_transitions, transitions_path
    from msgrelay.wire.keys import public_key_pem

    (tmp_path / "state").mkdir()
    external, successor = tmp_path / "etc" / "key.pem", tmp_path / "new.pub"
    old, new = small_key(), small_key()
    write_private_key(external, old)
    successor.write_text(public_key_pem(new.public_key()))
    settings = resolve({}, {"server.state_dir": str(tmp_path / "state"), "server.key_file": str(external),
                            "server.name": "relay.test"})
    done = admin("keep-key", str(external), "--successor", str(successor), "--state-dir", str(tmp_path / "state"),
                 "--json")
    assert done.returncode == 0, done.stderr
    [entry] = load_transitions(transitions_path(settings))
    assert (entry.from_fp, entry.to_fp) == (fp(old), fp(new))
