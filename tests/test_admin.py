"""`msgrelay-admin` run as the installed console script, on real state directories."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from msgrelay.federation.outbox import FederationOutbox
from msgrelay.keyrotation import retire
from msgrelay.serverkey import write_private_key
from msgrelay.store.interface import NewMessage, Quota, TokenRecord, UserRecord
from msgrelay.store.maildir_files import MaildirFiles

ADMIN = str(Path(sys.executable).with_name("msgrelay-admin"))
BIG = Quota(10_000, 100_000_000)


def admin(*args: str, cwd: Optional[Path] = None, stdin: Optional[str] = None) -> subprocess.CompletedProcess:
    return subprocess.run([ADMIN, *args], capture_output=True, text=True, timeout=120, cwd=cwd, input=stdin)


def admin_json(*args: str) -> dict:
    result = admin(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def token_for(secret: str, now: int, expires: Optional[int] = None, label: Optional[str] = None) -> TokenRecord:
    digest = hashlib.sha256(secret.encode()).hexdigest()
    return TokenRecord(digest[:16], digest, label, now, expires)


def message(token: TokenRecord, now: int, ttl: int = 3600, data: str = "opaque-ciphertext") -> NewMessage:
    return NewMessage(token.id, data, "aes-256-gcm", "sealed-password", None, now, now + ttl)


class State:
    """A relay state directory filled through the store's own synchronous API."""

    def __init__(self, root: Path, users):
        self.root = root  # the state directory; the store is in its maildir/ folder
        self.store = root / "maildir"
        self.files = MaildirFiles.open(self.store)
        self.now = int(time.time())
        self.server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        write_private_key(root / "server_key.pem", self.server_key)
        self.users = users
        self.tokens = {}
        for n, u in enumerate(users[:2]):
            self.files.add_user(UserRecord(u.user_id, u.pem, None, self.now - 100))
            self.tokens[u.user_id] = token_for(f"secret{n}", self.now, label=f"friend {n}")
            self.files.add_token(u.user_id, self.tokens[u.user_id])

    def deliver(self, user, count: int = 1, ttl: int = 3600) -> list[str]:
        token = self.tokens[user.user_id]
        return [
            self.files.deliver(user.user_id, os.urandom(8).hex(), message(token, self.now, ttl), BIG, self.now).message_id
            for _ in range(count)
        ]

    def snapshot(self) -> dict[str, bytes]:
        """Every stored byte; not SQLite's shared-memory index of the dedup table (`-shm`),
        which every reader writes its read marks into."""
        return {str(p.relative_to(self.root)): p.read_bytes() if p.is_file() else b"<dir>"
                for p in sorted(self.root.rglob("*")) if not p.name.endswith(".sqlite-shm")}


@pytest.fixture
def state(tmp_path, users) -> State:
    return State(tmp_path / "state", users)


def test_stats_human_and_json(state):
    alice, bob = state.users[:2]
    state.deliver(alice, 3)
    state.deliver(bob, 1)
    state.deliver(bob, 1, ttl=-10)  # already expired: not counted
    assert admin_json("stats", "-d", str(state.root))["queues"] == []
    outbox = FederationOutbox.open(state.root / "outbox")
    for expires in (state.now + 60, state.now + 60, state.now - 1):
        outbox.add("other.example:8443", {"id": "p"}, state.now - 30, expires)
    result = admin("stats", "--state-dir", str(state.root))
    assert result.returncode == 0, result.stderr
    assert "users           2" in result.stdout and "messages        4 pending" in result.stdout
    assert "other.example:8443  3 queued" in result.stdout
    data = admin_json("--state-dir", str(state.root), "stats")
    assert data["users"] == 2 and data["messages"] == 4 and data["backend"] == "maildir"
    assert data["bytes"] == 4 * message(state.tokens[alice.user_id], 0).size
    assert data["oldest_received"].endswith("Z")
    [queue] = data["queues"]
    assert (queue["destination"], queue["queued"], queue["expired"]) == ("other.example:8443", 3, 1)


