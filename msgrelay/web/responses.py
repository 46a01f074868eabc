"""Writing JSON answers and section 9 error bodies onto a request."""

from __future__ import annotations

import json
import re
from typing import Any, Optional
from urllib.parse import unquote_to_bytes

from twisted.web.iweb import IRequest

from ..wire.errors import ProtocolError
from ..wire.fetchanswer import EncodedJSON

JSON_TYPE = "application/json; charset=utf-8"
_HOST = re.compile(r"[A-Za-z0-9.\-\[\]:]{1,270}")


#: Characters of a request path shown in log lines and error messages; the rest is counted.
SHOWN_PATH_CHARS = 200


def shown_path(raw: bytes) -> str:
    """A request path for a log line or message: decoded leniently, long ones truncated."""
    text = raw.decode("utf-8", "replace")
    if len(text) <= SHOWN_PATH_CHARS:
        return text
    return f"{text[:SHOWN_PATH_CHARS]}...[truncated, {len(raw)} bytes]"


def is_utf8_path(raw: bytes) -> bool:
    """True when the percent-decoded path is valid UTF-8 (docs/protocol.md section 1)."""
    try:
        unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def write_json(request: IRequest, obj: Any, status: int = 200) -> bytes:
    """Set status and headers for a JSON answer (with its length: no chunking needed).
    `obj` may be `EncodedJSON`, encoded already."""
    body = obj if isinstance(obj, EncodedJSON) else encode_json(obj)
    request.setResponseCode(status)
    request.setHeader("Content-Type", JSON_TYPE)
    request.setHeader("Content-Length", str(len(body)))
    return body


def write_error(request: IRequest, error: ProtocolError, base: str) -> bytes:
    """Answer `error` as the section 9 body; remember its errno for the access log."""
    request.errno = error.errno  # type: ignore[attr-defined]
    if error.retry_after is not None:
        request.setHeader("Retry-After", str(error.retry_after))
    return write_json(request, error.body(base), error.status)


def info_base(request: IRequest, configured: Optional[str]) -> str:
    """URL of the errno reference page: configured, else this relay's own `/errors`."""
    if configured:
        return configured
    host = (request.getHeader("host") or "").strip()
    if not _HOST.fullmatch(host):
        address = request.getHost()
        host = f"{getattr(address, 'host', 'localhost')}:{getattr(address, 'port', 80)}"
    scheme = "https" if request.isSecure() else "http"
    return f"{scheme}://{host}/errors"
