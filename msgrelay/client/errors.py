"""The client's expected failures, each carrying the exit code the command line documents.

Every failure a person can cause or meet (relay down, bad invite, changed key, revoked
token) is one of these, so the command line prints one line and never a traceback.
"""

from __future__ import annotations

from typing import Optional

# Exit codes of `msgrelay-client` (docs/client.md lists them too).
EXIT_OK = 0
EXIT_ABORTED = 1  # a confirmation prompt was declined: nothing was done
EXIT_USAGE = 2  # bad arguments, bad invite, unknown contact, profile missing or already there
EXIT_UNREACHABLE = 3  # network error, timeout, TLS verification failure, not a relay
EXIT_REFUSED = 4  # the relay answered with a JSON error body (errno shown)
EXIT_TRUST = 5  # a pinned key changed: the relay's key or a contact's key
EXIT_REJECTED = 6  # fetch: at least one message was rejected (tampered, bad signature, wrong key)
EXIT_PROFILE = 7  # local profile unreadable: wrong passphrase, corrupt file, permissions
EXIT_BUG = 70  # EX_SOFTWARE: an unexpected error, the only case that prints a traceback


class ClientError(Exception):
    """Base of every expected failure; `str()` is the one line shown to the person."""

    exit_code = EXIT_BUG  # subclasses say what kind of failure it is


class UsageError(ClientError):
    exit_code = EXIT_USAGE


class InviteError(UsageError):
    """An invite line that does not parse."""


class ProfileError(ClientError):
    exit_code = EXIT_PROFILE


class TrustError(ClientError):
    """A pinned key no longer matches: never proceed silently."""

    exit_code = EXIT_TRUST


class RelayUnreachable(ClientError):
    """No usable HTTP answer: connection refused, DNS, timeout, TLS, or a non-relay answer."""

    exit_code = EXIT_UNREACHABLE

    def __init__(self, url: str, reason: str):
        super().__init__(f"cannot reach the relay at {url}: {reason}")
        self.url = url
        self.reason = reason


class RelayError(ClientError):
    """The relay refused a request with a section 9 error body."""

    exit_code = EXIT_REFUSED

    def __init__(
        self,
        errno: Optional[int],
        status: int,
        message: str,
        info: Optional[str] = None,
        retry_after: Optional[int] = None,
        where: str = "the relay",
    ):
        self.errno = errno
        self.status = status
        self.message = message
        self.info = info
        self.retry_after = retry_after
        self.where = where
        super().__init__(self._line())

    def _line(self) -> str:
        code = f"errno {self.errno}" if self.errno is not None else "no errno"
        line = f"{self.where} refused the request ({code}, HTTP {self.status}): {self.message}"
        if self.retry_after is not None and "retry" not in self.message.lower():
            line += f"; retry after {self.retry_after} s"
        if self.info:
            line += f" [{self.info}]"
        return line

    @property
    def transient(self) -> bool:
        """Worth retrying later with the same packet: rate limits, quota, server trouble."""
        return self.status == 429 or self.status >= 500


class MessageRejected(ClientError):
    """A fetched message that must not be shown as genuine."""

    exit_code = EXIT_REJECTED
