"""Unit tests of the client library's local pieces: invites, profile files, keys, outbox, output."""

from __future__ import annotations

import json
import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from msgrelay.client.api import ServerInfo, normalise_url, packet_bytes
from msgrelay.client.errors import InviteError, MessageRejected, ProfileError, RelayError, UsageError
from msgrelay.client.identity import Identity, pem_is_encrypted, private_key_from_pem, private_key_to_pem
from msgrelay.client.inbox import file_stem, write_received_file
from msgrelay.client.invite import format_invite, parse_invite
from msgrelay.client.messages import TOKEN_REQUEST, build_message, token_request_data, verify_message
from msgrelay.client.outbox import Outbox, content_digest, new_packet_id
from msgrelay.client.output import parse_duration, safe
from msgrelay.client.profile import Contact, Profile, default_root, new_contact
from msgrelay.client.session import normalise_fingerprint
from msgrelay.wire.envelope import seal
from msgrelay.wire.keys import fingerprint, public_key_pem
from msgrelay.wire.packet import PACKET_ID_RE

UID = "abcdefghijklmnopqrstuvwxyz234567"


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# -- invites ----------------------------------------------------------------------------


def test_invite_round_trip():
    line = format_invite(f"{UID}@Relay.Example.org:8443", "tok_ABCDEFGHIJKLMNOP-._~")
    assert line == f"msgrelay:{UID}@Relay.Example.org:8443?token=tok_ABCDEFGHIJKLMNOP-._~"
    invite = parse_invite(f"  {line}\n")
    assert invite.user_id == UID
    assert invite.server_name == "relay.example.org:8443"
    assert invite.token == "tok_ABCDEFGHIJKLMNOP-._~"
    assert str(invite) == f"msgrelay:{UID}@relay.example.org:8443?token=tok_ABCDEFGHIJKLMNOP-._~"


def test_invite_ignores_unknown_parameters():
    assert parse_invite(f"msgrelay:{UID}@relay.test?token=ABCDEFGHIJKLMNOPQRST&v=2").token == "ABCDEFGHIJKLMNOPQRST"


@pytest.mark.parametrize(
    "line, match",
    [
        ("", "not an invite"),
        (f"https://{UID}@relay.test?token=ABCDEFGHIJKLMNOPQRST", "not an invite"),
        (f"msgrelay:{UID}@relay.test", "no \\?token"),
        (f"msgrelay:{UID}?token=ABCDEFGHIJKLMNOPQRST", "names no relay"),
        (f"msgrelay:{UID[:-1]}@relay.test?token=ABCDEFGHIJKLMNOPQRST", "32-character user id"),
        (f"msgrelay:{UID.upper()}@relay.test?token=ABCDEFGHIJKLMNOPQRST", "32-character user id"),
        (f"msgrelay:{UID}@relay..test?token=ABCDEFGHIJKLMNOPQRST", "invalid server name"),
        (f"msgrelay:{UID}@relay.test:99999?token=ABCDEFGHIJKLMNOPQRST", "invalid server name"),
        (f"msgrelay:{UID}@relay.test?token=short", "16 or more"),
        (f"msgrelay:{UID}@relay.test?token=ABCDEFGHIJKLMNOPQRST&token=ABCDEFGHIJKLMNOPQRSU", "exactly one"),
        (f"msgrelay:{UID}@relay.test?tok=ABCDEFGHIJKLMNOPQRST", "exactly one"),
        (f"msgrelay:{UID}@relay.test?token=ABCDEFGHIJ%20KLMNOPQRST", "URL-safe"),
    ],
)
def test_bad_invites(line, match):
    with pytest.raises(InviteError, match=match):
        parse_invite(line)


def test_invite_error_is_a_usage_error():
    assert issubclass(InviteError, UsageError) and InviteError("x").exit_code == 2


# -- profile files and keys ---------------------------------------------------------------


def test_default_root_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert default_root() == tmp_path / "msgrelay"
    assert Profile.locate("work").path == tmp_path / "msgrelay" / "work"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert str(default_root()) == os.path.join(os.path.expanduser("~"), ".config", "msgrelay")
    with pytest.raises(UsageError):
        Profile.locate("../escape")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_profile_key_is_0600_and_folder_0700(tmp_path, key):
    old = os.umask(0)  # even a permissive umask must not leak the key
    try:
        profile = Profile(tmp_path / "p")
        profile.create_folder()
        profile.write_key(key)
        profile.save_config({"x": 1})
    finally:
        os.umask(old)
    assert _mode(profile.path) == 0o700
    assert _mode(profile.key_path) == 0o600
    assert _mode(profile.config_path) == 0o600
    assert _mode(profile.folder("inbox")) == 0o700
    assert profile.load_private_key(lambda: None).private_numbers() == key.private_numbers()
    with pytest.raises(FileExistsError):
        profile.write_key(key)  # never overwrites an existing key


