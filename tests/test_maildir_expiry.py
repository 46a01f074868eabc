"""Expiry sweeps of the maildir's dedup records (the table's rows, and earlier versions' files),
tokens and replay entries cost what expires, not what is stored (msgrelay/store/maildir_expiry.py), and the in-memory index behind them is
rebuilt exactly from the files by a fresh instance (a restart, or a crash). Time is the
injected `now` of each call; record reads are counted at the system calls."""

from __future__ import annotations

import io
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from msgrelay.store.maildir import MaildirFiles
from store_contract import ALICE, BIG, BOB, NOW, message, token, user

class Touches:
    """Counts stat, listdir and open (io's and os's) calls on record files (`files`) and listings of record
    folders (`listings`) while active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.files: list[str] = []
        self.listings: list[str] = []
        self.active = True
        for module, name in ((os, "stat"), (os, "listdir"), (io, "open"), (os, "open")):
            monkeypatch.setattr(module, name, self._counting(getattr(module, name), name == "listdir"))

    def _counting(self, real: Any, listing: bool) -> Any:
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            if self.active and isinstance(path, (str, Path)):
                where = Path(path)
                if listing and (where.name in ("dedup", "tokens") or where.parent.name == "replay"):
                    self.listings.append(str(where))
                elif where.parent.name in ("dedup", "tokens") or where.parent.parent.name == "replay":
                    self.files.append(str(where))
            return real(path, *args, **kwargs)
        return call


def records(files: MaildirFiles) -> dict[str, set[str]]:
    """The records on disk, by kind (dedup: the table's rows and earlier versions' files;
    replay: the keys in the journal's segments)."""
    found: dict[str, set[str]] = {"dedup": set(), "tokens": set(), "replay": set()}
    for uid in files.user_ids():
        for kind in ("dedup", "tokens"):
            found[kind] |= {f"{uid}/{n}" for n in os.listdir(files.users / uid / kind)}
    if files.dedup.path.exists():
        with sqlite3.connect(files.dedup.path) as table:
            found["dedup"] |= {f"{uid}/{key}" for uid, key in table.execute("SELECT user_id, key FROM dedup")}
    for segment in files.replay.glob("*.journal"):
        found["replay"] |= {line.split()[0] for line in segment.read_text().splitlines()}
    return found


def plant_old_dedup(files: MaildirFiles, uid: str, key: str, expires: int) -> None:
    """A dedup record as earlier versions wrote it: a file named by the key, mtime = expiry."""
    path = files.users / uid / "dedup" / key
    path.write_text(json.dumps({"message_id": f"old-{key}", "expires": expires}))
    os.utime(path, (expires, expires))


def stocked(root: Path) -> MaildirFiles:
    """Two users with tokens, 30 messages (dedup records in the table), 9 dedup records of an
    earlier version (a file each) and 20 replay entries (one journal segment), expiring at
    NOW + 100 * k for several k."""
    files = MaildirFiles.open(root)
    for uid in (ALICE, BOB):
        files.add_user(user(uid))
        files.add_token(uid, token(f"{uid}-short", expires=NOW + 200))
        files.add_token(uid, token(f"{uid}-forever", expires=None))
    for n in range(30):
        files.deliver(ALICE if n % 2 else BOB, f"k{n}", message(data=f"m{n}", expires=NOW + 100 * (1 + n % 3)), BIG, NOW)
    for n in range(9):
        plant_old_dedup(files, ALICE, f"{n:064x}", NOW + 100 * (1 + n % 3))
    for n in range(20):
        assert files.remember_signature(f"sig{n}".encode(), NOW + 100 * (1 + n % 2), NOW)
    return files


def test_a_sweep_reads_only_the_records_that_are_due(tmp_path, monkeypatch):
    files = stocked(tmp_path / "s")
    files.expire(NOW)  # the first sweep after opening builds the index: one stat of each record
    before = records(files)
    touches = Touches(monkeypatch)
    files.expire(NOW + 99)
    assert touches.files == touches.listings == []  # nothing due: no record or record folder touched
    files.expire(NOW + 100)
    touches.active = False
    # Due now: 10 rows of the table (one DELETE) and 3 old dedup files, each read once and
    # removed; nothing listed. The replay journal reads nothing: its segment goes whole once
    # its last entry expires.
    assert len(touches.files) == 3 and touches.listings == []
    assert not [p for p in touches.files if "/tokens/" in p]
    after = records(files)
    assert len(before["dedup"]) - len(after["dedup"]) == 13 and after["replay"] == before["replay"]
    assert after["tokens"] == before["tokens"] and len(after["replay"]) == 20
    files.expire(NOW + 200)
    assert records(files)["replay"] == set() and len(files.replay_journal()) == 0


def test_a_fresh_instance_rebuilds_the_index_from_the_files(tmp_path):
    first = stocked(tmp_path / "s")
    first.expire(NOW + 100)
    # A restart (or a crash: the index was only ever memory): a new instance on the same files.
    second = MaildirFiles(tmp_path / "s")
    assert len(second.expiry) == 0 and not second.expiry.built
    assert len(second.replay_journal()) == 20  # read back at the first use, as the relay does at start
    second.expire(NOW + 200)
    left = records(second)
    assert len(left["dedup"]) == 13 and left["replay"] == set()
    assert {n.split("/")[0] for n in left["tokens"]} == {ALICE, BOB} and len(left["tokens"]) == 2  # forever ones
    second.expire(NOW + 300)
    assert records(second)["dedup"] == set() and len(records(second)["tokens"]) == 2


def test_a_record_written_again_with_a_later_expiry_stays_until_then(tmp_path):
    files = MaildirFiles.open(tmp_path / "s")
    files.add_user(user(ALICE))
    first = files.deliver(ALICE, "same", message(expires=NOW + 100), BIG, NOW)
    assert files.remember_signature(b"sig", NOW + 100, NOW)
    # Expired but not yet swept: the same packet is a new message, the signature usable again.
    again = files.deliver(ALICE, "same", message(data="new", expires=NOW + 500), BIG, NOW + 100)
    assert again.message_id != first.message_id and not again.duplicate
    assert files.remember_signature(b"sig", NOW + 500, NOW + 100)
    files.expire(NOW + 200)
    assert len(records(files)["dedup"]) == 1 and len(records(files)["replay"]) == 1
    assert files.deliver(ALICE, "same", message(expires=NOW + 500), BIG, NOW + 200).duplicate
    assert not files.remember_signature(b"sig", NOW + 500, NOW + 200)
    files.expire(NOW + 500)
    assert records(files) == {"dedup": set(), "tokens": set(), "replay": set()}


def test_records_removed_by_others_or_with_their_user_are_dropped(tmp_path):
    files = MaildirFiles.open(tmp_path / "s")
    files.add_user(user(ALICE))
    files.add_user(user(BOB))
    files.expire(NOW)
    revoked = token("revoked", expires=NOW + 100)
    files.add_token(ALICE, revoked)
    files.deliver(BOB, "k", message(expires=NOW + 100), BIG, NOW)
    assert files.revoke_token(ALICE, revoked.id)
    assert files.delete_user(BOB)
    assert len(files.expiry) == 1  # the token file's; BOB's dedup record was a row, gone with him
    files.expire(NOW + 100)
    assert len(files.expiry) == 0 and records(files) == {"dedup": set(), "tokens": set(), "replay": set()}
