"""`msgrelay-admin rotate-key`, `retire-key`, `keep-key` and `keys`: the server key and its predecessors.

A running relay is told over its control socket to read the key files again, so a rotation
takes effect at once; failing that, it notices within `server.key_check_interval` seconds.
None of these needs a restart.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import click

from cryptography.hazmat.primitives.asymmetric import rsa

from ..keyrotation import destroy_retired, key_is_external, list_retired, previous_keys_dir, retire_file, rotate
from ..keytransitions import load_transitions, transitions_path
from ..serverkey import ServerKeyError, read_private_key
from ..wire.dates import format_date
from ..wire.errors import ProtocolError
from ..wire.keys import fingerprint, load_public_key
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
    if previous is not None:
        lines.append(f"key transition {done.old_fingerprint} -> {done.new_fingerprint} signed by the previous key, "
                     f"listed in /api/v1/server for {describe_age(admin.settings.server.key_transition_keep)}: "
                     "clients and peers pinned to it follow the rotation")
    told, line = _tell_relay(admin)
    lines.append(line)
    admin.emit({"fingerprint": done.new_fingerprint, "previous": previous, **told}, lines)


@click.command("keep-key")
@common_options
@click.argument("key_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--grace-period", metavar="DURATION", help=GRACE_HELP)
@click.option("--successor", metavar="PEM_FILE", type=click.Path(dir_okay=False, path_type=Path),
              help="The key that replaces KEY_FILE (public or private PEM): write the key transition to it.")
@pass_admin
def keep_key(admin: AdminContext, key_file: Path, grace_period: Optional[str], successor: Optional[Path]) -> None:
    """Keep KEY_FILE accepted for the grace period after it stops being the current key.

    For a server.key_file managed outside the state directory: run this on the current key
    (with --successor NEW_KEY so that pinned clients and peers follow), then install the new
    key at server.key_file.
    """
    settings = admin.require_owner()
    grace = _grace(admin, grace_period)
    next_key = None if successor is None else _public_key_of(successor)
    try:
        entry = retire_file(settings, key_file, grace, time.time(), next_key)
    except ServerKeyError as e:
        raise AdminFailure(str(e))
    until = format_date(entry.until)
    lines = [f"key {entry.fingerprint} stays accepted until {until} once it is replaced"]
    if next_key is not None:
        lines.append(f"key transition {entry.fingerprint} -> {fingerprint(next_key)} signed by it")
    told, line = _tell_relay(admin)
    admin.emit({"fingerprint": entry.fingerprint, "until": until,
                "successor": None if next_key is None else fingerprint(next_key), **told}, lines + [line])


def _public_key_of(path: Path) -> rsa.RSAPublicKey:
    try:
        text = path.read_text("ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise AdminFailure(f"{path}: cannot read the successor key: {e}")
    if "PRIVATE KEY" in text:
        return read_private_key(path).public_key()
    try:
        return load_public_key(text, str(path))
    except ProtocolError as e:
        raise AdminFailure(e.message)


@click.command("retire-key")
@common_options
@click.argument("fingerprint_arg", metavar="[FINGERPRINT]", required=False)
@click.option("--before-grace-period-ends", "force", is_flag=True,
              help="Also destroy keys still inside their grace period: envelopes sealed to them fail from now on.")
@pass_admin
def retire_key(admin: AdminContext, fingerprint_arg: Optional[str], force: bool) -> None:
    """Destroy retired private keys whose grace period is over (or only FINGERPRINT).

    The key transitions they signed stay listed in /api/v1/server: clients and peers pinned
    to a destroyed key still follow the chain. A running relay also destroys them by itself
    within server.key_check_interval of the end of the grace period.
    """
    settings = admin.require_owner()
    wanted = fingerprint_arg.lower().replace(":", "") if fingerprint_arg else None
    now = time.time()
    destroyed, kept = destroy_retired(settings, now, wanted, force)
    if wanted is not None and not destroyed and not kept:
        raise AdminFailure(f"no retired key {wanted} in {previous_keys_dir(settings)}")
    lines = [f"destroyed retired private key {e.fingerprint}" + ("" if e.until <= now else " before its grace period ended")
             for e in destroyed] or ["no retired private key to destroy"]
    lines += [f"kept {e.fingerprint}: still accepted until {format_date(e.until)} "
              f"({describe_age(e.until - now)} left); --before-grace-period-ends destroys it now" for e in kept]
    admin.emit({"destroyed": [e.fingerprint for e in destroyed],
                "kept": [{"fingerprint": e.fingerprint, "until": format_date(e.until)} for e in kept]}, lines)
    if wanted is not None and kept:
        raise AdminFailure(f"refusing to destroy {wanted} inside its grace period without --before-grace-period-ends")


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
    for p, entry in zip(previous, retired):
        state = "expired, awaiting removal" if p["expired"] else f"{describe_age(entry.until - now)} left"
        lines.append(f"previous key {p['fingerprint']}  until {p['until']}  ({state})")
    if not previous:
        lines.append("no previous keys")
    transitions = [e.to_json() for e in load_transitions(transitions_path(settings))]
    lines += [f"transition   {t['from']} -> {t['to']}  {t['date']}" for t in transitions]
    admin.emit({"current": current, "key_file": str(key_path), "previous": previous,
                "transitions": [{k: t[k] for k in ("from", "to", "date")} for t in transitions]}, lines)