def test_profile_refuses_a_key_readable_by_others(tmp_path, key):
    profile = Profile(tmp_path / "p")
    profile.create_folder()
    profile.write_key(key)
    os.chmod(profile.key_path, 0o644)
    with pytest.raises(ProfileError, match="chmod 600"):
        profile.load_private_key(lambda: None)


def test_passphrase_protected_key(tmp_path, key):
    profile = Profile(tmp_path / "p")
    profile.create_folder()
    profile.write_key(key, b"correct horse")
    pem = profile.key_path.read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") and pem_is_encrypted(pem)
    loaded = profile.load_private_key(lambda: b"correct horse")
    assert loaded.private_numbers() == key.private_numbers()
    with pytest.raises(ProfileError, match="wrong passphrase"):
        profile.load_private_key(lambda: b"wrong")
    with pytest.raises(ProfileError, match="passphrase-protected"):
        private_key_from_pem(pem, None)


def test_unencrypted_key_needs_no_passphrase(tmp_path, key):
    pem = private_key_to_pem(key)
    assert not pem_is_encrypted(pem)
    assert private_key_from_pem(pem, None).private_numbers() == key.private_numbers()
    profile = Profile(tmp_path / "p")
    profile.create_folder()
    profile.write_key(key)

    def ask() -> bytes:
        raise AssertionError("asked for a passphrase")

    assert profile.load_private_key(ask).private_numbers() == key.private_numbers()


