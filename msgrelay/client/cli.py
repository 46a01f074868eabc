"""`msgrelay-client`: the command line over the client library.

Each command does its local, synchronous part (arguments, profile, passphrase, prompts) and
returns a job; `main` runs that job once under the Twisted reactor. Expected failures are
`ClientError`s: one line on stderr and a documented exit code (errors.py, docs/client.md).
Only a bug prints a traceback.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import click
from twisted.internet.task import react

from .. import __version__
from ..wire.dates import format_date
from .api import DEFAULT_TIMEOUT, RelayAPI, normalise_url
from .errors import EXIT_ABORTED, EXIT_BUG, EXIT_REJECTED, ClientError, ProfileError, TrustError, UsageError
from .identity import Identity, generate_private_key
from .invite import format_invite, parse_invite
from .outbox import Outbox
from .output import describe_delivery, describe_record, error_line, json_line, parse_duration, table
from .profile import Profile, check_contact_name, find_by_user_id, new_contact
from .receiving import fetch as fetch_messages
from .receiving import watch as watch_messages
from .sending import flush, send_file, send_text
from .session import Session, normalise_fingerprint

Job = Callable[[Any], Awaitable[Optional[int]]]


@dataclass
class Options:
    profile_name: str
    ca_file: Optional[str]
    trust_fingerprint: Optional[str]
    timeout: float

    def profile(self) -> Profile:
        return Profile.locate(self.profile_name)

    def session_job(self, body: Callable[[Session], Awaitable[Optional[int]]]) -> Job:
        """Open the profile now (so the passphrase is asked before any network I/O)."""
        profile = self.profile()
        config = profile.load_config()
        identity = profile.load_identity(read_passphrase)

        async def job(reactor: Any) -> Optional[int]:
            session = Session(
                profile, identity, config, reactor=reactor, ca_file=self.ca_file,
                trust_fingerprint=self.trust_fingerprint, timeout=self.timeout,
            )
            try:
                return await body(session)
            finally:
                await session.close()

        return job


def read_passphrase() -> bytes:
    """MSGRELAY_PASSPHRASE, else a hidden prompt on a terminal; never hang on a pipe."""
    env = os.environ.get("MSGRELAY_PASSPHRASE")
    if env is not None:
        return env.encode("utf-8")
    if sys.stdin.isatty():
        return click.prompt("Passphrase for the private key", hide_input=True, err=True).encode("utf-8")
    raise ProfileError("the private key is passphrase-protected: set MSGRELAY_PASSPHRASE or run from a terminal")


def new_passphrase() -> bytes:
    env = os.environ.get("MSGRELAY_PASSPHRASE")
    if env:
        return env.encode("utf-8")
    if not sys.stdin.isatty():
        raise UsageError("--passphrase needs a terminal to ask for it, or MSGRELAY_PASSPHRASE")
    text = click.prompt("New passphrase for the private key", hide_input=True, confirmation_prompt=True, err=True)
    if not text:
        raise UsageError("the passphrase must not be empty")
    return text.encode("utf-8")


def duration_option(text: Optional[str], allow_never: bool) -> Optional[int]:
    if text is None:
        return None
    try:
        return parse_duration(text, allow_never)
    except ValueError as e:
        raise click.BadParameter(str(e))


def out(text: str = "") -> None:
    click.echo(text)


def warn(text: str) -> None:
    click.echo(text, err=True)


pass_options = click.make_pass_decorator(Options)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--profile", "-p", "profile_name", default="default", show_default=True, envvar="MSGRELAY_PROFILE",
              help="Profile folder under $XDG_CONFIG_HOME/msgrelay/ (env MSGRELAY_PROFILE).")
@click.option("--ca", "ca_file", type=click.Path(exists=True, dir_okay=False), envvar="MSGRELAY_CA",
              help="Trust only the CA certificates in this PEM file (a private CA).")
@click.option("--trust-fingerprint", metavar="SHA256",
              help="Accept (and pin) the relay key with this fingerprint, after a verified key change.")
@click.option("--timeout", type=float, default=DEFAULT_TIMEOUT, show_default=True, help="Seconds per request.")
@click.version_option(__version__, prog_name="msgrelay-client")
@click.pass_context
def cli(ctx: click.Context, profile_name: str, ca_file: Optional[str], trust_fingerprint: Optional[str], timeout: float) -> None:
    """End-to-end encrypted messages through a msgrelay relay."""
    ca = os.path.abspath(ca_file) if ca_file else None
    ctx.obj = Options(profile_name, ca, trust_fingerprint, timeout)


# -- identity -----------------------------------------------------------------------------


@cli.command()
@click.option("--server", required=True, metavar="URL", help="The relay, e.g. https://relay.example.org")
@click.option("--name", "display_name", default="", help="Display name sent with your messages (optional).")
@click.option("--passphrase", is_flag=True, help="Encrypt the private key (asks, or MSGRELAY_PASSPHRASE).")
@click.option("--registration-token", help="For relays with closed registration.")
@pass_options
def init(opts: Options, server: str, display_name: str, passphrase: bool, registration_token: Optional[str]) -> Job:
    """Create a key pair, pin the relay's key, register, and print your address."""
    profile = opts.profile()
    if profile.exists():
        raise UsageError(f"profile {profile.name!r} already exists at {profile.path}")
    url = normalise_url(server)
    pinned = normalise_fingerprint(opts.trust_fingerprint) if opts.trust_fingerprint else None
    secret = new_passphrase() if passphrase and not profile.has_key() else None

    async def job(reactor: Any) -> None:
        api = RelayAPI(url, reactor=reactor, ca_file=opts.ca_file, pinned_fingerprint=pinned, timeout=opts.timeout)
        try:
            info = await api.server_info()
            profile.create_folder()
            if profile.has_key():  # an earlier init stopped before registering: keep its key
                key = profile.load_private_key(read_passphrase)
            else:
                key = generate_private_key()
                profile.write_key(key, secret)
            identity = Identity(key, info.name)
            user_id = await api.register(identity.public_pem, registration_token)
        finally:
            await api.close()
        if user_id != identity.user_id:
            raise TrustError(f"the relay registered the key as {user_id}, but its user id is {identity.user_id}")
        profile.save_config({
            "server_url": url, "server_name": info.name, "server_fingerprint": info.fingerprint,
            "user_id": user_id, "fingerprint": identity.fingerprint, "display_name": display_name,
            "ca_file": opts.ca_file, "created": format_date(time.time()), "invites": {},
        })
        out(f"profile:                {profile.path}")
        out(f"relay:                  {info.name} ({url})")
        out(f"relay key fingerprint:  {info.fingerprint} (pinned)")
        out(f"your key fingerprint:   {identity.fingerprint}")
        out(f"your address:           {identity.address}")

    return job


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@pass_options
def whoami(opts: Options, as_json: bool) -> None:
    """Show this profile's address and pinned keys (no network)."""
    profile = opts.profile()
    config = profile.load_config()
    info = {
        "profile": profile.name, "path": str(profile.path),
        "address": f"{config['user_id']}@{config['server_name']}", "user_id": config["user_id"],
        "fingerprint": config.get("fingerprint"), "server_url": config["server_url"],
        "server_name": config["server_name"], "server_fingerprint": config["server_fingerprint"],
    }
    if as_json:
        out(json_line(info))
        return
    for key, value in info.items():
        out(f"{key + ':':20}{value}")


