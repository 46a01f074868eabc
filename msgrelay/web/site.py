"""The HTTP server side: body limits before reading, CORS, Timestamp and the access log."""

from __future__ import annotations

import time
from typing import Any, Callable, ClassVar, Optional, Sequence, cast

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import IResource

from ..ratelimit import client_host, parse_networks
from ..settings import Reload, Settings
from ..timeouts import RelayChannel
from ..twisted_compat import request_line
from ..wire.errors import ProtocolError
from .connlimit import LINGER_BYTES, LINGER_SECONDS, linger_close
from .responses import JSON_TYPE, encode_json, info_base, is_utf8_path, shown_path

log = Logger(namespace="msgrelay.access")

CORS_HEADERS = {
    b"Access-Control-Allow-Origin": b"*",
    b"Access-Control-Expose-Headers": b"Timestamp, Retry-After",
}


class RelayRequest(server.Request):
    """A request that refuses an oversized body from its headers, never buffering it."""

    errno: Optional[int] = None
    _refused = False
    _received = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._started = time.monotonic()

    @property
    def relay_site(self) -> "RelaySite":
        return cast("RelaySite", cast(RelayChannel, self.channel).site)

    def client_host(self) -> str:
        """The client's address: the peer's, or from X-Forwarded-For behind a trusted proxy."""
        cached = getattr(self, "_client_host", None)
        if cached is None:
            peer = getattr(self.getClientAddress(), "host", None)
            trusted = parse_networks(self.relay_site.settings.server.trusted_proxies)
            forwarded = (self.requestHeaders.getRawHeaders("X-Forwarded-For") or []) if trusted else []
            cached = self._client_host = client_host(peer, forwarded, trusted)
        return cached

    def gotLength(self, length: Optional[int]) -> None:
        limit = self.relay_site.settings.limits.max_body_bytes
        if length is not None and length > limit:
            self._refuse(f"request body of {length} bytes is over the limit of {limit} bytes (max_body_bytes)")
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        limit = self.relay_site.settings.limits.max_body_bytes
        if self._received > limit:
            self._refuse(f"request body is over the limit of {limit} bytes (max_body_bytes)")
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            super().requestReceived(command, path, version)

    def _refuse(self, message: str) -> None:
        """Answer 413 at once and close: the body is never kept in memory or on disk."""
        self._refused = True
        self.requestHeaders.removeHeader(b"expect")
        error = ProtocolError(140, message)
        self.errno = error.errno
        body = encode_json(error.body(info_base(self, self.relay_site.settings.server.errors_url)))
        headers = [
            b"HTTP/1.1 413 Request Entity Too Large",
            b"Content-Type: " + JSON_TYPE.encode(),
            b"Content-Length: " + str(len(body)).encode(),
            b"Connection: close",
            b"Timestamp: " + str(int(self.relay_site.clock.seconds())).encode(),
        ] + [name + b": " + value for name, value in CORS_HEADERS.items()]
        transport = self.channel.transport
        assert transport is not None  # a request is refused while its connection is open
        transport.write(b"\r\n".join(headers) + b"\r\n\r\n" + body)
        # Read and discard the body the client may still be sending, so it gets this answer
        # rather than a reset (docs/protocol.md section 1, lingering close).
        cast(RelayChannel, self.channel).stop_deadlines()
        linger_close(transport, LINGER_BYTES, LINGER_SECONDS)
        self.code = 413
        command, raw_path = request_line(self.channel)
        self.method = command or b"?"
        raw_path = raw_path or b"?"
        self.relay_site.log_request(self, path=raw_path.split(b"?", 1)[0])

    def process(self) -> None:
        for name, value in CORS_HEADERS.items():
            self.setHeader(name, value)
        self.setHeader(b"Timestamp", str(int(self.relay_site.clock.seconds())).encode())
        if not is_utf8_path(self.path):  # Klein would answer HTML and log a traceback
            self.site = self.relay_site
            self._write_error(ProtocolError(100, "request path is not valid UTF-8 once percent-decoded"))
            self.finish()
            return
        if self.method == b"OPTIONS":
            self._preflight()
            return
        super().process()

    def _preflight(self) -> None:
        self.site = self.relay_site
        methods = self.relay_site.allowed_methods(self.path.decode("utf-8", "replace"))
        if not methods:
            self._write_error(ProtocolError(132, "no endpoint at this path"))
        else:
            self.setResponseCode(204)
            allowed = ", ".join(sorted(set(methods) | {"OPTIONS"}))
            self.setHeader(b"Access-Control-Allow-Methods", allowed.encode())
            self.setHeader(b"Access-Control-Allow-Headers", b"Content-Type")
            self.setHeader(b"Access-Control-Max-Age", b"86400")
        self.finish()

    def processingFailed(self, reason):
        """Last resort: never an HTML traceback to a client."""
        log.failure("request processing failed", reason)
        self._write_error(ProtocolError(999, "the relay failed unexpectedly; the operator's log has the details"))
        self.finish()
        return reason

    def _write_error(self, error: ProtocolError) -> None:
        """A section 9 error body, written outside Klein (which has not routed this request)."""
        body = encode_json(error.body(info_base(self, self.relay_site.settings.server.errors_url)))
        self.errno = error.errno
        self.setResponseCode(error.status)
        self.setHeader(b"Content-Type", JSON_TYPE.encode())
        self.setHeader(b"Content-Length", str(len(body)).encode())
        self.write(body)