def test_an_imported_key_is_checked_in_full_the_profiles_own_is_not_and_still_signs_correctly(tmp_path, key):
    """The profile's key is loaded without OpenSSL's RSA consistency check (it costs every
    command about 0.1 s); a key given to `init --key` is checked. A damaged CRT exponent in
    the profile's file still gives correct signatures: OpenSSL verifies each CRT result and
    falls back to the private exponent rather than release a faulty one."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    good = key.private_numbers()
    damaged = rsa.RSAPrivateNumbers(good.p, good.q, good.d, good.dmp1 ^ 2, good.dmq1, good.iqmp,
                                    good.public_numbers).private_key(unsafe_skip_rsa_key_validation=True)
    pem = damaged.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    with pytest.raises(ProfileError, match="does not parse"):
        private_key_from_pem(pem, None)  # what `init --key` does with a file it is given
    profile = Profile(tmp_path / "p")
    profile.create_folder()
    profile.key_path.write_bytes(pem)
    os.chmod(profile.key_path, 0o600)
    loaded = profile.load_private_key(lambda: None)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    signature = loaded.sign(b"a request", pss, hashes.SHA256())
    key.public_key().verify(signature, b"a request", pss, hashes.SHA256())  # raises if faulty


def test_identity_must_match_config(tmp_path, key, other_key):
    profile = Profile(tmp_path / "p")
    profile.create_folder()
    profile.write_key(key)
    other = Identity(other_key, "relay.test")
    profile.save_config({"server_url": "http://x", "server_name": "relay.test", "server_fingerprint": "0" * 64,
                         "user_id": other.user_id})
    with pytest.raises(ProfileError, match="does not belong"):
        profile.load_identity(lambda: None)


def test_missing_profile_says_how_to_create_it(tmp_path):
    with pytest.raises(UsageError, match="init --server"):
        Profile(tmp_path / "nope", "nope").load_config()


def test_contacts_round_trip(tmp_path, key):
    profile = Profile(tmp_path / "p")
    profile.create_folder()
    with profile.editing_contacts() as contacts:
        contacts["bob"] = new_contact("bob", f"{UID}@Relay.Test", key.public_key(), token="t" * 20)
        contacts["bob"].remember("ref1")
    loaded = profile.contact("bob")
    assert loaded.address == f"{UID}@relay.test" and loaded.user_id == UID and loaded.server_name == "relay.test"
    assert loaded.fingerprint == fingerprint(key.public_key()) and loaded.key_pem == public_key_pem(key.public_key())
    assert loaded.last_id == "ref1" and loaded.recent_refs == ["ref1"]
    assert Contact.from_json({**loaded.__dict__, "future_field": 1}).name == "bob"
    with pytest.raises(UsageError, match="no contact named 'carol'"):
        profile.contact("carol")
    with pytest.raises(UsageError):
        new_contact("bad name!", f"{UID}@relay.test", key.public_key())


def test_contact_editing_is_not_saved_on_error(tmp_path, key):
    profile = Profile(tmp_path / "p")
    profile.create_folder()
    with pytest.raises(RuntimeError):
        with profile.editing_contacts() as contacts:
            contacts["bob"] = new_contact("bob", f"{UID}@relay.test", key.public_key())
            raise RuntimeError("boom")
    assert profile.load_contacts() == {}


# -- outbox -----------------------------------------------------------------------------


def test_packet_ids_fit_the_protocol():
    ids = {new_packet_id() for _ in range(100)}
    assert len(ids) == 100 and all(PACKET_ID_RE.match(i) for i in ids)


def test_outbox_keeps_order_and_finds_retries(tmp_path):
    outbox = Outbox(tmp_path / "out", tmp_path / "failed")
    outbox.path.mkdir()
    outbox.failed_path.mkdir()
    digest = content_digest("bob", "text", b"hi")
    assert digest != content_digest("bob", "text", b"hi!") != content_digest("bo", "text", b"bhi")
    first = outbox.add("bob", "text", {"id": "p1"}, "text to bob", digest=digest)
    second = outbox.add("carol", "file", {"id": "p2"}, "file to carol")
    assert [e.packet_id for e in outbox.pending()] == ["p1", "p2"]
    assert outbox.find(digest) == first
    failed = outbox.fail(second, "errno 120")
    assert failed.exists() and "errno 120" in failed.read_text()
    outbox.done(first)
    assert outbox.pending() == [] and outbox.find(digest) is None


# -- received files, output -----------------------------------------------------------------


def test_received_files_never_overwrite(tmp_path):
    (tmp_path / "bob-x.bin").write_bytes(b"existing")
    first = write_received_file(tmp_path, "bob-x", b"one")
    second = write_received_file(tmp_path, "bob-x", b"two")
    assert (tmp_path / "bob-x.bin").read_bytes() == b"existing"
    assert first.read_bytes() == b"one" and second.read_bytes() == b"two" and first != second
    assert write_received_file(tmp_path, "../../etc/passwd", b"x").parent == tmp_path


def test_file_stem_is_safe():
    assert file_stem("01795-abc") == "01795-abc"
    assert file_stem("../x").startswith("h") and "/" not in file_stem("a/b")


@pytest.mark.parametrize("text, seconds", [("90", 90), ("45m", 2700), ("12h", 43200), ("30d", 2592000), ("2w", 1209600)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_duration_never_and_errors():
    assert parse_duration("never", allow_never=True) == 0
    for bad in ("never", "0", "-1", "1y", "", "1.5h"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_received_text_cannot_drive_the_terminal():
    assert safe("ok\x1b[2J\x07\u202eevil\nnext\tcol") == "ok\\u001b[2J\\u0007\\u202eevil\nnext\tcol"


def test_urls_and_fingerprints():
    assert normalise_url("relay.example.org") == "https://relay.example.org"
    assert normalise_url("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"
    assert normalise_url("https://h.example/prefix/") == "https://h.example/prefix"
    for bad in ("ftp://h", "https://", "https://h?x=1"):
        with pytest.raises(UsageError):
            normalise_url(bad)
    fp = "ab" * 32
    assert normalise_fingerprint(":".join(fp.upper()[i:i + 2] for i in range(0, 64, 2))) == fp
    with pytest.raises(UsageError):
        normalise_fingerprint("abc")


def test_relay_error_line_names_errno_and_retry():
    error = RelayError(150, 429, "slow down", info="https://r/errors#errno-150", retry_after=7, where="relay r")
    assert str(error) == "relay r refused the request (errno 150, HTTP 429): slow down; retry after 7 s [https://r/errors#errno-150]"
    assert error.transient and not RelayError(120, 403, "x").transient and error.exit_code == 4


def test_server_info_checks_fingerprint(key):
    pem = public_key_pem(key.public_key())
    info = ServerInfo.from_json({"name": "Relay.Test", "key": pem, "fingerprint": fingerprint(key.public_key()),
                                 "previous_keys": [{"fingerprint": "f" * 64, "until": "2026-12-01T00:00:00Z"}]})
    assert info.name == "relay.test" and info.max_validity == 300
    assert info.previous_key_until("f" * 64) == "2026-12-01T00:00:00Z"
    with pytest.raises(ValueError):
        ServerInfo.from_json({"name": "relay.test", "key": pem, "fingerprint": "0" * 64})


def test_token_request_must_name_its_signer(key, other_key):
    alice, bob = Identity(key, "a.test"), Identity(other_key, "b.test")
    ok = build_message(alice, bob.address, TOKEN_REQUEST, token_request_data(alice.address, "t" * 22))
    assert verify_message(ok, bob).data["token"] == "t" * 22
    forged = build_message(alice, bob.address, TOKEN_REQUEST, token_request_data(f"{bob.user_id}@m.test", "t" * 22))
    with pytest.raises(MessageRejected, match="someone other than its signer"):
        verify_message(forged, bob)


@pytest.mark.parametrize("size", [0, 1, 2, 3, 1000])
def test_sealed_body_size_is_exact(key, size):
    """The outbox refuses packets a relay's max_body_bytes would refuse, without sealing twice."""
    public = key.public_key()
    info = ServerInfo.from_json({"name": "r.test", "key": public_key_pem(public), "fingerprint": fingerprint(public)})
    plaintext = packet_bytes({"id": "p", "data": "é" * size})
    body = json.dumps(seal(public, plaintext, info.outer_algorithm), ensure_ascii=False).encode("utf-8")
    assert info.sealed_body_size(len(plaintext)) == len(body)
