"""One test per private Twisted name msgrelay relies on (msgrelay/twisted_compat.py).

If a Twisted release renames or changes one of them, the matching test fails here, by
name, rather than a timeout or a 413 quietly misbehaving in production.
"""

from __future__ import annotations

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource

from msgrelay import twisted_compat as compat


class Held(Resource):
    """Answers only when the test says so."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.waiting = []

    def render(self, request):
        self.waiting.append(request)
        return server.NOT_DONE_YET


def channel_on(clock):
    resource = Held()
    site = server.Site(resource, reactor=clock)
    site.protocol = HTTPChannel  # as RelaySite does (through RelayChannel)
    channel = site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport, resource


def test_request_line_is_known_before_the_request_object():
    channel, _, _ = channel_on(task.Clock())
    assert compat.request_line(channel) == (None, None)
    channel.dataReceived(b"POST /api/v1/message?x=1 HTTP/1.1\r\nHost: relay.test\r\n")
    assert compat.request_line(channel) == (b"POST", b"/api/v1/message?x=1")


def test_handling_request_is_true_while_an_answer_is_pending():
    channel, _, resource = channel_on(task.Clock())
    assert compat.is_handling_request(channel) is False
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n")
    assert resource.waiting and compat.is_handling_request(channel) is True
    resource.waiting.pop().finish()
    assert compat.is_handling_request(channel) is False


def test_buffered_input_shows_a_partial_request_line():
    channel, _, _ = channel_on(task.Clock())
    assert compat.has_buffered_input(channel) is False
    channel.dataReceived(b"GET /slo")
    assert compat.has_buffered_input(channel) is True


def test_abort_later_aborts_and_is_cancelled_by_a_lost_connection():
    clock = task.Clock()
    channel, transport, _ = channel_on(clock)
    compat.abort_later(channel, 15)
    clock.advance(15)
    assert transport.disconnecting  # forceAbortClient ran
    channel, transport, _ = channel_on(clock)
    compat.abort_later(channel, 15)
    channel.connectionLost(Failure(ConnectionError("gone")))
    clock.advance(15)
    assert not transport.disconnecting  # the abort was cancelled with the connection


def test_listen_errors_are_raised_synchronously():
    class Refusing:
        def listen(self, factory):
            return defer.fail(CannotListenError("127.0.0.1", 1, OSError("address in use")))

    service = StreamServerEndpointService(Refusing(), server.Site(Resource()))
    compat.raise_listen_errors_synchronously(service)
    with pytest.raises(CannotListenError):
        service.privilegedStartService()


def test_twisted_is_a_tested_major_version():
    import twisted

    assert twisted.__version__.split(".")[0] == compat.TESTED_TWISTED, (
        "a new Twisted major version: run tests/test_twisted_compat.py, then raise setup.py's bound")


def test_an_ssl_endpoint_keeps_the_tls_context_it_built(tmp_path):
    from cryptography import x509
    from OpenSSL.SSL import Context
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.interfaces import IOpenSSLContextFactory

    from tlsfiles import make_ca_and_server_cert

    _, key_path, cert_path = make_ca_and_server_cert(tmp_path, "localhost")
    endpoint = serverFromString(reactor, f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}")
    context = compat.server_tls_context(endpoint)
    assert IOpenSSLContextFactory.providedBy(context) and isinstance(context.getContext(), Context)
    serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
    assert context.certificate.get_serial_number() == serial  # the certificate of the description


def _port_with_pending_connections(count):
    """A real listening port on loopback (not yet read from) with `count` connections
    waiting in its accept queue, and the list its factory fills with accepted protocols."""
    import socket

    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    accepted = []

    class Counting(Factory):
        def buildProtocol(self, addr):
            protocol = Protocol()
            accepted.append(protocol)
            return protocol

    port = reactor.listenTCP(0, Counting(), interface="127.0.0.1")
    port.stopReading()  # only the test reads from it
    clients = [socket.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(count)]
    return port, accepted, clients


def _close(port, accepted, clients):
    for protocol in accepted:
        protocol.transport.stopReading()
        protocol.transport.stopWriting()
        protocol.transport.socket.close()
    for client in clients:
        client.close()
    port.socket.close()


def test_a_port_accepts_a_burst_in_one_read_and_one_per_wakeup_after_the_change():
    port, accepted, clients = _port_with_pending_connections(3)
    try:
        port.doRead()  # Twisted's own behaviour: the whole waiting burst in one wake-up
        assert len(accepted) == 3
    finally:
        _close(port, accepted, clients)
    port, accepted, clients = _port_with_pending_connections(3)
    try:
        compat.accept_one_per_wakeup(port)
        for expected in (1, 2, 3):
            port.doRead()
            assert len(accepted) == expected
    finally:
        _close(port, accepted, clients)
