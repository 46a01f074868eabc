"""Commands that move messages: send, fetch and the outbox."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import click

from .cli_session import Job, Options, duration_option, pass_options
from .errors import EXIT_REJECTED, UsageError
from .outbox import Outbox
from .output import describe_record, json_line, out, report_deliveries, table, warn
from .receiving import fetch as fetch_messages
from .receiving import watch as watch_messages
from .sending import flush, send_file, send_text
from .session import Session


@click.command()
@click.argument("name")
@click.argument("text", required=False)
@click.option("--file", "file_path", type=click.Path(exists=True, dir_okay=False), help="Send a file (type 1).")
@click.option("--ttl", metavar="DURATION", help="How long the relay keeps it (default: the relay's).")
@pass_options
def send(opts: Options, name: str, text: Optional[str], file_path: Optional[str], ttl: Optional[str]) -> Job:
    """Send TEXT (or - for standard input) or --file PATH to a contact."""
    if (text is None) == (file_path is None):
        raise click.UsageError("give either TEXT or --file PATH")
    ttl_seconds = duration_option(ttl, allow_never=False)
    try:
        raw = Path(file_path).read_bytes() if file_path else None
    except OSError as e:
        raise UsageError(f"cannot read {file_path}: {e.strerror or e}")
    if text == "-":
        text = sys.stdin.read()

    async def body(session: Session) -> int:
        if raw is not None:
            outcome = await send_file(session, name, raw, ttl_seconds)
        else:
            outcome = await send_text(session, name, text or "", ttl_seconds)
        return report_deliveries(outcome.deliveries, outcome.delivery)

    return opts.session_job(body, connect=False)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message and line.")
@click.option("--watch", is_flag=True, help="Keep polling, with backoff while nothing arrives.")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Where received files go (default: <profile>/files).")
@click.option("--limit", type=click.IntRange(1, 1000), help="Messages per request.")
@click.option("--interval", type=click.FloatRange(0.1), default=2.0, show_default=True, help="--watch: shortest pause.")
@click.option("--max-interval", type=click.FloatRange(0.1), default=60.0, show_default=True, help="--watch: longest pause.")
@pass_options
def fetch(opts: Options, as_json: bool, watch: bool, output_dir: Optional[str], limit: Optional[int],
          interval: float, max_interval: float) -> Job:
    """Fetch, verify, store and acknowledge your messages, and print them."""
    output = Path(output_dir).resolve() if output_dir else None

    def show(records: list[dict[str, Any]]) -> bool:
        rejected = False
        for record in records:
            rejected |= record["status"] != "ok"
            if as_json:
                out(json_line(record))
            else:
                line, is_warning = describe_record(record)
                (warn if is_warning else out)(line)
        sys.stdout.flush()
        return rejected

    def trouble(error: Exception, wait: float) -> None:
        warn(f"{error}; trying again in {wait:g} s")

    async def body(session: Session) -> int:
        if watch:
            warn(f"watching for new messages: polling {session.api.url} every {interval:g} s, slowing down to "
                 f"every {max(interval, max_interval):g} s while nothing arrives; Ctrl-C stops")
            await watch_messages(session, show, trouble, output, interval, max(interval, max_interval))
            return 0
        records = await fetch_messages(session, output, limit)
        if not records and not as_json:
            out("no new messages")
        return EXIT_REJECTED if show(records) else 0

    return opts.session_job(body, connect=False)  # fetch connects itself; watch waits for the relay


@click.group()
def outbox() -> None:
    """Messages queued but not yet accepted by the relay."""


@outbox.command("list")
@pass_options
def outbox_list(opts: Options) -> None:
    """List queued packets (no network)."""
    profile = opts.profile()
    entries = Outbox(profile.folder("outbox"), profile.folder("outbox-failed")).pending()
    rows = [(e.packet_id, e.queued, e.summary) for e in entries]
    out(table(rows, ("PACKET", "QUEUED", "WHAT")) if rows else "outbox is empty")


@outbox.command("flush")
@pass_options
def outbox_flush(opts: Options) -> Job:
    """Send everything queued, each with its original packet id."""

    async def body(session: Session) -> int:
        deliveries = await flush(session)
        if not deliveries:
            out("outbox is empty")
        return report_deliveries(deliveries)

    return opts.session_job(body, connect=False)
