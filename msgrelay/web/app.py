"""The browser client's static files at `/app/` (docs/web-client.md).

The files are read once at start-up (a few tens of kilobytes), so serving them never
touches the disk on the reactor thread. Every answer carries a strict Content-Security-Policy:
scripts and styles only from this origin, no inline code, no framing, and network requests
only to this origin or to relays the person names (https, or http on loopback for development).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from ..wire.errors import ProtocolError
from .responses import info_base, write_error

STATIC_ROOT = Path(__file__).resolve().parent.parent / "webapp" / "static"
PREFIX = b"/app/"

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    # The app talks to this relay and to any other relay a person names (every relay answers CORS).
    "connect-src 'self' https: http://127.0.0.1:* http://localhost:*",
    "object-src 'none'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
    "form-action 'self'",
])

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
    ".webmanifest": "application/manifest+json",
}


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


def load_static(root: Path = STATIC_ROOT) -> dict[bytes, StaticFile]:
    """Every servable file under `root`, keyed by its URL path below /app/."""
    files: dict[bytes, StaticFile] = {}
    for path in sorted(root.rglob("*")):
        content_type = CONTENT_TYPES.get(path.suffix)
        if not path.is_file() or content_type is None:
            continue
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        files[PREFIX + path.relative_to(root).as_posix().encode()] = StaticFile(body, content_type, etag)
    return files


class StaticResource(Resource):
    """One file: GET and HEAD, revalidated by ETag (no build step means no hashed names)."""

    isLeaf = True

    def __init__(self, file: StaticFile, errors_url: Optional[str] = None):
        super().__init__()
        self.file = file
        self.errors_url = errors_url

    def render(self, request: IRequest) -> bytes:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader("Allow", "GET, HEAD")
            error = ProtocolError(133, "the web client's files answer only GET and HEAD")
            return write_error(request, error, info_base(request, self.errors_url))
        request.setHeader("Cache-Control", "no-cache")
        request.setHeader("ETag", self.file.etag)
        request.setHeader("Content-Type", self.file.content_type)
        if self.file.etag in (request.getHeader("if-none-match") or ""):
            request.setResponseCode(304)
            return b""
        request.setHeader("Content-Length", str(len(self.file.body)))
        return b"" if request.method == b"HEAD" else self.file.body


class RedirectToApp(Resource):
    """`/app` -> `/app/`, so that the page's relative module paths resolve."""

    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        request.setResponseCode(301)
        request.setHeader("Location", "/app/")
        request.setHeader("Content-Type", "text/plain; charset=utf-8")
        return b"The web client is at /app/\n"


def web_client_routes(errors_url: Optional[str] = None) -> dict[bytes, Resource]:
    """Exact-path routes for `RelaySite.routes`: every file, `/app/` itself and `/app`."""
    files = load_static()
    routes: dict[bytes, Resource] = {path: StaticResource(f, errors_url) for path, f in files.items()}
    routes[PREFIX] = routes[PREFIX + b"index.html"]
    routes[b"/app"] = RedirectToApp()
    return routes
