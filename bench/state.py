"""The bench's relay state, seeded offline through the store classes: users, tokens and
mailboxes that already hold thousands of messages (written without fsync: only the bench's
set-up, never a relay, writes this way).

All users share one RSA key (a relay never checks that a user id derives from its key when
serving; only `fsck` does), so thousands of users cost no key generation.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Sequence
from pathlib import Path

from msgrelay.store.interface import NewMessage, TokenRecord, UserRecord

NEVER_EXPIRES_FOR_BENCH = 30 * 86400


def fake_user_id(label: str) -> str:
    return base64.b32encode(hashlib.sha256(label.encode()).digest()[:20]).decode().lower()


def token_for(user_id: str) -> tuple[str, TokenRecord]:
    secret = "bench-token-" + user_id
    digest = hashlib.sha256(secret.encode()).hexdigest()
    return secret, TokenRecord(digest[:16], digest, "bench", int(time.time()), None)


@dataclass
class Seeded:
    user_id: str
    token: str


def stored_message(token_id: str, size: int, now: int) -> NewMessage:
    data = base64.b64encode(os.urandom(size * 3 // 4)).decode()
    password = base64.b64encode(os.urandom(384)).decode()
    return NewMessage(token_id, data, "AES-256-GCM", password, None, now, now + NEVER_EXPIRES_FOR_BENCH)


class Seeder:
    """Users and tokens through a synchronous store (MaildirFiles or PostgresCore)."""

    store: object

    def add_user(self, label: str, key_pem: str) -> Seeded:
        user_id = fake_user_id(label)
        self.store.add_user(UserRecord(user_id, key_pem, None, int(time.time())))  # type: ignore[attr-defined]
        secret, record = token_for(user_id)
        self.store.add_token(user_id, record)  # type: ignore[attr-defined]
        return Seeded(user_id, secret)


def logs_messages(overrides: Sequence[str]) -> bool:
    """Whether the relay's maildir keeps messages in logs (the default), given the --set's."""
    for override in overrides:
        dotted, value = override.split("=", 1)
        if dotted.strip() == "store.maildir_messages":
            return json.loads(value) == "log"
    return True


class MaildirSeeder(Seeder):
    def __init__(self, root: Path, overrides: Sequence[str] = ()):
        from msgrelay.store.maildir_files import MaildirFiles

        self.store = self.files = MaildirFiles.open(root)
        self.log = logs_messages(overrides)

    def fill(self, user_id: str, count: int, size: int) -> None:
        """`count` messages as the relay would have stored them: in the user's log (segments
        of maildir_log.SEGMENT_BYTES), or a file each."""
        from msgrelay.store import maildir_log, maildir_records as records
        from msgrelay.store.maildir_layout import MessageName

        now = int(time.time())
        udir = self.files.users / user_id
        base = time.time_ns() - 10**12  # older than anything the relay will add
        message = stored_message(token_for(user_id)[1].id, size, now)
        body = records.encode(records.message_json(message))
        segment, written, log = 0, maildir_log.SEGMENT_BYTES, None
        for i in range(count):
            name = MessageName(base + i, os.urandom(4).hex(), now, message.expires, message.size)
            if not self.log:
                fd = os.open(udir / "new" / str(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, body)
                os.close(fd)
                continue
            record = maildir_log.message_record(str(name), os.urandom(32).hex(), body)
            if written + len(record) > maildir_log.SEGMENT_BYTES:
                if log is not None:
                    os.close(log)
                segment, written = segment + 1, 0
                log = os.open(maildir_log.create_segment(udir, segment), os.O_WRONLY | os.O_APPEND)
            os.write(log, record)  # type: ignore[arg-type]
            written += len(record)
        if log is not None:
            os.close(log)
        try:
            from msgrelay.store.maildir_index import note_change
        except ImportError:  # a store without indexes
            return
        note_change(self.files.users / user_id)

    def close(self) -> None:
        pass


class PostgresSeeder(Seeder):
    def __init__(self, dsn: str):
        from msgrelay.store.postgres import PostgresCore

        self.store = self.core = PostgresCore(dsn, min_size=1, max_size=2)
        self.core.open()
        self.core._run("wipe", lambda conn: conn.execute("TRUNCATE users, replay, health CASCADE"))

    def fill(self, user_id: str, count: int, size: int) -> None:
        now = int(time.time())
        message = stored_message(token_for(user_id)[1].id, size, now)
        row = (user_id, message.token_id, message.data.encode(), message.algorithm, message.password.encode(),
               message.received, message.expires, message.size)

        def work(conn) -> None:
            with conn.cursor().copy(
                "COPY messages (user_id, token_id, data, algorithm, password, received, expires, size) FROM STDIN"
            ) as copy:
                for _ in range(count):
                    copy.write_row(row)
            # As the store's own inserts do: the per-user counters in the same transaction.
            conn.execute("UPDATE users SET pending_messages = pending_messages + %s,"
                         " pending_bytes = pending_bytes + %s WHERE user_id = %s",
                         (count, count * message.size, user_id))

        self.core._run("fill", work)

    def close(self) -> None:
        # Statistics for the state just seeded, as autovacuum would gather within a minute of
        # so large a change on an operator's database. Without them the planner kept those of
        # the previous run's state, and counted a fetch's expired messages by reading the whole
        # 10,000-message mailbox's index (1.4 ms a fetch against 0.2 for 100 messages).
        self.core._run("analyze", lambda conn: conn.execute("ANALYZE users, messages"))
        self.core.close()


#: The bench relays' metrics token (loopback only; never an operator's).
METRICS_TOKEN = "bench-metrics-token"


def relay_config(path: Path, backend: str, dsn: str, overrides: Sequence[str] = ()) -> None:
    """No rate limits, room for the big mailboxes, /metrics on the relay's port with the
    bench's token; everything else as shipped, or as
    `overrides` ("section.name=TOML value", the bench's --set) say."""
    sections: dict[str, dict[str, str]] = {
        "store": {"backend": json.dumps(backend), **({"postgres_dsn": json.dumps(dsn)} if backend == "postgresql" else {})},
        "limits": {"quota_messages": "10000000", "quota_bytes": "100000000000"},
        "rate_limits": {name: '"off"' for name in ("register_per_address", "send_per_address", "fetch_per_user",
                                                   "token_per_user")} | {"exempt": '["127.0.0.1"]'},
        # /metrics on the relay's port, read between scenarios; the store gauges refreshed once,
        # at start (Relay waits for it), never by a scrape inside a measured window.
        "metrics": {"token": json.dumps(METRICS_TOKEN), "stats_interval": "100000000"},
    }
    for override in overrides:
        dotted, value = override.split("=", 1)
        section, name = dotted.strip().rsplit(".", 1)
        sections.setdefault(section, {})[name] = value.strip()
    path.write_text("".join(f"[{section}]\n" + "".join(f"{name} = {value}\n" for name, value in values.items())
                            for section, values in sections.items()))
