"""A tiny UDP name server on 127.0.0.1 for tests: answers from a table, says NXDOMAIN for
other names, and never answers names it is told to hang on (a hostile or broken server)."""

from __future__ import annotations

from twisted.internet import protocol
from twisted.names import dns


class TinyNameServer(protocol.DatagramProtocol):
    def __init__(self, records: dict[str, list[str]] | None = None, hang: tuple[str, ...] = (), ttl: int = 300):
        self.records = records or {}
        self.hang = hang  # names ending in one of these suffixes get no answer, ever
        self.ttl = ttl
        self.queries: list[tuple[str, int]] = []  # (name, type) of every query received
        self.answered = 0
        self.port = 0

    def names(self) -> set[str]:
        return {name for name, _ in self.queries}

    def datagramReceived(self, data: bytes, address) -> None:
        message = dns.Message()
        message.fromStr(data)
        query = message.queries[0]
        name = query.name.name.decode("ascii").lower()
        self.queries.append((name, query.type))
        if any(name.endswith(suffix) for suffix in self.hang):
            return
        message.answer = 1
        message.recAv = 1
        if name not in self.records:
            message.rCode = dns.ENAME
        for value in self.records.get(name, []):
            if ":" in value and query.type == dns.AAAA:
                message.answers.append(dns.RRHeader(name, dns.AAAA, ttl=self.ttl,
                                                    payload=dns.Record_AAAA(value, self.ttl)))
            elif ":" not in value and query.type == dns.A:
                message.answers.append(dns.RRHeader(name, dns.A, ttl=self.ttl, payload=dns.Record_A(value, self.ttl)))
        self.answered += 1
        self.transport.write(message.toStr(), address)


def listen(reactor, server: TinyNameServer):
    """Listen on a free UDP port of 127.0.0.1; returns the listening port (stopListening at the end)."""
    port = reactor.listenUDP(0, server, interface="127.0.0.1")
    server.port = port.getHost().port
    return port
