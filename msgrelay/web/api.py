"""The HTTP API of docs/protocol.md section 5: a thin Klein layer over `RelayCore`.

Handlers parse parameters, call one core operation and answer JSON; every failure goes
through `handle_errors` into the section 9 error body.
"""

from __future__ import annotations


from typing import Any, Callable, Mapping, Optional

from klein import Klein
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound

from ..ratelimit import RateLimits
from ..relay import MAX_ACK_IDS, MAX_FETCH_LIMIT, RelayCore, check_push_endpoint
from ..store.interface import UserRecord
from ..wire.canonical import parse_json_object
from ..wire.errors import ProtocolError, malformed
from ..wire.signing import INT, STR, STR_LIST, SignedRequest, parse_signed_body, parse_signed_query
from .errors_page import ERRORS_MARKDOWN, ERRORS_PAGE
from .responses import info_base, shown_path, write_error, write_json
from .site import request_client_host

log = Logger()

Spec = Mapping[str, tuple[str, bool]]


def _query(request: IRequest) -> dict[str, list[str]]:
    try:
        return {k.decode("utf-8"): [v.decode("utf-8") for v in vs] for k, vs in (request.args or {}).items()}
    except UnicodeDecodeError:
        raise malformed("query string is not valid UTF-8")


def _body(request: IRequest) -> dict[str, Any]:
    """The JSON object body of a POST, PUT or DELETE; parameters never travel in its query."""
    if request.args:
        raise malformed(f"{request.method.decode()} parameters belong in a JSON body, not in the query string")
    request.content.seek(0)
    return parse_json_object(request.content.read())


