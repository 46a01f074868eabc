"""`msgrelay-admin fsck` for the maildir store: find damage and move it aside, never delete it.

Checked: the store's top folders and FORMAT; every user folder (user.json matching its name
and key, tokens, pending message files, earlier versions' dedup records, nothing else); each
record of the user's message log (damage reported and left in place, since the segment's
other records are pending messages); the dedup table (reported, never moved); the replay
journal; and the tmp folders, where entries older than `min_tmp_age` are leftovers of
interrupted writes.
A damaged or misplaced entry is renamed into ``<state>/quarantine/<UTC time>/`` under its
path relative to the state directory, so it can be inspected or moved back; a missing folder
or FORMAT is recreated. Erased users still in trash/ are removed, which finishes the erasure
the user asked for (that is not damage).

Safe beside a running relay: each user folder is checked under the lock the relay takes
for writes, every final file was renamed into place complete, and a file that vanishes
meanwhile (acknowledged, expired) is simply skipped.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

from ..wire.errors import ProtocolError
from ..wire.keys import load_public_key, user_id_for_key
from .interface import NewMessage
from .maildir_files import FORMAT, FORMATS, USER_SUBDIRS, MaildirFiles
from .maildir_log import LOG_DIR, SEGMENT_NAME, decode_message, scan
from .maildir_index import GENERATION, note_change
from .maildir_replay import SEGMENT
from ..durable import fsync_dir, read_whole, write_durably
from .maildir_layout import DIR_MODE, SAFE_NAME, MessageName, list_dir, locked_directory, remove_tree
from .quarantine import Finding, FsckReport, Quarantine

HEX64 = re.compile(r"[0-9a-f]{64}")
SHARD = re.compile(r"[0-9a-f]{2}")
RECORD_NAMES = {"messages": "message file", "tokens": "token record", "dedup": "dedup record",
                "replay": "replay entry"}
#: Temporary files younger than this may belong to a write in progress of a running relay.
MIN_TMP_AGE = 60.0


class FsckAbort(Exception):
    """The directory is not a maildir store this version understands; nothing was touched."""


def _kinds(obj: Any, fields: dict[str, tuple]) -> Optional[str]:
    """The first field of a JSON record that is missing or of the wrong type, described."""
    if not isinstance(obj, dict):
        return "is not a JSON object"
    for name, types in fields.items():
        if name not in obj:
            return f"has no {name!r}"
        value = obj[name]
        if isinstance(value, bool) or not isinstance(value, types):
            return f"has a {name!r} of the wrong type"
    return None


def _read_json(path: Path) -> tuple[Any, Optional[str]]:
    """(object, problem); raises FileNotFoundError if it vanished."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        return None, "is not a regular file"
    try:
        return json.loads(path.read_bytes()), None
    except (ValueError, UnicodeDecodeError):
        return None, "is not valid JSON"


INT, STR, OPT_STR, OPT_INT = (int,), (str,), (str, type(None)), (int, type(None))
USER_FIELDS = {"user_id": STR, "key_pem": STR, "push_endpoint": OPT_STR, "created": INT}
TOKEN_FIELDS = {"id": STR, "digest": STR, "label": OPT_STR, "created": INT, "expires": OPT_INT}
MESSAGE_FIELDS = {"token_id": STR, "data": STR, "algorithm": STR, "password": STR, "signature": OPT_STR,
                  "received": INT, "expires": INT}
DEDUP_FIELDS = {"message_id": STR, "expires": INT}


def user_problem(path: Path, user_id: str) -> Optional[str]:
    obj, problem = _read_json(path)
    problem = problem or _kinds(obj, USER_FIELDS)
    if problem:
        return problem
    if obj["user_id"] != user_id:
        return "names another user"
    try:
        if user_id_for_key(load_public_key(obj["key_pem"])) != user_id:
            return "holds a key of another user id"
    except ProtocolError:
        return "holds no usable public key"
    return None


def token_problem(path: Path, token_id: str) -> Optional[str]:
    obj, problem = _read_json(path)
    problem = problem or _kinds(obj, TOKEN_FIELDS)
    if problem:
        return problem
    if obj["id"] != token_id or not HEX64.fullmatch(obj["digest"]) or not obj["digest"].startswith(token_id):
        return "does not match its file name"
    return None


def message_problem(path: Path, name: MessageName) -> Optional[str]:
    obj, problem = _read_json(path)
    return problem or stored_message_problem(obj, name)


