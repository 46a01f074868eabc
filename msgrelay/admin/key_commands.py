"""`msgrelay-admin rotate-key`, `retire-key` and `keys`: the relay's server key and its predecessors.

A running relay is told over its control socket to read the key files again, so a rotation
takes effect at once; failing that, it notices within `server.key_check_interval` seconds.
None of these needs a restart.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import click

from ..keyrotation import key_is_external, list_retired, previous_keys_dir, retire_file, rotate
from ..serverkey import ServerKeyError, read_private_key
from ..wire.dates import format_date
from ..wire.keys import fingerprint
from .context import AdminContext, AdminFailure, common_options, describe_age, parse_duration, pass_admin


def _grace(admin: AdminContext, given: Optional[str]) -> int:
    return admin.settings.server.key_grace_period if given is None else parse_duration(given)


def _tell_relay(admin: AdminContext) -> tuple[dict[str, Any], str]:
    """Tell a running relay to read its key files now; (JSON part, line saying what happened)."""
    from ..control.client import ControlClient, ControlUnavailable
    from ..federation.factory import outbox_path
    from ..federation.outbox import FederationOutbox

    settings = admin.settings
    # With the PostgreSQL store no file lock tells whether a relay runs here: ask the socket.
    shared = settings.store.backend == "postgresql"
    if not shared and not FederationOutbox(outbox_path(settings)).is_locked():
        return {"relay": "stopped"}, "relay not running: it uses these keys when it starts"
    try:
        answer = ControlClient(settings.state_dir).call("POST", "/v1/keys/reload")
    except ControlUnavailable as e:
        if shared:
            return ({"relay": "unknown", "told": False},
                    f"no relay answers on this host's control socket ({e}): a running one picks this up within "
                    f"{settings.server.key_check_interval}s (server.key_check_interval)")
        return ({"relay": "running", "told": False},
                f"relay running, but its control socket does not answer ({e}): it picks this up within "
                f"{settings.server.key_check_interval}s (server.key_check_interval)")
    return ({"relay": "running", "told": True, "relay_fingerprint": answer.get("fingerprint")},
            f"the running relay uses it now (told over its control socket; its key is {answer.get('fingerprint')})")


GRACE_HELP = "How long the old key stays accepted, e.g. 7d or 3600 [default: server.key_grace_period]."


@click.command("rotate-key")
@common_options
@click.option("--grace-period", metavar="DURATION", help=GRACE_HELP)
@pass_admin
def rotate_key(admin: AdminContext, grace_period: Optional[str]) -> None:
    """Make a new server key current; keep the old one accepted for the grace period."""
    settings = admin.require_owner()
    grace = _grace(admin, grace_period)
    now = time.time()
    try:
        done = rotate(settings, grace, now)
    except ServerKeyError as e:
        raise AdminFailure(str(e))
    previous = None if done.old_fingerprint is None else {
        "fingerprint": done.old_fingerprint, "until": format_date(done.until or 0),
    }
    lines = [f"new server key {done.new_fingerprint}"]
    if previous is None:
        lines.append("there was no key before: nothing retired")
    elif grace == 0:
        lines.append(f"previous key {done.old_fingerprint} refused at once (grace period 0) and removed")
    else:
        lines.append(f"previous key {done.old_fingerprint} accepted until {previous['until']} "
                     f"(grace period {describe_age(grace)})")
    told, line = _tell_relay(admin)
    lines.append(line)
    admin.emit({"fingerprint": done.new_fingerprint, "previous": previous, **told}, lines)


@click.command("retire-key")
@common_options
@click.argument("key_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--grace-period", metavar="DURATION", help=GRACE_HELP)
@pass_admin
def retire_key(admin: AdminContext, key_file: Path, grace_period: Optional[str]) -> None:
    """Keep KEY_FILE accepted for the grace period after it stops being the current key.

    For a server.key_file managed outside the state directory: run this on the current key,
    then install the new key at server.key_file.
    """
    settings = admin.require_owner()
    grace = _grace(admin, grace_period)
    try:
        entry = retire_file(settings, key_file, grace, time.time())
    except ServerKeyError as e:
        raise AdminFailure(str(e))
    until = format_date(entry.until)
    told, line = _tell_relay(admin)
    admin.emit(
        {"fingerprint": entry.fingerprint, "until": until, **told},
        [f"key {entry.fingerprint} stays accepted until {until} once it is replaced", line],
    )


@click.command("keys")
@common_options
@pass_admin
def keys(admin: AdminContext) -> None:
    """Show the current server key and the previous keys still accepted."""
    settings = admin.require_state_dir()
    now = time.time()
    key_path = settings.key_path()
    try:
        current: Optional[str] = fingerprint(read_private_key(key_path).public_key())
    except ServerKeyError as e:
        if key_path.exists():
            raise AdminFailure(str(e))
        current = None
    retired = list_retired(previous_keys_dir(settings))
    previous: list[dict[str, Any]] = [
        {"fingerprint": e.fingerprint, "until": format_date(e.until), "expired": e.until <= now} for e in retired
    ]
    lines = [f"current key  {current or '(none yet: created at first start)'}  {key_path}"
             + ("  (operator-managed)" if key_is_external(settings) else "")]
    for p, e in zip(previous, retired):
        state = "expired, awaiting removal" if p["expired"] else f"{describe_age(e.until - now)} left"
        lines.append(f"previous key {p['fingerprint']}  until {p['until']}  ({state})")
    if not previous:
        lines.append("no previous keys")
    admin.emit({"current": current, "key_file": str(key_path), "previous": previous}, lines)
