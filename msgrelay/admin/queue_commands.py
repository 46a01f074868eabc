"""`msgrelay-admin queue list` and `queue retry-now DEST`: the federation outbox.

A running relay holds `outbox/.lock` and answers on its control socket
(`<state_dir>/run/control.sock`, see msgrelay/control): these commands ask it, and get its
live state. A stopped relay's queues are read from the outbox files, backoff state included;
`retry-now` on a stopped relay runs the relay's own federation service for that one queue,
for one pass. Every answer says which of the two it did.

With the PostgreSQL store the outbox is in the database, shared by every relay process:
`list` reads it there (and adds the live state of this host's relay if it answers), and
`retry-now` clears the shared backoff, then asks this host's relay or, if none answers,
sends from here under the same claim every relay takes.
"""

from __future__ import annotations

import time
from typing import Any, Optional
from urllib.parse import quote

import click

from ..control.client import ControlClient, ControlUnavailable
from ..federation.outbox import FederationOutbox, OutboxBusy, OutboxUnavailable
from ..federation.outbox_interface import Outbox, QueueSummary
from ..settings import SettingError, read_toml, resolve
from ..wire.addresses import is_server_name
from ..wire.dates import format_date
from .context import EXIT_USAGE, AdminContext, AdminFailure, common_options, describe_age, pass_admin

STATE_KEYS = ("state", "backoff_seconds", "next_attempt", "pinned_ok", "failures", "last_error", "delivered", "dropped")


@click.group("queue")
@common_options
def queue() -> None:
    """Federation queues: packets waiting for other relays, and retrying one now."""


def _outbox(admin: AdminContext) -> FederationOutbox:
    # The factory (and the whole federation stack behind it) only when a queue command runs:
    # every msgrelay-admin command imports this module, and that stack is most of its start-up.
    from ..federation.factory import outbox_path

    return FederationOutbox(outbox_path(admin.require_state_dir()))


def _row(destination: str, entries: list[Any], state: Optional[dict[str, Any]], now: float) -> dict[str, Any]:
    live = [e for e in entries if now < e.expires]
    oldest = min((e.received for e in entries), default=None)
    row: dict[str, Any] = {
        "destination": destination, "queued": len(entries), "expired": len(entries) - len(live),
        "oldest_received": None if oldest is None else format_date(oldest),
        "oldest_age_seconds": None if oldest is None else max(0, int(now - oldest)),
    }
    if state is not None:
        row.update({key: state.get(key) for key in STATE_KEYS if key in state})
    return row


def _saved_state(outbox: FederationOutbox, destination: str, now: float) -> dict[str, Any]:
    """A stopped relay's queue state: the backoff it saved (failures, next attempt, last error)."""
    saved = outbox.load_backoff(destination)
    waiting = saved.next_attempt is not None and saved.next_attempt > now
    return {"state": "backing-off" if waiting else "idle", "failures": saved.attempts,
            "next_attempt": saved.next_attempt if waiting else None, "last_error": saved.last_error}


def _describe(row: dict[str, Any], now: float) -> str:
    text = f"{row['destination']}  {row['queued']} queued"
    if row["oldest_age_seconds"] is not None:
        text += f", oldest {describe_age(row['oldest_age_seconds'])} old"
    if row["expired"]:
        text += f" ({row['expired']} expired, dropped at their expiry time)"
    if "state" in row:
        text += f"; {row['state']}"
        if row.get("holder"):
            text += f" (by {row['holder']})"
        if row.get("failures"):
            text += f" after {row['failures']} failure(s)"
        if row.get("next_attempt"):
            text += f", next attempt in {describe_age(row['next_attempt'] - now)}"
        if row.get("pinned_ok") is False:
            text += "; KEY DOES NOT MATCH THE PINNED FINGERPRINT"
        if row.get("last_error"):
            text += f"; last error: {row['last_error']}"
    return text


def _control(admin: AdminContext) -> ControlClient:
    return ControlClient(admin.settings.state_dir)