class RelayAPI:
    """The `/api/v1` endpoints of one relay."""

    app = Klein()

    def __init__(self, core: RelayCore, limits: Optional[RateLimits] = None):
        self.core = core
        self.limits = limits  # None: no rate limits (msgrelay/ratelimit.py)

    def _limit_address(self, name: str, request: IRequest) -> None:
        """Per-address limit, checked before any expensive work (RSA decryption, storage)."""
        if self.limits is not None:
            self.limits.check_address(name, request_client_host(request))

    def _user_limit(self, name: str) -> Optional[Callable[[str], None]]:
        """The per-user limit `name`, for `authenticate` to check (with the user's id) once the
        signature verified."""
        limits = self.limits
        if limits is None:
            return None
        return lambda user_id: limits.check_user(name, user_id)

    # -- plumbing ----------------------------------------------------------------

    def _parse_signed(self, request: IRequest, spec: Spec) -> SignedRequest:
        if request.method == b"GET":
            return parse_signed_query(_query(request), spec)
        return parse_signed_body(_body(request), spec)

    async def _authenticate(self, request: IRequest, signed: SignedRequest, limit: str) -> UserRecord:
        """Authenticate, checking the per-user rate limit `limit` before any durable write."""
        return await self.core.authenticate(
            signed, request.method.decode("ascii"), request.path.decode("utf-8"), self._user_limit(limit)
        )

    async def _signed(self, request: IRequest, spec: Spec, limit: str) -> tuple[SignedRequest, UserRecord]:
        signed = self._parse_signed(request, spec)
        return signed, await self._authenticate(request, signed, limit)

    @app.handle_errors(ProtocolError)
    def _protocol_error(self, request: IRequest, failure: Any) -> bytes:
        return write_error(request, failure.value, info_base(request, self.core.settings.server.errors_url))

    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Any) -> bytes:
        error = ProtocolError(132, f"no endpoint {shown_path(request.path)} on this relay")
        return write_error(request, error, info_base(request, self.core.settings.server.errors_url))

    @app.handle_errors(MethodNotAllowed)
    def _bad_method(self, request: IRequest, failure: Any) -> bytes:
        allowed = sorted(set(failure.value.valid_methods or []) | {"OPTIONS"})
        request.setHeader("Allow", ", ".join(allowed))
        error = ProtocolError(133, f"{request.method.decode()} is not allowed here; use {', '.join(allowed)}")
        return write_error(request, error, info_base(request, self.core.settings.server.errors_url))

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Any) -> bytes:
        log.failure("unexpected error on {method} {path}", failure,
                    method=request.method.decode(), path=shown_path(request.path))
        error = ProtocolError(999, "the relay failed unexpectedly; the operator's log has the details")
        return write_error(request, error, info_base(request, self.core.settings.server.errors_url))

    # -- server ------------------------------------------------------------------

    @app.route("/api/v1/server", methods=["GET"])
    def server(self, request: IRequest) -> bytes:
        return write_json(request, self.core.server_info())

    @app.route("/api/v1/health", methods=["GET"])
    async def health(self, request: IRequest) -> bytes:
        return write_json(request, await self.core.health())

    @app.route("/errors", methods=["GET"])
    def errors_page(self, request: IRequest) -> bytes:
        """HTML for browsers (the `info` anchors); markdown for `Accept: text/markdown`."""
        if b"text/markdown" in (request.getHeader(b"accept") or b""):
            return self.errors_markdown(request)
        request.setHeader("Content-Type", "text/html; charset=utf-8")
        return ERRORS_PAGE

    @app.route("/errors.md", methods=["GET"])
    def errors_markdown(self, request: IRequest) -> bytes:
        request.setHeader("Content-Type", "text/markdown; charset=utf-8")
        return ERRORS_MARKDOWN

    # -- users -------------------------------------------------------------------

    @app.route("/api/v1/user", methods=["POST"])
    async def register(self, request: IRequest) -> bytes:
        self._limit_address("register", request)
        return write_json(request, await self.core.register(_body(request)))

    @app.route("/api/v1/user", methods=["GET"])
    async def own_account(self, request: IRequest) -> bytes:
        _, user = await self._signed(request, {}, "account")
        return write_json(request, await self.core.account(user))

    @app.route("/api/v1/user", methods=["PUT"])
    async def update_user(self, request: IRequest) -> bytes:
        signed = self._parse_signed(request, {"push_endpoint": (STR, True)})
        check_push_endpoint(signed.own["push_endpoint"])  # its shape is checked first (100), like every shape
        user = await self._authenticate(request, signed, "account")
        return write_json(request, await self.core.set_push_endpoint(user, signed.own["push_endpoint"]))

    @app.route("/api/v1/user", methods=["DELETE"])
    async def delete_user(self, request: IRequest) -> bytes:
        _, user = await self._signed(request, {}, "account")
        return write_json(request, await self.core.delete_user(user))

    @app.route("/api/v1/user/<user_id>", methods=["GET"])
    async def lookup_user(self, request: IRequest, user_id: str) -> bytes:
        return write_json(request, await self.core.lookup_user(user_id))

    # -- tokens ------------------------------------------------------------------

    @app.route("/api/v1/token", methods=["POST"])
    async def mint_token(self, request: IRequest) -> bytes:
        signed = self._parse_signed(request, {"expires_in": (INT, False), "label": (STR, False)})
        expires_in, label = signed.own.get("expires_in"), signed.own.get("label")
        self.core.check_token_request(expires_in, label)
        user = await self._authenticate(request, signed, "token")
        return write_json(request, await self.core.mint_token(user, expires_in, label))

    @app.route("/api/v1/token", methods=["GET"])
    async def list_tokens(self, request: IRequest) -> bytes:
        _, user = await self._signed(request, {}, "token_manage")
        return write_json(request, await self.core.list_tokens(user))

    @app.route("/api/v1/token", methods=["DELETE"])
    async def revoke_token(self, request: IRequest) -> bytes:
        signed = self._parse_signed(request, {"token": (STR, False), "id": (STR, False)})
        if ("token" in signed.own) == ("id" in signed.own):
            raise malformed("give exactly one of token or id")
        user = await self._authenticate(request, signed, "token_manage")
        return write_json(request, await self.core.revoke_token(user, signed.own.get("token"), signed.own.get("id")))

    # -- messages ----------------------------------------------------------------

    @app.route("/api/v1/message", methods=["POST"])
    async def send_message(self, request: IRequest) -> bytes:
        self._limit_address("send", request)
        forwarded_by = request.getHeader("MsgRelay-Forwarded-By")
        return write_json(request, await self.core.accept_message(_body(request), forwarded_by))

    @app.route("/api/v1/message", methods=["GET"])
    async def fetch_messages(self, request: IRequest) -> bytes:
        signed = self._parse_signed(request, {"limit": (INT, False)})
        limit = signed.own.get("limit")
        if limit is not None and not 1 <= limit <= MAX_FETCH_LIMIT:
            raise malformed(f"limit must be between 1 and {MAX_FETCH_LIMIT}")
        answer = await self.core.signed_fetch(signed, request.method.decode("ascii"), request.path.decode("utf-8"),
                                              limit, self._user_limit("fetch"))
        return write_json(request, answer)

    @app.route("/api/v1/message", methods=["DELETE"])
    async def acknowledge(self, request: IRequest) -> bytes:
        signed = self._parse_signed(request, {"ids": (STR_LIST, True)})
        if len(signed.own["ids"]) > MAX_ACK_IDS:
            raise malformed(f"ids holds more than {MAX_ACK_IDS} message ids; acknowledge in batches")
        answer = await self.core.signed_acknowledge(signed, request.method.decode("ascii"),
                                                    request.path.decode("utf-8"), signed.own["ids"],
                                                    self._user_limit("ack"))
        return write_json(request, answer)


def allowed_methods(api: RelayAPI, path: str) -> list[str]:
    """Methods routed for `path` (for OPTIONS preflights); empty for an unknown path."""
    adapter = api.app.url_map.bind("relay")
    try:
        return sorted(adapter.allowed_methods(path))
    except Exception:
        return []



