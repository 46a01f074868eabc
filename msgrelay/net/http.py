"""The one treq client factory (client and relay), and one way to describe a transport failure."""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from treq.client import HTTPClient


def tls_policy(trust_root: Any = None) -> BrowserLikePolicyForHTTPS:
    """Certificate chain and host name verification; `None` trusts the platform's roots."""
    return BrowserLikePolicyForHTTPS(trustRoot=trust_root)


def make_http_client(reactor: Any, *, trust_root: Any = None, endpoints: Any = None,
                     persistent: bool = True, per_host: int = 2) -> tuple[HTTPClient, Optional[HTTPConnectionPool]]:
    """A treq client verifying TLS, and its connection pool (to close at stop; None if not kept).

    `endpoints` chooses how hosts are reached (the relay's address guard); by default the
    Agent connects by name. Requests are never retried automatically: a POST that may have
    reached the other side is retried by its caller's queue, with the same packet, or not at all.
    """
    pool: Optional[HTTPConnectionPool] = None
    if persistent:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = per_host
        pool.retryAutomatically = False
    if endpoints is not None:
        agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
    else:
        agent = Agent(reactor, contextFactory=tls_policy(trust_root), pool=pool)
    return HTTPClient(agent), pool


def describe_failure(exc: BaseException) -> str:
    """One readable line for a transport failure (TLS errors are buried in `reasons`)."""
    if isinstance(exc, (CancelledError, net_error.TimeoutError, TimeoutError)):
        return f"timed out ({exc})" if str(exc) else "timed out"
    if isinstance(exc, net_error.ConnectionRefusedError):
        return "connection refused (is the relay running?)"
    if isinstance(exc, net_error.DNSLookupError):
        return "host name does not resolve"
    reasons = getattr(exc, "reasons", None)
    if reasons:
        texts = [_reason(getattr(reason, "value", reason)) for reason in reasons]
        return "; ".join(dict.fromkeys(texts))[:300]
    text = str(exc).strip()
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:300]


def _reason(value: BaseException) -> str:
    args = getattr(value, "args", ())
    if type(value).__module__.startswith("OpenSSL") and args and isinstance(args[0], list):
        details = ", ".join(str(item[-1]) for item in args[0] if item)
        return f"TLS handshake failed: {details or value}"
    if type(value).__name__ in ("VerificationError", "CertificateError"):
        return f"TLS certificate does not match the host name ({type(value).__name__}: {value})"
    return describe_failure(value)