def request_client_host(request: Any) -> str:
    """The client address of a request: a RelayRequest's (trusted proxies applied), else the
    peer's (a resource served by another site, e.g. in tests)."""
    if isinstance(request, RelayRequest):
        return request.client_host()
    return getattr(request.getClientAddress(), "host", None) or "unknown"


class RelaySite(server.Site):
    """A Site whose requests are RelayRequests, with one structured log line per request.

    It reads the running `settings` per request and per connection (body limit, errors URL,
    trusted proxies, timeouts); a reload swaps the whole object (`reconfigure`).
    """

    settings_sections: ClassVar[frozenset[str]] = frozenset({"limits", "server", "timeouts"})

    requestFactory = RelayRequest
    # HTTP/1.1 with header and body deadlines (msgrelay/timeouts.py), not the HTTP/2-capable wrapper.
    protocol = RelayChannel  # type: ignore[assignment]
    displayTracebacks = False
    noisy = False  # no "Starting factory <RelaySite object at 0x...>": "listening on" says it

    def __init__(
        self,
        resource: IResource,
        clock: IReactorTime,
        settings: Settings,
        allowed_methods: Callable[[str], list[str]],
        routes: Optional[dict[bytes, IResource]] = None,
        request_observers: Sequence[Callable[[RelayRequest, bytes, float], None]] = (),
        timeout_observers: Sequence[Callable[[str], None]] = (),
    ):
        # Bodies are JSON whatever their Content-Type says: never parse them as form data,
        # so request.args holds the query string alone.
        super().__init__(resource, parsePOSTFormSubmission=False, reactor=clock)
        self.clock = clock
        self.settings = settings
        #: The methods routed for a path (OPTIONS preflights).
        self.allowed_methods = allowed_methods
        #: Extra resources by exact path, served before the API (e.g. b"/metrics").
        self.routes: dict[bytes, IResource] = dict(routes or {})
        #: Told (request, path, seconds) after each answered request (metrics).
        self.request_observers = list(request_observers)
        #: Told the phase ("idle", "headers", "body") of each connection cut off (metrics).
        self.timeout_observers = list(timeout_observers)
        self.open_connections = 0

    def reconfigure(self, reload: Reload) -> None:
        self.settings = reload.running

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.timeOut = self.settings.timeouts.idle  # read per connection: a reload applies to new ones
        return channel

    def connection_opened(self, channel: RelayChannel) -> None:
        self.open_connections += 1

    def connection_closed(self, channel: RelayChannel) -> None:
        self.open_connections -= 1

    def getResourceFor(self, request):
        extra = self.routes.get(request.path)
        if extra is not None:
            request.site = self
            request.sitepath = request.prepath[:]
            return extra
        return super().getResourceFor(request)

    def log(self, request: http.Request) -> None:
        self.log_request(cast(RelayRequest, request), path=request.path)

    def log_request(self, request: RelayRequest, path: bytes) -> None:
        """Method, path (never the query: it carries signatures), status, errno, time taken."""
        elapsed = time.monotonic() - request._started
        log.info(
            # errno only when there is one (the field itself is always there, None on success)
            "{method} {path} {status} {duration_ms}ms" if request.errno is None
            else "{method} {path} {status} errno={errno} {duration_ms}ms",
            method=request.method.decode("ascii", "replace"),
            path=shown_path(path),
            status=request.code,
            errno=request.errno,
            duration_ms=round(elapsed * 1000, 1),
            client=request.client_host(),
        )
        for observer in self.request_observers:
            try:
                observer(request, path, elapsed)
            except Exception:
                log.failure("request observer failed")
