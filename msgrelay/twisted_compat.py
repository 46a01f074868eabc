"""Every private Twisted name msgrelay relies on, in one place.

twisted.web's HTTP/1.1 channel offers no public way to learn the request line of a
request refused before its body, whether a request is being answered, whether part of
the next one is buffered, or to schedule the abort of a connection that will not close;
and `StreamServerEndpointService` reports a failed listen only asynchronously unless told
otherwise; an `ssl:` server endpoint does not expose the TLS context it built from its
description, which a worker needs to serve TLS on a socket it inherited; and a listening
port accepts as many connections per wake-up as it found last time (`numberAccepts`, which
it adjusts itself), so of several workers sharing one socket, the first awake takes a whole
burst. Each helper below names one such assumption, and tests/test_twisted_compat.py
has one test per assumption that fails loudly if a Twisted release changes it. setup.py
bounds Twisted below the next major version nobody has tested.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.web.http import HTTPChannel

#: Twisted versions these assumptions were checked against (the upper bound in setup.py).
TESTED_TWISTED = "26"


def request_line(channel: HTTPChannel) -> tuple[Optional[bytes], Optional[bytes]]:
    """(method, raw path with query) of the request whose headers are being read.

    HTTPChannel keeps them as `_command` and `_path` between the request line and the
    creation of the request object's method and path.
    """
    return getattr(channel, "_command", None), getattr(channel, "_path", None)


def is_handling_request(channel: HTTPChannel) -> bool:
    """Whether a request on this channel is being answered (`_handlingRequest`)."""
    return bool(channel._handlingRequest)


def has_buffered_input(channel: HTTPChannel) -> bool:
    """Whether part of a request line or header waits in the line buffer (`_buffer`)."""
    return bool(channel._buffer)


def abort_later(channel: HTTPChannel, seconds: float) -> None:
    """Abort the connection in `seconds` unless it closes first.

    HTTPChannel cancels the call it keeps in `_abortingCall` when the connection is lost,
    the same as for its own idle timeout.
    """
    channel._abortingCall = channel.callLater(seconds, channel.forceAbortClient)


def raise_listen_errors_synchronously(service: StreamServerEndpointService) -> None:
    """Make `privilegedStartService` raise a failed listen at once (`_raiseSynchronously`),
    so a port already in use stops start-up with one line."""
    service._raiseSynchronously = True


def server_tls_context(endpoint: SSL4ServerEndpoint) -> Any:
    """The TLS context factory an `ssl:` server endpoint built from its description
    (`_sslContextFactory`): certificate, key, chain and options, as `listen` would use them."""
    return endpoint._sslContextFactory


def accept_one_per_wakeup(port: Any) -> None:
    """Make a listening `tcp.Port` accept one connection each time it is readable.

    `Port.doRead` accepts up to `numberAccepts` connections in a loop and then adapts that
    number (more after a full loop, as many as it found otherwise). Workers sharing one
    listening socket are all woken by a new connection; when each takes one and goes back
    to the event loop, the one least busy takes the next, so a burst of connections (a load
    balancer's or a client pool's) is spread over the workers instead of landing on one.
    """
    read = port.doRead

    def do_read_one() -> Any:
        port.numberAccepts = 1
        return read()

    port.doRead = do_read_one