@queue.command("list")
@common_options
@pass_admin
def queue_list(admin: AdminContext) -> None:
    """Per destination: packets queued, the oldest one's age, and the backoff state."""
    if _shared(admin):
        _list_shared(admin)
        return
    outbox = _outbox(admin)
    now = time.time()
    if not outbox.root.is_dir():
        admin.emit({"running": None, "source": "files", "destinations": []},
                   [f"no federation outbox in {outbox.root}: nothing was ever forwarded"])
        return
    running = outbox.is_locked()
    live: Optional[dict[str, Any]] = None
    problem = ""
    if running:
        try:
            live = _control(admin).call("GET", "/v1/queues")
        except ControlUnavailable as e:
            problem = str(e)
    found = outbox.load_all()
    if live is not None:
        states = live.get("destinations", {})
        names = sorted(set(found) | set(states))
        rows = [_row(name, found.get(name, []), states.get(name), now) for name in names]
        head = (f"relay running (pid {live.get('pid', '?')}, federation {live.get('mode', '?')}): "
                "live state from its control socket")
    else:
        rows = [_row(name, entries, _saved_state(outbox, name, now), now) for name, entries in sorted(found.items())]
        head = (f"relay running, but its control socket does not answer ({problem}): read from the outbox files"
                if running else "relay not running: read from the outbox files (backoff as last saved)")
    lines = [head] + ([_describe(r, now) for r in rows] or ["no destinations"])
    admin.emit({"running": running, "source": "control-socket" if live is not None else "files",
                "pid": live.get("pid") if live else None, "destinations": rows}, lines)


@queue.command("retry-now")
@common_options
@click.argument("destination")
@click.option("--peer", "peers", multiple=True, metavar="NAME=URL[#FP]",
              help="Peer table entry, as given to twistd msgrelay --peer (stopped relay only).")
@pass_admin
def retry_now(admin: AdminContext, destination: str, peers: tuple[str, ...]) -> None:
    """Retry DESTINATION now, forgetting its backoff (a stopped relay: deliver from here)."""
    destination = destination.lower()
    if not is_server_name(destination):
        raise AdminFailure(f"{destination!r} is not a server name", EXIT_USAGE)
    if peers:
        _use_peers(admin, peers)
    if _shared(admin):
        _retry_shared(admin, destination)
        return
    outbox = _outbox(admin)
    queued = len(outbox.entries(destination)) if outbox.root.is_dir() else 0
    if not queued:
        admin.emit({"destination": destination, "queued": 0}, [f"nothing is queued for {destination}"])
        return
    if outbox.is_locked():
        _ask_running_relay(admin, destination)
    else:
        _deliver_here(admin, destination)


def _use_peers(admin: AdminContext, peers: tuple[str, ...]) -> None:
    """Resolve the settings as twistd does with these --peer options (they replace federation.peers)."""
    overrides: dict[str, Any] = {"federation.peers": list(peers)}
    if admin.state_dir is not None:
        overrides["server.state_dir"] = admin.state_dir
    try:
        admin._settings = resolve(read_toml(admin.config) if admin.config else {}, overrides)
    except SettingError as e:
        raise AdminFailure(str(e), EXIT_USAGE)


def _ask_running_relay(admin: AdminContext, destination: str) -> None:
    try:
        answer = _control(admin).call("POST", f"/v1/queues/{quote(destination, safe='')}/retry")
    except ControlUnavailable as e:
        raise AdminFailure(f"the relay is running (it holds the outbox lock) but its control socket does not "
                           f"answer: {e}; it retries {destination} at its next scheduled attempt")
    queued = answer.get("queued", 0)
    line = (f"the running relay is retrying {destination} now ({queued} queued); see `queue list`"
            if answer.get("retrying") else f"the running relay has nothing queued for {destination}")
    admin.emit({"destination": destination, "queued": queued, "running": True,
                "retrying": bool(answer.get("retrying"))}, [line])


def _shared(admin: AdminContext) -> bool:
    return admin.settings.store.backend == "postgresql"


def _open_shared(admin: AdminContext) -> Outbox:
    from ..federation.factory import open_outbox

    try:
        return open_outbox(admin.settings)
    except OutboxUnavailable as e:
        raise AdminFailure(f"federation outbox: {e}")


def _live_states(admin: AdminContext) -> Optional[dict[str, Any]]:
    """This host's relay's live queue state, if it answers on its control socket."""
    try:
        return _control(admin).call("GET", "/v1/queues")
    except ControlUnavailable:
        return None