def stored_message_problem(obj: Any, name: MessageName) -> Optional[str]:
    """What is wrong with a stored message's JSON (a file's or a log record's), or None."""
    problem = _kinds(obj, MESSAGE_FIELDS)
    if problem:
        return problem
    size = NewMessage(obj["token_id"], obj["data"], obj["algorithm"], obj["password"], obj["signature"],
                      obj["received"], obj["expires"]).size
    if (obj["received"], obj["expires"], size) != (name.received, name.expires, name.size):
        return "does not match its file name (received, expires or size)"
    return None


def dedup_problem(path: Path) -> Optional[str]:
    obj, problem = _read_json(path)
    return problem or _kinds(obj, DEDUP_FIELDS)


def replay_problem(path: Path) -> Optional[str]:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    try:
        int(path.read_bytes())
    except ValueError:
        return "does not hold a time"
    return None


class MaildirFsck:
    """One check of a maildir state directory."""

    def __init__(self, root: Path, now: Optional[float] = None, dry_run: bool = False,
                 min_tmp_age: float = MIN_TMP_AGE, quarantine: Optional[Quarantine] = None):
        self.files = MaildirFiles(root)  # not open(): that would create and change things
        self.root = Path(root)
        self.now = time.time() if now is None else now
        self.dry_run = dry_run
        self.min_tmp_age = min_tmp_age
        self.quarantine = quarantine or Quarantine(self.root, dry_run, self.now)
        self.report = FsckReport(checked={k: 0 for k in ("users", "messages", "log_segments", "tokens", "dedup",
                                                         "replay")})

    def run(self) -> FsckReport:
        """Check everything; the caller writes `quarantine.write_report` once all is done."""
        self._check_top()
        for name in sorted(list_dir(self.files.users)):
            self._check_user_entry(self.files.users / name)
        self._check_replay()
        self._check_dedup_table()
        for folder in [self.files.tmp] + [self.files.users / u / "tmp" for u in self.files.user_ids()]:
            self._check_tmp(folder)
        for name in sorted(list_dir(self.files.trash)):
            self._note(Finding(f"trash/{name}", "erased user not yet removed",
                               "would be removed" if self.dry_run else "removed", damage=False))
            if not self.dry_run:
                remove_tree(self.files.trash / name)
        return self.report

    # -- helpers ---------------------------------------------------------------------------

    def _note(self, finding: Optional[Finding]) -> None:
        if finding is not None:
            self.report.findings.append(finding)

    def _move(self, path: Path, problem: str) -> None:
        self._note(self.quarantine.move(path, problem))

    def _recreate(self, path: Path, what: str, make: Callable[[], None]) -> None:
        self._note(Finding(self.quarantine.relative(path), f"{what} is missing",
                           "would be recreated" if self.dry_run else "recreated"))
        if not self.dry_run:
            make()

    def _ensure_dir(self, path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            return
        if os.path.lexists(path):
            self._move(path, "should be a folder")
        def make() -> None:
            os.mkdir(path, DIR_MODE)
            fsync_dir(path.parent)

        self._recreate(path, "folder", make)

    def _checked(self, path: Path, problem_of: Callable[[], Optional[str]], kind: str) -> None:
        """Run one record check; a file that vanished meanwhile is skipped."""
        try:
            problem = problem_of()
        except FileNotFoundError:
            return
        self.report.checked[kind] += 1
        if problem:
            self._move(path, f"{RECORD_NAMES[kind]} {problem}")

    # -- the checks ------------------------------------------------------------------------

    def _check_top(self) -> None:
        marker = self.root / "FORMAT"
        try:
            found: Optional[str] = marker.read_text("utf-8")
        except FileNotFoundError:
            found = None
        except (UnicodeDecodeError, IsADirectoryError):
            found = "?"
        if found is None and not self.files.users.is_dir():
            raise FsckAbort(f"{self.root} holds no maildir store (no FORMAT file and no users/ folder)")
        if found is not None and found not in FORMATS:
            raise FsckAbort(f"{self.root} is not a {FORMAT.strip()} store (FORMAT says {found.strip()!r}); nothing changed")
        for folder in (self.files.users, self.files.replay, self.files.tmp, self.files.trash):
            self._ensure_dir(folder)
        if found is None:
            self._recreate(marker, "FORMAT", lambda: write_durably(self.files.tmp, marker, FORMAT.encode("utf-8")))

    def _check_user_entry(self, udir: Path) -> None:
        name = udir.name
        if not SAFE_NAME.fullmatch(name) or not udir.is_dir() or udir.is_symlink():
            self._move(udir, "does not belong in users/")
            return
        with locked_directory(udir) as exists:
            if exists:
                self._check_user(udir, name)
                if not self.dry_run and udir.is_dir():
                    # What fsck saw wins over any relay's in-memory index of this user:
                    # a changed generation makes every index rebuild from the folder.
                    note_change(udir)

    def _check_user(self, udir: Path, user_id: str) -> None:
        try:
            problem = user_problem(udir / "user.json", user_id)
        except FileNotFoundError:
            problem = "has no user.json"
        else:
            problem = problem and f"user.json {problem}"
        if problem:
            self._move(udir, f"user folder {problem}")  # unusable without it; messages go along
            return
        self.report.checked["users"] += 1
        for entry in sorted(list_dir(udir)):
            if entry not in ("user.json", GENERATION) + USER_SUBDIRS:
                self._move(udir / entry, "does not belong in a user folder")
        for sub in USER_SUBDIRS:
            self._ensure_dir(udir / sub)
        for entry in sorted(list_dir(udir / "new")):
            path, parsed = udir / "new" / entry, MessageName.parse(entry)
            if parsed is None:
                self._move(path, "is not a message name")
            else:
                self._checked(path, partial(message_problem, path, parsed), "messages")
        for entry in sorted(list_dir(udir / LOG_DIR)):
            path = udir / LOG_DIR / entry
            named = SEGMENT_NAME.fullmatch(entry)
            if named is None or not stat.S_ISREG(os.lstat(path).st_mode):
                self._move(path, "is not a message log segment")
            else:
                self._check_segment(path, int(named.group(1)))
        for entry in sorted(list_dir(udir / "tokens")):
            path, token_id = udir / "tokens" / entry, entry.removesuffix(".json")
            if not entry.endswith(".json") or not SAFE_NAME.fullmatch(token_id):
                self._move(path, "is not a token file name")
            else:
                self._checked(path, partial(token_problem, path, token_id), "tokens")
        for entry in sorted(list_dir(udir / "dedup")):
            path = udir / "dedup" / entry
            if not HEX64.fullmatch(entry):
                self._move(path, "is not a dedup record name")
            else:
                self._checked(path, partial(dedup_problem, path), "dedup")

    def _check_segment(self, path: Path, number: int) -> None:
        """Every record of a message log segment. Damage is reported and left in place: the
        segment's other records are pending messages, which the relay reads around it. A
        segment's torn tail (a write a crash cut short) is expected and not damage."""
        try:
            data = read_whole(path)
        except FileNotFoundError:
            return  # compacted meanwhile
        found = scan(data, number)
        self.report.checked["log_segments"] += 1
        where = self.quarantine.relative(path)
        left = "left in place: the relay skips these bytes and reads the records around them"
        for damage in found.damage:
            if not damage.tail:
                self._note(Finding(where, f"log segment has {damage.length} unreadable bytes at offset "
                                          f"{damage.offset}", left))
        for entry in found.messages:
            decoded = decode_message(data[entry.location[1]:entry.location[1] + entry.location[2]])
            try:
                obj = json.loads(decoded[1]) if decoded is not None else None
            except ValueError:
                obj = None
            problem = stored_message_problem(obj, entry.name)
            self.report.checked["messages"] += 1
            if problem:
                self._note(Finding(where, f"logged message {entry.name} {problem}", left))

    def _check_replay(self) -> None:
        """Journal segments (a line cut short by a crash is expected: the journal skips it) and
        the first layout's shards; nothing is missing when a shard or a segment is absent."""
        for entry in sorted(list_dir(self.files.replay)):
            path = self.files.replay / entry
            if SEGMENT.fullmatch(entry):
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    self._move(path, "is not a regular file")
                else:
                    self.report.checked["replay"] += 1
                continue
            if not SHARD.fullmatch(entry) or not path.is_dir() or path.is_symlink():
                self._move(path, "is not a replay journal segment or shard")
                continue
            for name in sorted(list_dir(path)):
                record = path / name
                if not HEX64.fullmatch(name) or not name.startswith(entry):
                    self._move(record, "does not belong in this replay shard")
                else:
                    self._checked(record, partial(replay_problem, record), "replay")

    def _check_dedup_table(self) -> None:
        """SQLite's quick check of the dedup table. A damaged table is reported, never moved:
        a running relay holds it open, and without it a resent packet would be stored again."""
        problem = self.files.dedup.problem()
        if problem is not None:
            self._note(Finding(self.quarantine.relative(self.files.dedup.path),
                               f"dedup table fails SQLite's quick check: {problem}",
                               "left in place: stop the relay, then restore it from a backup or remove it "
                               "(resent packets are then stored once more until their expiry)"))

    def _check_tmp(self, folder: Path) -> None:
        limit = self.now - self.min_tmp_age
        for entry in sorted(list_dir(folder)):
            path = folder / entry
            try:
                if os.lstat(path).st_mtime >= limit:
                    continue  # may be a write in progress
            except FileNotFoundError:
                continue
            self._move(path, "leftover of an interrupted write")