def test_config_file_is_resolved_as_the_relay_does(state, tmp_path):
    config = tmp_path / "relay.toml"
    config.write_text('[server]\nstate_dir = "state"\n')  # relative: to the working directory, as twistd
    result = admin("--config", str(config), "stats", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["users"] == 2


def test_expire_reclaims_expired_messages_and_retired_keys(state):
    alice = state.users[0]
    state.deliver(alice, 2, ttl=-1)
    kept = state.deliver(alice, 1)
    retired = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    retire(state.root / "previous_keys", retired, state.now - 1)
    data = admin_json("expire", "-d", str(state.root))
    assert data["expired"]["messages"] == 2 and len(data["removed_keys"]) == 1
    assert list((state.root / "previous_keys").iterdir()) == []
    assert [m.message_id for m in state.files.fetch(alice.user_id, state.now, 10)[0]] == kept


def test_user_show_and_delete(state):
    alice = state.users[0]
    state.deliver(alice, 2)
    shown = admin("user", "show", alice.user_id, "-d", str(state.root))
    assert shown.returncode == 0, shown.stderr
    assert alice.user_id in shown.stdout and "2 pending" in shown.stdout and "friend 0" in shown.stdout
    data = admin_json("user", "show", alice.user_id, "-d", str(state.root))
    assert data["messages"] == 2 and data["tokens"][0]["id"] == state.tokens[alice.user_id].id
    assert state.tokens[alice.user_id].digest not in json.dumps(data)

    refused = admin("user", "delete", alice.user_id, "-d", str(state.root), stdin="")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert state.files.get_user(alice.user_id) is not None
    erased = admin("user", "delete", alice.user_id, "--yes", "-d", str(state.root))
    assert erased.returncode == 0 and "2 pending" in erased.stdout
    assert state.files.get_user(alice.user_id) is None
    gone = admin("user", "show", alice.user_id, "-d", str(state.root))
    assert gone.returncode == 1 and gone.stderr.strip() == f"msgrelay-admin: error: no user {alice.user_id} on this relay"


@pytest.mark.parametrize("args, code, says", [
    (["stats", "-d", "/nonexistent/state"], 1, "state directory /nonexistent/state does not exist"),
    (["stats", "-c", "/nonexistent.toml"], 2, "--config: cannot read /nonexistent.toml"),
    (["user", "show", "NOT-AN-ID", "-d", "."], 2, "is not a user id"),
    (["frobnicate"], 2, "No such command"),
])
def test_expected_failures_are_one_line(tmp_path, args, code, says):
    result = admin(*args, cwd=tmp_path)
    assert result.returncode == code
    assert says in result.stderr and "Traceback" not in result.stderr
    if code == 1:
        assert len(result.stderr.strip().splitlines()) == 1


def test_bad_setting_is_named(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[server]\nkey_grace_period = -1\n")
    result = admin("stats", "-c", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == "msgrelay-admin: error: server.key_grace_period: must be zero or a positive integer"


# -- fsck ----------------------------------------------------------------------------------

def plant_damage(state: State) -> dict[str, str]:
    """Break things a crash, a bad disk or a careless hand could break; {relative path: what}."""
    alice, bob = state.users[:2]
    ids = state.deliver(alice, 3)
    state.deliver(bob, 2)
    udir = state.store / "users" / alice.user_id
    planted = {}
    victim = udir / "new" / ids[1]
    victim.write_bytes(victim.read_bytes()[:20])  # torn write
    planted[f"maildir/users/{alice.user_id}/new/{ids[1]}"] = "message file is not valid JSON"
    token_file = udir / "tokens" / f"{state.tokens[alice.user_id].id}.json"
    token_file.write_text('{"id": "x"}')
    planted[f"maildir/users/{alice.user_id}/tokens/{token_file.name}"] = "token record"
    (udir / "new" / "notes.txt").write_text("hello")
    planted[f"maildir/users/{alice.user_id}/new/notes.txt"] = "is not a message name"
    dedup = udir / "dedup" / ("ab" * 32)  # a record as earlier versions wrote them, torn
    dedup.write_bytes(b"\x00\x01")
    planted[f"maildir/users/{alice.user_id}/dedup/{dedup.name}"] = "dedup record is not valid JSON"
    stale = udir / "tmp" / "0123.tmp"
    stale.write_text("half")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    planted[f"maildir/users/{alice.user_id}/tmp/0123.tmp"] = "leftover of an interrupted write"
    (state.store / "users" / "ghostuser").mkdir()
    planted["maildir/users/ghostuser"] = "has no user.json"
    broken_key = state.root / "previous_keys" / f"{state.now + 3600}-{'a' * 64}.pem"
    broken_key.parent.mkdir(mode=0o700)
    broken_key.write_text("-----BEGIN PRIVATE KEY-----\nnope\n")
    planted[f"previous_keys/{broken_key.name}"] = "retired key is unusable"
    return planted


def test_fsck_moves_planted_damage_aside_and_leaves_good_files_alone(state):
    planted = plant_damage(state)
    fresh = state.store / "tmp" / "inflight.tmp"
    fresh.write_text("a write in progress")
    good_before = {k: v for k, v in state.snapshot().items()
                   if k not in planted and not k.startswith("maildir/users/ghostuser") and not k.endswith("/generation")}

    result = admin("fsck", "-d", str(state.root))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(next((state.root / "quarantine").iterdir()).joinpath("fsck-report.json").read_text())
    found = {f["path"]: f for f in report["findings"]}
    assert set(found) == set(planted), result.stdout
    quarantine = state.root / report["quarantine"]
    for path, what in planted.items():
        assert what in found[path]["problem"]
        assert not (state.root / path).exists(), path
        assert (quarantine / path).exists(), path  # moved aside under the same relative path
        assert path in result.stdout

    after = state.snapshot()
    for path, content in good_before.items():
        assert after.get(path) == content, f"{path} was changed"
    assert fresh.exists()
    alice = state.users[0]
    assert len(state.files.fetch(alice.user_id, state.now, 10)[0]) == 2

    again = admin("fsck", "-d", str(state.root), "--json")
    assert again.returncode == 0, again.stdout
    assert json.loads(again.stdout)["damaged"] is False


def test_fsck_dry_run_reports_and_changes_nothing(state):
    planted = plant_damage(state)
    before = state.snapshot()
    result = admin("fsck", "--dry-run", "--json", "-d", str(state.root))
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert {f["path"] for f in data["findings"]} == set(planted)
    assert all(f["action"] == "would be moved to quarantine" for f in data["findings"])
    assert state.snapshot() == before


def test_fsck_of_a_healthy_store_and_missing_folders(state):
    state.deliver(state.users[0], 2)
    clean = admin("fsck", "-d", str(state.root))
    assert clean.returncode == 0, clean.stdout
    assert "no damage found" in clean.stdout
    os.rmdir(state.store / "users" / state.users[1].user_id / "tmp")
    (state.store / "replay" / "1700000000-0123abcd.journal").write_bytes(b"0" * 32 + b" 1700000300\n0f")
    (state.store / "replay" / "stray").write_bytes(b"?")
    repaired = admin("fsck", "-d", str(state.root), "--json")
    assert repaired.returncode == 1
    findings = json.loads(repaired.stdout)["findings"]
    assert sorted(f["action"].split()[0] for f in findings) == ["moved", "recreated"], findings
    assert sorted(p.name for p in (state.store / "replay").iterdir()) == ["1700000000-0123abcd.journal"]
    assert admin("fsck", "-d", str(state.root)).returncode == 0


def test_fsck_reports_a_damaged_dedup_table_and_leaves_it_in_place(state):
    state.deliver(state.users[0], 2)
    state.files.dedup.close()  # as a stopped relay leaves it: everything checkpointed into the file
    table = state.store / "dedup.sqlite"
    damaged = b"not a database, just bytes" * 200
    table.write_bytes(damaged)
    result = admin("fsck", "-d", str(state.root), "--json")
    assert result.returncode == 1, result.stdout
    (finding,) = json.loads(result.stdout)["findings"]
    assert finding["path"] == "maildir/dedup.sqlite" and "quick check" in finding["problem"], finding
    assert finding["action"].startswith("left in place"), finding
    assert table.read_bytes() == damaged and len(os.listdir(state.store / "users" / state.users[0].user_id / "new")) == 2


def test_fsck_refuses_what_is_not_a_store(tmp_path):
    (tmp_path / "empty").mkdir()
    result = admin("fsck", "-d", str(tmp_path / "empty"))
    assert result.returncode == 1 and "holds no maildir store" in result.stderr
    other = tmp_path / "other"
    (other / "maildir").mkdir(parents=True)
    (other / "maildir" / "FORMAT").write_text("something else 9\n")
    result = admin("fsck", "-d", str(other))
    assert result.returncode == 1 and "nothing changed" in result.stderr
    assert sorted(p.name for p in (other / "maildir").iterdir()) == ["FORMAT"]


def test_fsck_fixes_a_key_readable_by_others(state):
    os.chmod(state.root / "server_key.pem", 0o644)
    result = admin("fsck", "-d", str(state.root))
    assert result.returncode == 1 and "others may read it" in result.stdout
    assert (state.root / "server_key.pem").stat().st_mode & 0o777 == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand the directory to another user")
def test_writing_into_another_users_state_directory_is_refused(state):
    os.chown(state.root, 65534, 65534)
    key_before = (state.root / "server_key.pem").read_bytes()
    for args in (["rotate-key"], ["fsck"], ["expire"]):
        result = admin(*args, "-d", str(state.root))
        assert result.returncode == 1 and "run this command as that user" in result.stderr, args
    assert (state.root / "server_key.pem").read_bytes() == key_before
    assert admin("stats", "-d", str(state.root)).returncode == 0
    assert admin("fsck", "--dry-run", "-d", str(state.root)).returncode == 0


def test_fsck_restores_a_lost_format_file(state):
    (state.store / "FORMAT").unlink()
    assert admin("stats", "-d", str(state.root)).returncode == 1  # not recognised as a store
    result = admin("fsck", "-d", str(state.root), "--json")
    assert result.returncode == 1
    assert [(f["path"], f["action"]) for f in json.loads(result.stdout)["findings"]] == [("maildir/FORMAT", "recreated")]
    assert (state.store / "FORMAT").read_text() == "msgrelay-maildir 2\n"
    assert admin("stats", "-d", str(state.root)).returncode == 0


def test_admin_starts_without_the_federation_stack():
    """Every command imports msgrelay.admin.cli: the federation and DNS modules (Twisted's
    HTTP client and names, a third of the start-up) come only with the commands that use them."""
    heavy = ("msgrelay.federation.factory", "msgrelay.federation.resolver", "twisted.web.client", "twisted.names.client")
    code = f"import sys, msgrelay.admin.cli; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
