"""The store as the admin command sees it: the synchronous classes, no reactor.

Working on the synchronous `MaildirFiles` and `PostgresCore` directly means the commands run
on a stopped relay's state as well as beside a running one (every maildir write is atomic
and every user folder is locked for writes; PostgreSQL has transactions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Protocol

from ..settings import Settings
from ..store.interface import StoreUnavailable, TokenRecord, UserRecord
from ..store.maildir_files import FORMAT, MaildirFiles
from ..store.quarantine import Finding, FsckReport
from ..store.maildir_layout import MessageName, list_dir
from ..store.factory import maildir_root
from .context import AdminFailure


class AdminStore(Protocol):
    name: str
    where: str

    def stats(self, now: int) -> dict[str, Any]: ...
    def expire(self, now: int) -> dict[str, int]: ...
    def get_user(self, user_id: str) -> Optional[UserRecord]: ...
    def list_tokens(self, user_id: str) -> list[TokenRecord]: ...
    def usage(self, user_id: str, now: int) -> dict[str, Any]: ...
    def delete_user(self, user_id: str) -> bool: ...
    def close(self) -> None: ...


class MaildirAdmin:
    name = "maildir"

    def __init__(self, root: Path, writable: bool):
        self.where = str(root.resolve())
        self.root = root
        if writable:
            self.files = MaildirFiles.open(root)
        else:
            self._check_format(root)
            self.files = MaildirFiles(root)  # read-only: do not create or probe anything

    @staticmethod
    def _check_format(root: Path) -> None:
        try:
            found = (root / "FORMAT").read_text("utf-8")
        except FileNotFoundError:
            raise AdminFailure(f"{root} holds no maildir store yet (no FORMAT file); run fsck if it should")
        except (OSError, UnicodeDecodeError) as e:
            raise AdminFailure(f"{root}/FORMAT is unreadable: {e}")
        if found != FORMAT:
            raise AdminFailure(f"{root} is not a {FORMAT.strip()} store (FORMAT says {found.strip()!r})")

    def stats(self, now: int) -> dict[str, Any]:
        return self.files.stats(now)

    def expire(self, now: int) -> dict[str, int]:
        return {"messages": self.files.expire(now)}

    def get_user(self, user_id: str) -> Optional[UserRecord]:
        return self.files.get_user(user_id)

    def list_tokens(self, user_id: str) -> list[TokenRecord]:
        return self.files.list_tokens(user_id)

    def usage(self, user_id: str, now: int) -> dict[str, Any]:
        """Pending unexpired messages, bytes and oldest, from file names alone."""
        names = [MessageName.parse(n) for n in list_dir(self.files.users / user_id / "new")]
        live = [n for n in names if n is not None and n.is_live(now)]
        return {
            "messages": len(live),
            "bytes": sum(n.size for n in live),
            "oldest_received": min((n.received for n in live), default=None),
        }

    def delete_user(self, user_id: str) -> bool:
        return self.files.delete_user(user_id)

    def close(self) -> None:
        self.files.dedup.close()  # the last connection out folds SQLite's -wal file back in


class PostgresAdmin:
    name = "postgresql"

    def __init__(self, dsn: str):
        from ..store.postgres import PostgresCore

        try:
            self.core = PostgresCore(dsn, min_size=1, max_size=2)
        except ValueError as e:
            raise AdminFailure(f"store.postgres_dsn: {e}", 2)
        self.where = self.core.target
        self.core.open()  # applies pending migrations, as a starting relay would

    def _query(self, operation: str, sql: str, params: tuple) -> Any:
        return self.core._run(operation, lambda conn: conn.execute(sql, params).fetchone())

    def stats(self, now: int) -> dict[str, Any]:
        return self.core.stats(now)

    def expire(self, now: int) -> dict[str, int]:
        return self.core.expire_counts(now)

    def get_user(self, user_id: str) -> Optional[UserRecord]:
        return self.core.get_user(user_id)

    def list_tokens(self, user_id: str) -> list[TokenRecord]:
        return self.core.list_tokens(user_id)

    def usage(self, user_id: str, now: int) -> dict[str, Any]:
        row = self._query(
            "user usage",
            "SELECT count(*), coalesce(sum(size), 0), min(received) FROM messages"
            " WHERE user_id = %s AND expires > %s",
            (user_id, now),
        )
        return {"messages": int(row[0]), "bytes": int(row[1]),
                "oldest_received": None if row[2] is None else int(row[2])}

    def delete_user(self, user_id: str) -> bool:
        return self.core.delete_user(user_id)

    def fsck(self, now: float, dry_run: bool = False) -> FsckReport:
        """PostgreSQL keeps its own integrity: report the schema and rows awaiting expiry, and
        check each user's message counters (the quota reads them) against the user's rows,
        recounting those that drifted unless `dry_run`."""
        row = self._query(
            "fsck",
            "SELECT (SELECT count(*) FROM messages WHERE expires <= %s),"
            " (SELECT count(*) FROM tokens WHERE expires IS NOT NULL AND expires <= %s),"
            " (SELECT count(*) FROM dedup WHERE expires <= %s),"
            " (SELECT count(*) FROM replay WHERE until <= %s)",
            (int(now),) * 4,
        )
        report = FsckReport(checked={"schema_version": int(self.core.version or 0)})
        for table, count in zip(("messages", "tokens", "dedup", "replay"), row):
            if count:
                report.findings.append(Finding(
                    f"postgresql:{table}", f"{count} row(s) past expiry", "left for the expiry sweep", damage=False
                ))
        drifted = self.core.counter_mismatches()
        if drifted and not dry_run:
            self.core.recount([user_id for user_id, *_ in drifted])
        for user_id, messages, size, real_messages, real_size in drifted:
            report.findings.append(Finding(
                f"postgresql:users/{user_id}",
                f"counters say {messages} message(s), {size} bytes; the rows hold {real_messages}, {real_size}",
                "left as is (--dry-run)" if dry_run else "recounted from the rows",
            ))
        return report

    def close(self) -> None:
        self.core.close()


def open_admin_store(settings: Settings, writable: bool) -> AdminStore:
    """The configured store; a maildir must already exist (the admin never creates one)."""
    try:
        if settings.store.backend == "postgresql":
            return PostgresAdmin(settings.store.postgres_dsn)
        if not settings.state_dir.is_dir():
            raise AdminFailure(f"state directory {settings.state_dir} does not exist")
        return MaildirAdmin(maildir_root(settings), writable)
    except StoreUnavailable as e:
        raise AdminFailure(str(e))
