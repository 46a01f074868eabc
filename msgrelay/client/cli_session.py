"""How a command runs: global options, opening the profile, and the job under the reactor.

Each command does its local, synchronous part (arguments, profile, passphrase, prompts) and
returns a job; the job then runs once under the Twisted reactor. Expected failures are
`ClientError`s: one line on stderr and a documented exit code (errors.py, docs/client.md).
Only a bug prints a traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, NoReturn, Optional

import click
from twisted.internet.task import react

from .errors import EXIT_BUG, ClientError, ProfileError, UsageError
from .output import error_line, parse_duration, warn
from .profile import Profile
from .session import Session

Job = Callable[[Any], Awaitable[Optional[int]]]


@dataclass
class Options:
    profile_name: str
    ca_file: Optional[str]
    trust_fingerprint: Optional[str]
    timeout: float

    def profile(self) -> Profile:
        return Profile.locate(self.profile_name)

    def session_job(self, body: Callable[[Session], Awaitable[Optional[int]]], connect: bool = True) -> Job:
        """Open the profile now (so the passphrase is asked before any network I/O).

        The job first checks the relay's pinned key and name (`connect`), unless the body
        does so itself, as sending does to queue messages while the relay is unreachable.
        """
        profile = self.profile()
        config = profile.load_config()
        identity = profile.load_identity(read_passphrase)

        async def job(reactor: Any) -> Optional[int]:
            session = Session(
                profile, identity, config, reactor=reactor, ca_file=self.ca_file,
                trust_fingerprint=self.trust_fingerprint, timeout=self.timeout,
            )
            try:
                if connect:
                    await session.connect()
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


pass_options = click.make_pass_decorator(Options)


async def _run(reactor: Any, job: Job) -> None:
    try:
        code = await job(reactor) or 0
    except ClientError as e:
        warn(error_line(e))
        code = e.exit_code
    except Exception:
        code = report_bug()
    raise SystemExit(code)


def report_bug() -> int:
    """The one case with a traceback: an exception no code path expected."""
    traceback.print_exc()
    warn("msgrelay-client: internal error (a bug): please report the traceback above")
    return EXIT_BUG


def run_job(job: Job) -> NoReturn:
    """Run `job` under the reactor and exit with its code."""
    react(_run, (job,))
