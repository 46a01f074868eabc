"""What the command line prints: one place for the wording people and scripts read."""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Optional, Sequence

import click

from .errors import EXIT_REFUSED, ClientError
from .sending import Delivery

_DURATION = re.compile(r"([0-9]+)[ \t]*([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u0080-\u009f\u202a-\u202e\u2066-\u2069]")


def parse_duration(text: str, allow_never: bool = False) -> int:
    """`90`, `45m`, `12h`, `30d`, `2w` -> seconds; `never` (or 0) -> 0 where allowed."""
    cleaned = text.strip().lower()
    if allow_never and cleaned in ("never", "0"):
        return 0
    match = _DURATION.fullmatch(cleaned)
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration like 90s, 45m, 12h, 30d or 2w" + (" (or never)" if allow_never else ""))
    return int(match.group(1)) * _UNITS[match.group(2)]


def safe(text: str) -> str:
    """Received text with terminal control characters made visible, so a message cannot
    rewrite the screen or fake other lines (newlines and tabs are kept)."""
    return _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def json_line(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def error_line(error: ClientError) -> str:
    return f"msgrelay-client: error: {error}"


def describe_record(record: dict[str, Any]) -> tuple[str, bool]:
    """A fetched message as (line, is_warning); warnings go to stderr."""
    if record["status"] != "ok":
        kept = f" (set aside in {record['kept']})" if record.get("kept") else ""
        return f"REJECTED message {record.get('id')}: {record.get('error')}{kept}", True
    when = f"[{record['date']}]"
    contact = record.get("contact")
    who = contact or f"{record['from']} (unknown sender, key fingerprint {record['fingerprint']})"
    kind = record["type"]
    if kind == "token_request":
        if record.get("new_contact"):
            return (
                f"{when} new contact {contact}: {record['from']} wrote to you and can be answered with "
                f"`send {contact} ...`; key fingerprint {record['fingerprint']} (compare it with them)",
                False,
            )
        return f"{when} {contact} sent an access token: you can write to them", False
    if kind == "file":
        return f"{when} {who} sent a file ({record['size']} bytes): {record['file']}", False
    text = safe(record["text"])
    claimed = f' (calls themself "{safe(record["name"])}")' if not contact and record.get("name") else ""
    gap = " [follows a message you have not received]" if record.get("gap") else ""
    return f"{when} {who}{claimed}: {text}{gap}", False


def describe_delivery(delivery: Delivery) -> str:
    entry = delivery.entry
    if delivery.status == "sent":
        expires = f", expires {delivery.expires}" if delivery.expires else ""
        return f"sent {entry.summary} (message id {delivery.message_id}{expires})"
    if delivery.status == "failed":
        hint = ""
        if getattr(delivery.error, "errno", None) == 120:
            hint = f"; ask {entry.contact} for a new invite, then: contact add {entry.contact} INVITE"
        return f"NOT DELIVERED: {entry.summary}: {delivery.error}{hint}"
    return (
        f"queued, not yet sent: {entry.summary} (packet {entry.packet_id}); it stays in the outbox "
        "and goes out, with the same packet id, on the next send or `outbox flush`"
    )


def table(rows: Sequence[Sequence[Optional[str]]], headers: Sequence[str]) -> str:
    cells = [list(headers)] + [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def lines(items: Iterable[str]) -> str:
    return "\n".join(items)


def out(text: str = "") -> None:
    click.echo(text)


def warn(text: str) -> None:
    click.echo(text, err=True)


def report_deliveries(deliveries: list[Delivery], mine: Optional[Delivery] = None) -> int:
    """Print what a flush did; the exit code is that of `mine` (else of the worst packet)."""
    for delivery in deliveries:
        (out if delivery.status == "sent" else warn)(describe_delivery(delivery))
    reasons = {str(d.error): d.error for d in deliveries if d.status == "pending" and d.error is not None}
    for error in reasons.values():
        warn(error_line(error))
    concerned = [mine] if mine is not None else deliveries
    if all(d.status == "sent" for d in concerned):
        return 0
    errors = [d.error for d in concerned if d.error is not None] or list(reasons.values())
    return errors[0].exit_code if errors else EXIT_REFUSED
