"""`msgrelay-admin queue list` and `queue retry-now DEST`: the federation outbox.

The queue files are the truth (one file per packet, see msgrelay/federation/outbox.py); a
running relay adds its backoff state in `outbox/.status.json` and holds `outbox/.lock`,
which is how these commands tell a running relay from a stopped one.

`retry-now` on a running relay leaves a request file the relay looks at every second; on a
stopped relay it takes the lock and makes one delivery pass over that queue itself.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import click

from ..federation.factory import outbox_path
from ..federation.outbox import RETRY_FLAG, Outbox, OutboxBusy, escape_destination
from ..settings import SettingError, read_toml, resolve
from ..wire.addresses import is_server_name
from ..wire.dates import format_date
from .context import EXIT_USAGE, AdminContext, AdminFailure, common_options, describe_age, pass_admin


@click.group("queue")
@common_options
def queue() -> None:
    """Federation queues: packets waiting for other relays, and retrying one now."""


def _outbox(admin: AdminContext) -> Outbox:
    return Outbox(outbox_path(admin.require_state_dir()))


def _row(destination: str, entries: list[Any], state: Optional[dict[str, Any]], now: float) -> dict[str, Any]:
    live = [e for e in entries if now < e.expires]
    oldest = min((e.received for e in entries), default=None)
    row: dict[str, Any] = {
        "destination": destination, "queued": len(entries), "expired": len(entries) - len(live),
        "oldest_received": None if oldest is None else format_date(oldest),
        "oldest_age_seconds": None if oldest is None else max(0, int(now - oldest)),
    }
    if state is not None:
        for key in ("state", "backoff_seconds", "next_attempt", "pinned_ok", "failures", "last_error",
                    "delivered", "dropped"):
            row[key] = state.get(key)
    return row


def _describe(row: dict[str, Any], now: float) -> str:
    text = f"{row['destination']}  {row['queued']} queued"
    if row["oldest_age_seconds"] is not None:
        text += f", oldest {describe_age(row['oldest_age_seconds'])} old"
    if row["expired"]:
        text += f" ({row['expired']} expired, dropped at the next sweep)"
    if "state" in row:
        text += f"; {row['state']}"
        if row.get("next_attempt"):
            text += f", backoff {row['backoff_seconds']:.0f}s, next attempt in " \
                    f"{describe_age(row['next_attempt'] - now)}"
        if row.get("pinned_ok") is False:
            text += "; KEY DOES NOT MATCH THE PINNED FINGERPRINT"
        if row.get("last_error"):
            text += f"; last error: {row['last_error']}"
    return text


@queue.command("list")
@common_options
@pass_admin
def queue_list(admin: AdminContext) -> None:
    """Per destination: packets queued, the oldest one's age, and (running relay) backoff state."""
    outbox = _outbox(admin)
    now = time.time()
    if not outbox.root.is_dir():
        admin.emit({"running": None, "destinations": []},
                   [f"no federation outbox in {outbox.root}: nothing was ever forwarded"])
        return
    running = outbox.is_locked()
    status = (outbox.read_status() or {}) if running else {}
    states = status.get("destinations", {})
    found = outbox.load_all()
    names = sorted(set(found) | set(states))
    rows = [_row(name, found.get(name, []), states.get(name) if running else None, now) for name in names]
    head = (f"relay running (pid {status.get('pid', '?')}, federation {status.get('mode', '?')})" if running
            else "relay not running: queue files only (no backoff state)")
    lines = [head] + ([_describe(r, now) for r in rows] or ["no destinations"])
    admin.emit({"running": running, "pid": status.get("pid"), "destinations": rows}, lines)


@queue.command("retry-now")
@common_options
@click.argument("destination")
@click.option("--peer", "peers", multiple=True, metavar="NAME=URL[#FP]",
              help="Peer table entry, as given to twistd msgrelay --peer (stopped relay only).")
@click.option("--wait", type=click.IntRange(min=0), default=5, show_default=True, metavar="SECONDS",
              help="How long to wait for a running relay to take the request.")
@pass_admin
def retry_now(admin: AdminContext, destination: str, peers: tuple[str, ...], wait: int) -> None:
    """Retry DESTINATION now, forgetting its backoff (a stopped relay: deliver from here)."""
    destination = destination.lower()
    if not is_server_name(destination):
        raise AdminFailure(f"{destination!r} is not a server name", EXIT_USAGE)
    if peers:
        _use_peers(admin, peers)
    outbox = _outbox(admin)
    queued = len(outbox.entries(destination)) if outbox.root.is_dir() else 0
    if not queued:
        admin.emit({"destination": destination, "queued": 0}, [f"nothing is queued for {destination}"])
        return
    if outbox.is_locked():
        _ask_running_relay(admin, outbox, destination, queued, wait)
    else:
        _deliver_here(admin, destination, peers)


def _use_peers(admin: AdminContext, peers: tuple[str, ...]) -> None:
    """Resolve the settings as twistd does with these --peer options (they replace federation.peers)."""
    overrides: dict[str, Any] = {"federation.peers": list(peers)}
    if admin.state_dir is not None:
        overrides["server.state_dir"] = admin.state_dir
    try:
        admin._settings = resolve(read_toml(admin.config) if admin.config else {}, overrides)
    except SettingError as e:
        raise AdminFailure(str(e), EXIT_USAGE)


def _ask_running_relay(admin: AdminContext, outbox: Outbox, destination: str, queued: int, wait: int) -> None:
    outbox.request_retry(destination)
    flag = outbox.root / escape_destination(destination) / RETRY_FLAG
    deadline = time.monotonic() + wait
    while flag.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    taken = not flag.exists()
    line = (f"the running relay is retrying {destination} now ({queued} queued); see `queue list`" if taken
            else f"asked the running relay to retry {destination}; it has not taken the request yet ({flag})")
    admin.emit({"destination": destination, "queued": queued, "running": True, "taken": taken}, [line])


def _deliver_here(admin: AdminContext, destination: str, peers: tuple[str, ...]) -> None:
    """One delivery pass with this process's reactor (the relay is stopped: nothing else delivers)."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from ..federation.factory import build_sender

    sender = build_sender(admin.settings, reactor)
    outcome: dict[str, Any] = {}

    def done(result: Any) -> None:
        outcome["result"] = result
        reactor.stop()

    def start() -> None:
        Deferred.fromCoroutine(sender.deliver_now(destination)).addBoth(done)

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]  # the real reactor takes it
    result = outcome.get("result")
    if isinstance(result, Exception) or hasattr(result, "value"):
        error = getattr(result, "value", result)
        if isinstance(error, OutboxBusy):
            raise AdminFailure(f"{error}: the relay started meanwhile; run the command again")
        raise AdminFailure(f"delivery to {destination} failed: {error}")
    details = result or {}
    line = (f"relay not running: delivered {details.get('delivered', 0)} and dropped {details.get('dropped', 0)} "
            f"packet(s) for {destination}; {details.get('queued', 0)} still queued")
    if details.get("last_error"):
        line += f" (last error: {details['last_error']})"
    admin.emit({"destination": destination, "running": False, **details}, [line])
    if details.get("queued"):
        click.get_current_context().exit(1)
