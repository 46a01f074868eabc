"""msgrelay/net: the one trust-root loader and treq client factory, over real TLS sockets."""

from __future__ import annotations

import os
import socket

import pytest
import pytest_twisted
from twisted.internet import reactor, ssl
from twisted.web.resource import Resource
from twisted.web.server import Site

from msgrelay.control.server import peer_uid
from msgrelay.net.http import describe_failure, make_http_client
from msgrelay.net.trust import TrustRootError, load_certificates, load_trust_root
from tlsfiles import make_ca_and_server_cert

ensure = pytest_twisted.ensureDeferred


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"hello"


@pytest.fixture
def server(tmp_path):
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    ca_pem, key, cert = make_ca_and_server_cert(tmp_path / "one", "localhost")
    other_pem, _, _ = make_ca_and_server_cert(tmp_path / "two", "localhost")
    port = reactor.listenSSL(0, Site(Hello()), ssl.DefaultOpenSSLContextFactory(str(key), str(cert)),
                             interface="127.0.0.1")
    yield port.getHost().port, ca_pem, other_pem
    pytest_twisted.blockon(port.stopListening())


async def get(url: str, trust_root) -> bytes:
    http, pool = make_http_client(reactor, trust_root=trust_root, persistent=True)
    try:
        response = await http.get(url)
        return await response.content()
    finally:
        await pool.closeCachedConnections()


@ensure
async def test_a_bundle_of_several_cas_is_trusted_and_nothing_else(server, tmp_path):
    port, ca_pem, other_pem = server
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(other_pem + b"\n" + ca_pem)
    assert len(load_certificates(str(bundle))) == 2
    assert await get(f"https://localhost:{port}/", load_trust_root(str(bundle))) == b"hello"

    wrong = tmp_path / "wrong.pem"
    wrong.write_bytes(other_pem)
    with pytest.raises(Exception) as info:
        await get(f"https://localhost:{port}/", load_trust_root(str(wrong)))
    assert "TLS handshake failed" in describe_failure(info.value)


@pytest.mark.parametrize("content, says", [
    (None, "cannot read the CA file"),
    (b"not a certificate", "does not hold PEM certificates"),
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "does not hold PEM certificates"),
])
def test_unusable_ca_files_are_named(tmp_path, content, says):
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TrustRootError) as info:
        load_trust_root(str(path))
    assert says in str(info.value) and str(path) in str(info.value)


def test_the_control_socket_sees_who_connects():
    left, right = socket.socketpair(socket.AF_UNIX)
    try:
        assert peer_uid(left) == os.geteuid()
    finally:
        left.close()
        right.close()
    assert peer_uid(None) is None
