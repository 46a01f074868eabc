"""Protocol errors (docs/protocol.md section 9): one exception type carrying a stable errno."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Optional

#: errno -> (HTTP status, short meaning). The meaning is documented in docs/errors.md.
ERRNOS: dict[int, tuple[int, str]] = {
    100: (400, "malformed request"),
    101: (400, "invalid public key"),
    102: (400, "unsupported algorithm"),
    103: (400, "envelope does not decrypt"),
    104: (400, "invalid packet"),
    105: (400, "invalid date or validity"),
    106: (400, "invalid user id or address"),
    110: (401, "signature does not verify"),
    111: (401, "request expired"),
    112: (401, "request already used"),
    120: (403, "access token invalid, expired or revoked"),
    121: (403, "registration closed or registration token invalid"),
    122: (403, "destination not allowed by federation policy"),
    130: (404, "unknown user"),
    131: (404, "unknown token"),
    132: (404, "unknown endpoint"),
    133: (405, "method not allowed"),
    140: (413, "request body too large"),
    150: (429, "rate limited"),
    160: (507, "recipient's mailbox is full"),
    180: (503, "storage unavailable"),
    999: (500, "unknown error"),
}


class ProtocolError(Exception):
    """A failure the client must see as a JSON error body with a stable errno."""

    def __init__(self, errno: int, message: str, retry_after: Optional[int] = None):
        if errno not in ERRNOS:
            raise ValueError(f"unknown errno {errno}")
        super().__init__(message)
        self.errno = errno
        self.message = message
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        return ERRNOS[self.errno][0]

    def body(self, info_base: str) -> dict[str, Any]:
        """The section 9 error body; `info_base` is the URL of the errno reference page."""
        return {
            "code": self.status,
            "errno": self.errno,
            "error": HTTPStatus(self.status).phrase,
            "message": self.message,
            "info": f"{info_base}#errno-{self.errno}",
        }

    def __repr__(self) -> str:
        return f"ProtocolError({self.errno}, {self.message!r})"


def malformed(message: str) -> ProtocolError:
    """Shortcut for the most common error, errno 100."""
    return ProtocolError(100, message)