@cli.command("delete-account")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_options
def delete_account(opts: Options, yes: bool) -> Job:
    """Erase the account at the relay (key, tokens, stored messages)."""
    profile = opts.profile()
    config = profile.load_config()
    if not yes:
        click.confirm(
            f"Delete {config['user_id']}@{config['server_name']} at {config['server_url']}? The relay erases "
            "your key, tokens and pending messages; nobody can write to this address again", abort=True, err=True,
        )

    async def body(session: Session) -> None:
        await session.connect()
        await session.api.delete_user()
        target = profile.path.with_name(f"{profile.name}.deleted-{time.strftime('%Y%m%dT%H%M%S')}")
        os.rename(profile.path, target)
        out(f"deleted {session.address} at the relay; local data (messages, contacts, key) moved to {target}")

    return opts.session_job(body)


# -- tokens and invites -----------------------------------------------------------------


@cli.group()
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


@cli.command()
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


# -- contacts -----------------------------------------------------------------------------


@cli.group()
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
        key = await session.relay_for(parsed.server_name, relay_url).lookup_user(parsed.user_id)
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


# -- messages -----------------------------------------------------------------------------


@cli.command()
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
    raw = Path(file_path).read_bytes() if file_path else None
    if text == "-":
        text = sys.stdin.read()

    async def body(session: Session) -> int:
        if raw is not None:
            outcome = await send_file(session, name, raw, ttl_seconds)
        else:
            outcome = await send_text(session, name, text or "", ttl_seconds)
        for delivery in outcome.deliveries:
            (out if delivery.status == "sent" else warn)(describe_delivery(delivery))
        mine = outcome.delivery
        if mine is not None and mine.error is not None:
            return mine.error.exit_code
        return 0

    return opts.session_job(body)


@cli.command()
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
            await watch_messages(session, show, trouble, output, interval, max(interval, max_interval))
            return 0
        records = await fetch_messages(session, output, limit)
        if not records and not as_json:
            out("no new messages")
        return EXIT_REJECTED if show(records) else 0

    return opts.session_job(body)


@cli.group()
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
        for delivery in deliveries:
            (out if delivery.status == "sent" else warn)(describe_delivery(delivery))
        if not deliveries:
            out("outbox is empty")
        errors = [d.error for d in deliveries if d.error is not None]
        return errors[0].exit_code if errors else 0

    return opts.session_job(body)


# -- running ------------------------------------------------------------------------------


async def _run(reactor: Any, job: Job) -> None:
    try:
        code = await job(reactor) or 0
    except ClientError as e:
        warn(error_line(e))
        code = e.exit_code
    except Exception:
        traceback.print_exc()
        warn("msgrelay-client: internal error (a bug): please report the traceback above")
        code = EXIT_BUG
    raise SystemExit(code)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the console script."""
    try:
        job = cli.main(args=argv, prog_name="msgrelay-client", standalone_mode=False)
    except click.exceptions.Abort:
        warn("aborted: nothing was done")
        sys.exit(EXIT_ABORTED)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except ClientError as e:
        warn(error_line(e))
        sys.exit(e.exit_code)
    except Exception:
        traceback.print_exc()
        warn("msgrelay-client: internal error (a bug): please report the traceback above")
        sys.exit(EXIT_BUG)
    if isinstance(job, int):  # --help, --version
        sys.exit(job)
    if job is None:
        sys.exit(0)
    react(_run, (job,))
