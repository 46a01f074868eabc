"""`msgrelay-client`: the command line over the client library (docs/client.md).

This module holds the command group with its global options, the identity commands, and
the entry point; cli_contacts.py and cli_messages.py hold the rest.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional
from urllib.parse import urlsplit

import click
from cryptography.hazmat.primitives.asymmetric import rsa

from .. import __version__
from ..wire.dates import format_date
from .api import DEFAULT_TIMEOUT, RelayClient, normalise_url
from .cli_contacts import contact, invite, token
from .cli_messages import fetch, outbox, send
from .cli_session import Job, Options, new_passphrase, pass_options, read_passphrase, report_bug, run_job
from .errors import EXIT_ABORTED, ClientError, TrustError, UsageError
from .identity import Identity, generate_private_key, pem_is_encrypted, private_key_from_pem
from .output import error_line, json_line, out, warn
from .session import Session, normalise_fingerprint


#: Options of the group: given after a command name they are "no such option" (main says where they go).
GLOBAL_OPTIONS = ("--profile", "-p", "--ca", "--trust-fingerprint", "--timeout")


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
@click.option("--key", "key_file", type=click.Path(exists=True, dir_okay=False),
              help="Use this private key (PKCS#8 PEM, e.g. the web client's identity file) instead of a new one.")
@pass_options
def init(opts: Options, server: str, display_name: str, passphrase: bool, registration_token: Optional[str],
         key_file: Optional[str]) -> Job:
    """Create a key pair, pin the relay's key, register, and print your address."""
    profile = opts.profile()
    if profile.exists():
        flag = "" if profile.name == "default" else f" --profile {profile.name}"
        raise UsageError(
            f"profile {profile.name!r} already exists at {profile.path}: it is registered already "
            f"(msgrelay-client{flag} whoami). For another identity pick a new name "
            f"(msgrelay-client --profile NEW-NAME init ...); to move it to another relay URL run "
            f"msgrelay-client{flag} set-server URL")
    if key_file and passphrase:
        raise UsageError("--key keeps the key file as it is (encrypted or not); --passphrase is for a new key")
    imported = read_key_file(key_file) if key_file else None
    url = normalise_url(server)
    host = urlsplit(url).hostname or ""
    if url.startswith("http://") and host != "localhost" and not host.startswith("127.") and host != "::1":
        warn(f"warning: {url} is plain http: contents stay end-to-end encrypted, but who talks "
             "to the relay and when is visible on the network")
    pinned = normalise_fingerprint(opts.trust_fingerprint) if opts.trust_fingerprint else None
    secret = new_passphrase() if passphrase and not profile.has_key() else None

    async def job(reactor: Any) -> None:
        api = RelayClient(url, reactor=reactor, ca_file=opts.ca_file, pinned_fingerprint=pinned, timeout=opts.timeout)
        try:
            info = await api.server_info()
            profile.create_folder()
            if imported is not None and not profile.has_key():
                profile.write_key_pem(imported[0])
                key = imported[1]
            elif profile.has_key():  # an earlier init stopped before registering: keep its key
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


def read_key_file(path: str) -> tuple[bytes, rsa.RSAPrivateKey]:
    """A key file to import and its key, checked now (its passphrase is asked if it has one)."""
    try:
        pem = open(path, "rb").read()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e}")
    return pem, private_key_from_pem(pem, read_passphrase() if pem_is_encrypted(pem) else None)


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


@cli.command("set-server")
@click.argument("url")
@pass_options
def set_server(opts: Options, url: str) -> Job:
    """Change the URL of this profile's relay (e.g. when it moves to https://).

    The relay at URL must be the same relay: same name and the pinned key (or a key reached
    along its verified key transitions, or the one --trust-fingerprint names).
    """
    profile = opts.profile()
    config = profile.load_config()
    new_url = normalise_url(url)
    trusted = normalise_fingerprint(opts.trust_fingerprint) if opts.trust_fingerprint else None

    async def job(reactor: Any) -> None:
        api = RelayClient(new_url, reactor=reactor, ca_file=opts.ca_file or config.get("ca_file"),
                       pinned_fingerprint=trusted or config["server_fingerprint"], timeout=opts.timeout,
                       follow_transitions=trusted is None, label=f"relay at {new_url}")
        try:
            info = await api.server_info()
        finally:
            await api.close()
        if info.name != config["server_name"]:
            raise TrustError(f"the relay at {new_url} calls itself {info.name!r}, but this profile is registered at "
                             f"{config['server_name']!r}: not changed (a different relay needs a new profile)")

        def change(current: dict[str, Any]) -> None:
            current["server_url"], current["server_fingerprint"] = new_url, info.fingerprint
            if opts.ca_file:
                current["ca_file"] = opts.ca_file

        profile.update_config(change)
        out(f"relay URL of profile {profile.name}: {new_url} (was {config['server_url']})")
        if info.fingerprint != config["server_fingerprint"]:
            out(f"relay key now pinned: {info.fingerprint} (was {config['server_fingerprint']})")

    return job


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
        await session.api.delete_user()
        target = profile.path.with_name(f"{profile.name}.deleted-{time.strftime('%Y%m%dT%H%M%S')}")
        os.rename(profile.path, target)
        out(f"deleted {session.address} at the relay; local data (messages, contacts, key) moved to {target}")

    return opts.session_job(body)


for command in (token, invite, contact, send, fetch, outbox):
    cli.add_command(command)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the console script."""
    try:
        job = cli.main(args=argv, prog_name="msgrelay-client", standalone_mode=False)
    except click.exceptions.Abort:
        warn("aborted: nothing was done")
        sys.exit(EXIT_ABORTED)
    except click.NoSuchOption as e:
        if e.option_name in GLOBAL_OPTIONS:
            hint = click.UsageError(
                f"{e.option_name} is an option of msgrelay-client itself: put it before the command, "
                f"e.g. msgrelay-client {e.option_name} ... {e.ctx.info_name if e.ctx else 'COMMAND'} ...", e.ctx)
            hint.show()
            sys.exit(hint.exit_code)
        e.show()
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except ClientError as e:
        warn(error_line(e))
        sys.exit(e.exit_code)
    except Exception:
        sys.exit(report_bug())
    if isinstance(job, int):  # --help, --version
        sys.exit(job)
    if job is None:
        sys.exit(0)
    run_job(job)
