"""Commands about who may write to whom: tokens, invites and contacts."""

from __future__ import annotations

import time
from typing import Any, Optional

import click

from ..wire.dates import format_date
from .api import normalise_url
from .cli_session import Job, Options, duration_option, pass_options
from .errors import ClientError, RelayUnreachable, TrustError, UsageError
from .invite import format_invite, parse_invite
from .output import json_line, out, table
from .profile import check_contact_name, find_by_user_id, new_contact
from .session import Session


@click.group()
def token() -> None:
    """Access tokens: the capabilities others need to write to you."""


@token.command("new")
@click.option("--label", help="A note for yourself (who got it).")
@click.option("--expires", metavar="DURATION", help="e.g. 30d, 12h, or never (default: the relay's).")
@pass_options
def token_new(opts: Options, label: Optional[str], expires: Optional[str]) -> Job:
    """Mint a token and print it (shown once: the relay keeps only a hash)."""
    expires_in = duration_option(expires, allow_never=True)

    async def body(session: Session) -> None:
        minted = await session.api.create_token(label=label, expires_in=expires_in)
        out(f"token:    {minted['token']}")
        out(f"id:       {minted['id']}")
        out(f"expires:  {minted.get('expires') or 'never'}")

    return opts.session_job(body)


@token.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_options
def token_list(opts: Options, as_json: bool) -> Job:
    """List your tokens (ids and labels; the secrets are not kept)."""

    async def body(session: Session) -> None:
        tokens = await session.api.list_tokens()
        if as_json:
            for t in tokens:
                out(json_line(t))
            return
        rows = [(t.get("id"), t.get("label"), t.get("created"), t.get("expires") or "never") for t in tokens]
        out(table(rows, ("ID", "LABEL", "CREATED", "EXPIRES")) if rows else "no tokens")

    return opts.session_job(body)


@token.command("revoke")
@click.argument("what", metavar="ID|TOKEN|INVITE")
@pass_options
def token_revoke(opts: Options, what: str) -> Job:
    """Revoke a token by id, by the token itself, or by the invite line that carries it."""
    what = what.strip()
    if what.lower().startswith("msgrelay:"):
        selector = {"token": parse_invite(what).token}
    elif len(what) == 16 and all(c in "0123456789abcdef" for c in what):
        selector = {"token_id": what}
    else:
        selector = {"token": what}

    async def body(session: Session) -> None:
        count = await session.api.revoke_token(**selector)
        out(f"revoked {count} token{'s' if count != 1 else ''}: whoever holds it can no longer write to you")

    return opts.session_job(body)


@click.command()
@click.option("--for", "for_name", metavar="NAME", help="Who it is for: names them when they first write.")
@click.option("--expires", metavar="DURATION", help="e.g. 7d, or never (default: the relay's).")
@pass_options
def invite(opts: Options, for_name: Optional[str], expires: Optional[str]) -> Job:
    """Print one line that lets someone write to you: your address and a fresh token."""
    expires_in = duration_option(expires, allow_never=True)
    if for_name:
        check_contact_name(for_name)

    async def body(session: Session) -> None:
        minted = await session.api.create_token(label=f"invite for {for_name}" if for_name else "invite", expires_in=expires_in)

        def remember(config: dict[str, Any]) -> None:
            config.setdefault("invites", {})[minted["id"]] = {"for": for_name, "created": format_date(time.time())}

        session.profile.update_config(remember)
        out(format_invite(session.address, minted["token"]))

    return opts.session_job(body)


@click.group()
def contact() -> None:
    """People you write to, with their keys pinned."""


@contact.command("add")
@click.argument("name")
@click.argument("invite_line", metavar="INVITE")
@click.option("--relay-url", metavar="URL", help="Where their relay answers, if not https://<relay name>.")
@click.option("--replace", is_flag=True, help="Accept a different key for an existing contact (verify it first!).")
@pass_options
def contact_add(opts: Options, name: str, invite_line: str, relay_url: Optional[str], replace: bool) -> Job:
    """Add (or update the token of) a contact from their invite; their key is looked up and pinned."""
    check_contact_name(name)
    parsed = parse_invite(invite_line)
    relay_url = normalise_url(relay_url) if relay_url else None

    async def body(session: Session) -> None:
        if parsed.user_id == session.identity.user_id:
            raise UsageError("that is your own invite")
        try:
            key = await session.relay_for(parsed.server_name, relay_url).lookup_user(parsed.user_id)
        except RelayUnreachable as e:
            if relay_url is not None or parsed.server_name.lower() == session.config["server_name"].lower():
                raise
            raise RelayUnreachable(e.url, f"{e.reason}. {name} is on another relay ({parsed.server_name}), "
                                          "looked up at https://<its name>; if it answers elsewhere, give its URL: "
                                          f"contact add {name} INVITE --relay-url URL")
        with session.profile.editing_contacts() as contacts:
            existing, same = contacts.get(name), find_by_user_id(contacts, parsed.user_id)
            if existing is not None and existing.user_id != parsed.user_id and not replace:
                raise TrustError(
                    f"CONTACT KEY CHANGED: {name} is pinned to key fingerprint {existing.fingerprint} "
                    f"({existing.address}); this invite is for a different key ({parsed.address}). Nothing was "
                    f"changed. If {name} really has a new key, compare fingerprints with them and use --replace"
                )
            if same is not None and same.name != name:
                raise UsageError(f"{parsed.address} is already your contact {same.name!r}")
            if existing is not None and existing.user_id == parsed.user_id:
                existing.token, existing.address, existing.relay_url = parsed.token, str(parsed.address), relay_url
                existing.intro_sent = existing.intro_sent and existing.has_written
                out(f"updated {name}: new access token for {existing.address}")
                return
            added = new_contact(name, str(parsed.address), key, token=parsed.token, relay_url=relay_url)
            contacts[name] = added
        out(f"added {name}: {added.address}")
        out(f"key fingerprint: {added.fingerprint} (pinned; compare it with {name})")

    return opts.session_job(body)


@contact.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_options
def contact_list(opts: Options, as_json: bool) -> None:
    """List contacts (no network)."""
    contacts = opts.profile().load_contacts()
    if as_json:
        for c in contacts.values():
            out(json_line({"name": c.name, "address": c.address, "fingerprint": c.fingerprint,
                           "can_write": bool(c.token), "writes_to_you": c.has_written or c.intro_sent}))
        return
    rows = [(c.name, c.address, c.fingerprint[:16] + "...", "yes" if c.token else "no") for c in contacts.values()]
    out(table(rows, ("NAME", "ADDRESS", "FINGERPRINT", "CAN WRITE")) if rows else "no contacts")


@contact.command("remove")
@click.argument("name")
@click.option("--keep-token", is_flag=True, help="Do not revoke the token you gave them.")
@pass_options
def contact_remove(opts: Options, name: str, keep_token: bool) -> Job:
    """Forget a contact and revoke the token you gave them, so they can no longer write."""
    entry = opts.profile().contact(name)

    async def body(session: Session) -> None:
        if entry.my_token_id and not keep_token:
            try:
                await session.api.revoke_token(token_id=entry.my_token_id)
                out(f"revoked the token you gave {name}")
            except ClientError as e:
                if getattr(e, "errno", None) != 131:  # 131: already gone
                    raise
        with session.profile.editing_contacts() as contacts:
            contacts.pop(name, None)
        out(f"removed {name}")

    return opts.session_job(body)
