"""`msgrelay-admin`: operator commands on a relay's state directory or config.

Works on a stopped relay and beside a running one (docs/admin.md says why that is safe).
Human output by default, `--json` for scripts; exit codes 0 ok, 1 damage found or the
operation failed, 2 usage or configuration error. Expected failures print one line.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

import click

from .. import __version__
from ..keyrotation import previous_keys_dir, prune
from ..serverkey import ServerKeyError
from ..store.interface import StoreUnavailable
from ..store.maildir_fsck import MIN_TMP_AGE, FsckAbort, MaildirFsck
from ..store.quarantine import FsckReport, Quarantine
from ..wire.dates import format_date
from ..wire.keys import is_user_id
from ..store.factory import maildir_root
from .backends import AdminStore, PostgresAdmin, open_admin_store
from .context import EXIT_USAGE, AdminContext, AdminFailure, common_options, describe_age, pass_admin
from .config_commands import config
from .key_commands import keep_key, keys, retire_key, rotate_key
from .key_fsck import check_key_files
from .queue_commands import queue


class AdminGroup(click.Group):
    """Turns the expected failures of any subcommand into one line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (StoreUnavailable, ServerKeyError, FsckAbort) as e:
            raise AdminFailure(str(e))
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise AdminFailure(f"{where}{e.strerror or e}")


@click.group(cls=AdminGroup, context_settings={"help_option_names": ["-h", "--help"]})
@common_options
@click.version_option(__version__, prog_name="msgrelay-admin")
def main() -> None:
    """Administer a msgrelay relay: its store, its server key and (with federation) its queues.

    Give the relay's --config file and/or --state-dir, exactly as to twistd msgrelay.
    """


def _when(seconds: Optional[int], now: float) -> tuple[Optional[str], str]:
    if seconds is None:
        return None, "none"
    return format_date(seconds), f"{format_date(seconds)} ({describe_age(now - seconds)} ago)"


def _with_store(admin: AdminContext, writable: bool) -> AdminStore:
    if admin.settings.store.backend == "maildir" and writable:
        admin.require_owner()
    elif admin.settings.store.backend == "maildir":
        admin.require_state_dir()
    return open_admin_store(admin.settings, writable)


def _outbox_queues(admin: AdminContext, now: float) -> list[dict[str, Any]]:
    """Per-destination federation queues, counted as `queue list` counts them."""
    from ..federation.factory import open_outbox, outbox_path
    from ..federation.outbox import FederationOutbox, OutboxUnavailable
    from ..federation.outbox_interface import Outbox

    try:  # with the PostgreSQL store the outbox is in the database too
        outbox: Outbox = (open_outbox(admin.settings) if admin.settings.store.backend == "postgresql"
                          else FederationOutbox(outbox_path(admin.settings)))
        try:
            found = outbox.summary(now)
        finally:
            outbox.close()
    except OutboxUnavailable as e:
        raise AdminFailure(f"federation outbox: {e}")
    return [{"destination": q.destination, "queued": q.queued, "expired": q.expired,
             "oldest_received": None if q.oldest_received is None else format_date(q.oldest_received)}
            for q in found]


@main.command()
@common_options
@pass_admin
def stats(admin: AdminContext) -> None:
    """Users, pending messages and bytes, the oldest message, federation queues."""
    store = _with_store(admin, writable=False)
    now = time.time()
    try:
        counts = store.stats(int(now))
    finally:
        store.close()
    oldest, oldest_text = _when(counts["oldest_received"], now)
    data: dict[str, Any] = {
        "backend": store.name, "store": store.where, "users": counts["users"],
        "messages": counts["messages"], "bytes": counts["bytes"], "oldest_received": oldest,
    }
    lines = [
        f"store           {store.name} ({store.where})",
        f"users           {counts['users']}",
        f"messages        {counts['messages']} pending, {counts['bytes']} bytes",
        f"oldest message  {oldest_text}",
    ]
    data["queues"] = queues = _outbox_queues(admin, now)
    lines.append("federation queues" + ("" if queues else "  none"))
    for q in queues:
        oldest = f", oldest {q['oldest_received']}" if q["oldest_received"] else ""
        expired = f" ({q['expired']} expired, not yet dropped)" if q["expired"] else ""
        lines.append(f"  {q['destination']}  {q['queued']} queued{oldest}{expired}")
    admin.emit(data, lines)


@main.command()
@common_options
@pass_admin
def expire(admin: AdminContext) -> None:
    """Reclaim expired messages, tokens, dedup and replay records and server keys now."""
    store = _with_store(admin, writable=True)
    now = time.time()
    try:
        counts = store.expire(int(now))
    finally:
        store.close()
    removed = []
    if admin.settings.state_dir.is_dir():
        removed = [e.fingerprint for e in prune(previous_keys_dir(admin.settings), now)]
    details = ", ".join(f"{n} {what}" for what, n in counts.items() if what != "messages")
    lines = [f"expired {counts['messages']} message(s)" + (f" ({details})" if details else "")]
    lines += [f"removed retired server key {fp}: its grace period is over" for fp in removed]
    admin.emit({"expired": counts, "removed_keys": removed}, lines)


@main.command()
@common_options
@click.option("--dry-run", is_flag=True, help="Only report; change nothing.")
@click.option("--min-tmp-age", type=click.IntRange(min=0), default=int(MIN_TMP_AGE), show_default=True,
              metavar="SECONDS", help="Temporary files younger than this are a write in progress, left alone.")
