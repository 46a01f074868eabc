"""Connection timeouts and the open-file limit.

Three clocks cut off clients that hold a connection without using it:

- idle (`timeouts.idle`): no byte received between requests (twisted.web's own timer,
  paused while a request is being answered);
- headers (`timeouts.headers`): an absolute deadline from the first byte of a request to
  the end of its headers, so a client trickling a header a byte at a time (slow loris),
  which resets the idle timer with every byte, is still dropped;
- body (`timeouts.body`): an absolute deadline from the end of the headers to the end of
  the body.

A client cut off by the headers or body deadline is answered `408 Request Timeout` and the
connection is closed (aborted 15 s later if the client does not read even that).
"""

from __future__ import annotations

import resource
from functools import partial
from typing import Any, Callable, Optional, Protocol

from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http

from .settings import Settings
from .twisted_compat import abort_later, has_buffered_input, is_handling_request

log = Logger(namespace="msgrelay.timeouts")

_TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"Connection: close\r\n"
    b"Content-Length: 0\r\n\r\n"
)


class TimedSite(Protocol):
    """What a RelayChannel needs of its site: the running settings (read per request, so a
    reload applies to the next one) and whom to tell of connections and cut-offs."""

    settings: Settings
    timeout_observers: list[Callable[[str], None]]

    def connection_opened(self, channel: "RelayChannel") -> None: ...

    def connection_closed(self, channel: "RelayChannel") -> None: ...


class RelayChannel(http.HTTPChannel):
    """An HTTP/1.1 channel with absolute deadlines for request headers and body."""

    site: TimedSite

    _deadline: Any = None
    _phase: Optional[str] = None
    _cut_off = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.connection_opened(self)

    def dataReceived(self, data: bytes) -> None:
        if self._cut_off:
            return  # answered 408 and closing: nothing more is parsed
        super().dataReceived(data)
        if (self._deadline is None and not is_handling_request(self) and not self._cut_off
                and (has_buffered_input(self) or self.requests) and self.transport is not None
                and not getattr(self.transport, "disconnecting", False)):
            # Part of a request is here (a partial line, or lines without the end of the
            # headers): its headers must all arrive within the deadline, counted from now.
            self._start("headers", self.site.settings.timeouts.headers)

    def allHeadersReceived(self) -> None:
        self._cancel()
        super().allHeadersReceived()
        if self.length != 0 and not self._cut_off:
            # A body follows (Content-Length or chunked); allContentReceived ends this.
            self._start("body", self.site.settings.timeouts.body)

    def allContentReceived(self) -> None:
        self._cancel()
        super().allContentReceived()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel()
        super().connectionLost(reason)
        self.site.connection_closed(self)

    def timeoutConnection(self) -> None:
        self._report("idle")
        super().timeoutConnection()

    def stop_deadlines(self) -> None:
        """The request was answered early (413) and the connection is closing: no timer
        may answer it again, and nothing more is parsed."""
        self._cut_off = True
        self._cancel()
        self.setTimeout(None)

    # -- deadlines ---------------------------------------------------------------

    def _start(self, phase: str, seconds: Optional[float]) -> None:
        self._cancel()
        if seconds:
            self._phase = phase
            self._deadline = self.callLater(seconds, partial(self._expired, phase, seconds))

    def _cancel(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None
            self._phase = None

    def _expired(self, phase: str, seconds: float) -> None:
        self._deadline = None
        self._phase = None
        self._cut_off = True
        peer = self.transport.getPeer() if self.transport is not None else None
        log.info("cut off {client}: request {phase} not received within {seconds}s",
                 client=getattr(peer, "host", None), phase=phase, seconds=seconds)
        self._report(phase)
        self.setTimeout(None)
        if self.transport is not None:
            self.transport.write(_TIMEOUT_ANSWER)
            self.loseConnection()
            if self.abortTimeout is not None:
                abort_later(self, self.abortTimeout)

    def _report(self, phase: str) -> None:
        for observer in self.site.timeout_observers:
            try:
                observer(phase)
            except Exception:
                log.failure("timeout observer failed")


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit where allowed; (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        target = 1048576
    else:
        target = hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warn("could not raise the open-file limit from {soft} to {target}: {error}",
                     soft=soft, target=target, error=e)
    return soft, hard