def _shared_row(summary: QueueSummary, live: Optional[dict[str, Any]], now: float) -> dict[str, Any]:
    backoff = summary.backoff
    waiting = backoff.next_attempt is not None and backoff.next_attempt > now
    oldest = summary.oldest_received
    row: dict[str, Any] = {
        "destination": summary.destination, "queued": summary.queued, "expired": summary.expired,
        "oldest_received": None if oldest is None else format_date(oldest),
        "oldest_age_seconds": None if oldest is None else max(0, int(now - oldest)),
        "state": "sending" if summary.holder else "backing-off" if waiting else "idle",
        "holder": summary.holder, "failures": backoff.attempts,
        "next_attempt": backoff.next_attempt if waiting else None, "last_error": backoff.last_error,
    }
    if live is not None:
        row.update({key: live[key] for key in ("pinned_ok", "delivered", "dropped") if key in live})
        if str(live.get("state", "")).startswith("held"):
            row["state"] = live["state"]
    return row


def _list_shared(admin: AdminContext) -> None:
    outbox = _open_shared(admin)
    now = time.time()
    try:
        found = outbox.summary(now)
    except OutboxUnavailable as e:
        raise AdminFailure(f"federation outbox: {e}")
    finally:
        outbox.close()
    live = _live_states(admin)
    states = (live or {}).get("destinations", {})
    rows = [_shared_row(s, states.get(s.destination), now) for s in found]
    head = "outbox in PostgreSQL, shared by every relay process on the database: read from the database"
    if live is not None:
        head += f"; live state added from this host's relay (pid {live.get('pid', '?')})"
    lines = [head] + ([_describe(r, now) for r in rows] or ["no destinations"])
    admin.emit({"running": live is not None, "source": "database", "pid": live.get("pid") if live else None,
                "destinations": rows}, lines)


def _retry_shared(admin: AdminContext, destination: str) -> None:
    """Clear the shared backoff: every relay on the database may send at once (they find it at
    their next poll); this host's relay is asked to start now, or, if none answers, send here."""
    outbox = _open_shared(admin)
    try:
        queued = len(outbox.entries(destination))
        if queued:
            outbox.clear_backoff(destination)
    except OutboxUnavailable as e:
        raise AdminFailure(f"federation outbox: {e}")
    finally:
        outbox.close()
    if not queued:
        admin.emit({"destination": destination, "queued": 0}, [f"nothing is queued for {destination}"])
        return
    try:
        _control(admin).call("POST", f"/v1/queues/{quote(destination, safe='')}/retry")
    except ControlUnavailable:
        _deliver_here(admin, destination, "no relay answers on this host's control socket")
        return
    admin.emit({"destination": destination, "queued": queued, "running": True, "retrying": True},
               [f"the running relay is retrying {destination} now ({queued} queued; the backoff is cleared "
                "for every relay on the database); see `queue list`"])


def _deliver_here(admin: AdminContext, destination: str, why: str = "relay not running") -> None:
    """One sending pass over one queue, by the relay's own federation service run here."""
    from twisted.internet import reactor as default_reactor
    from twisted.internet.defer import Deferred, maybeDeferred

    reactor: Any = default_reactor

    from ..federation.factory import build_sender

    outcome: dict[str, Any] = {}

    async def one_pass() -> dict[str, Any]:
        federation = build_sender(admin.settings, reactor, only=destination)
        federation.startService()
        try:
            assert federation.ready is not None
            await federation.ready
            if destination in federation.queues:
                queue = federation.queues[destination]
                await queue.retry_now()
                details = queue.details()
            else:
                details = {"queued": 0}
            return details
        finally:
            await maybeDeferred(federation.stopService)

    def done(result: Any) -> None:
        outcome["result"] = result
        reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(one_pass()).addBoth(done))
    reactor.run(installSignalHandlers=False)
    result = outcome.get("result")
    error = getattr(result, "value", None)
    if isinstance(error, OutboxBusy):
        raise AdminFailure(f"{error}: the relay started meanwhile; run the command again")
    if error is not None:
        raise AdminFailure(f"delivery to {destination} failed: {error}")
    details = result or {}
    line = (f"{why}: delivered {details.get('delivered', 0)} and dropped {details.get('dropped', 0)} "
            f"packet(s) for {destination} from here; {details.get('queued', 0)} still queued")
    if details.get("queued") and details.get("last_error"):
        line += f" (last error: {details['last_error']})"
    admin.emit({"destination": destination, "running": False, **details}, [line])
    if details.get("queued"):
        click.get_current_context().exit(1)