@pass_admin
def fsck(admin: AdminContext, dry_run: bool, min_tmp_age: int) -> None:
    """Check the store and key files; move damaged entries to quarantine/ (exit 1 if any)."""
    settings = admin.require_state_dir() if dry_run else admin.require_owner()
    now = time.time()
    quarantine = Quarantine(settings.state_dir, dry_run, now)
    if settings.store.backend == "maildir":
        report = MaildirFsck(maildir_root(settings), now, dry_run, min_tmp_age, quarantine).run()
        initialized = True
    else:
        store = PostgresAdmin(settings.store.postgres_dsn)
        try:
            report = store.fsck(now, dry_run)
        finally:
            store.close()
        initialized = report.checked.get("schema_version", 0) > 0
    key_findings, key_files = check_key_files(settings, quarantine, now, min_tmp_age, initialized)
    report.findings += key_findings
    report.checked["key_files"] = key_files
    quarantine.write_report(report)
    _show_fsck(admin, report, dry_run)
    if report.damaged:
        click.get_current_context().exit(1)


def _show_fsck(admin: AdminContext, report: FsckReport, dry_run: bool) -> None:
    checked = ", ".join(f"{what.replace('_', ' ')} {n}" for what, n in report.checked.items())
    lines = [f"checked: {checked}"]
    for f in report.findings:
        lines.append(f"{'DAMAGE' if f.damage else 'note  '} {f.path}: {f.problem} -> {f.action}")
    damaged = sum(f.damage for f in report.findings)
    if not damaged:
        lines.append("no damage found")
    elif dry_run:
        lines.append(f"damage found: {damaged} problem(s); nothing changed (--dry-run)")
    elif report.quarantine:
        lines.append(f"damage found: {damaged} problem(s); damaged entries moved to {report.quarantine} "
                     "(see fsck-report.json there)")
    else:
        lines.append(f"damage found: {damaged} problem(s)")
    admin.emit({**report.to_json(), "dry_run": dry_run}, lines)


@main.group()
@common_options
def user() -> None:
    """Look at or erase one user of this relay."""


def _check_user_id(user_id: str) -> None:
    if not is_user_id(user_id):
        raise AdminFailure(f"{user_id!r} is not a user id (32 characters a-z, 2-7)", EXIT_USAGE)


@user.command("show")
@common_options
@click.argument("user_id")
@pass_admin
def user_show(admin: AdminContext, user_id: str) -> None:
    """A user's registration, access tokens (never their secrets) and pending messages."""
    _check_user_id(user_id)
    store = _with_store(admin, writable=False)
    now = time.time()
    try:
        record = store.get_user(user_id)
        if record is None:
            raise AdminFailure(f"no user {user_id} on this relay")
        tokens = store.list_tokens(user_id)
        usage = store.usage(user_id, int(now))
    finally:
        store.close()
    oldest, oldest_text = _when(usage["oldest_received"], now)
    token_list = [{**t.to_json(), "valid": t.is_valid(now)} for t in tokens]
    data = {
        "user_id": record.user_id, "created": format_date(record.created), "push_endpoint": record.push_endpoint,
        "key": record.key_pem, "tokens": token_list,
        "messages": usage["messages"], "bytes": usage["bytes"], "oldest_received": oldest,
    }
    lines = [
        f"user            {record.user_id}",
        f"registered      {format_date(record.created)}",
        f"push endpoint   {record.push_endpoint or 'none'}",
        f"messages        {usage['messages']} pending, {usage['bytes']} bytes; oldest {oldest_text}",
        f"tokens          {len(tokens)}" + ("" if tokens else "  (nobody can write to this user)"),
    ]
    for t in token_list:
        state = "" if t["valid"] else "  EXPIRED"
        lines.append(f"  {t['id']}  created {t['created']}  expires {t['expires'] or 'never'}  "
                     f"label {t['label'] if t['label'] is not None else '-'}{state}")
    admin.emit(data, lines)


@user.command("delete")
@common_options
@click.argument("user_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (needed without a terminal).")
@pass_admin
def user_delete(admin: AdminContext, user_id: str, yes: bool) -> None:
    """Erase a user: key, tokens and pending messages, at once and for good."""
    _check_user_id(user_id)
    store = _with_store(admin, writable=True)
    try:
        usage = store.usage(user_id, int(time.time()))
        if store.get_user(user_id) is None:
            raise AdminFailure(f"no user {user_id} on this relay")
        if not yes:
            if not sys.stdin.isatty():
                raise AdminFailure("refusing to erase a user without --yes when not run from a terminal", EXIT_USAGE)
            click.confirm(f"Erase user {user_id} and its {usage['messages']} pending message(s)?", abort=True)
        deleted = store.delete_user(user_id)
    finally:
        store.close()
    if not deleted:
        raise AdminFailure(f"no user {user_id} on this relay (erased meanwhile)")
    admin.emit({"deleted": user_id, "messages": usage["messages"]},
               [f"erased user {user_id}: key, tokens and {usage['messages']} pending message(s)"])


main.add_command(rotate_key)
main.add_command(retire_key)
main.add_command(keep_key)
main.add_command(keys)
main.add_command(queue)
main.add_command(config)
