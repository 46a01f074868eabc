"""schemathesis hooks for fuzzing a real relay with docs/openapi.yaml (tests/test_fuzz_openapi.py).

Loaded by `st run` through SCHEMATHESIS_HOOKS=fuzz_hooks (with tests/ on PYTHONPATH).

Without help, every signed request schemathesis generates fails at the signature, so only
the shape checks would be fuzzed. Here three of every four positive (schema-valid) cases of
a signed operation are signed for real, as the fuzz user, over whatever parameters were
generated, and three of four positive `POST /message` cases carry a genuine packet for the
fuzz user, built from the generated values. Negative (schema-violating) cases go out
unchanged, so the shape checks are fuzzed thoroughly too.

Nothing leaves loopback: a generated push endpoint is replaced by one on 127.0.0.1, which the
relay's address guard refuses to call, and federation stays off.

The custom check `section9_error` holds every answer to docs/protocol.md section 9: a
refusal is a JSON error body whose errno matches its status; `no_server_error` allows no 5xx
but the protocol's 507 errno 160.

Environment (set by the test): MSGRELAY_FUZZ_URL, MSGRELAY_FUZZ_KEY (PEM private key of the
registered fuzz user), MSGRELAY_FUZZ_TOKEN (an access token of that user).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from functools import lru_cache
from typing import Any

import schemathesis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from apiclient import RequestBuilder, User, sync_request
from msgrelay.wire.envelope import seal
from openapi_check import section9_problems

SIGNED = {("GET", "/api/v1/user"), ("PUT", "/api/v1/user"), ("DELETE", "/api/v1/user"),
          ("POST", "/api/v1/token"), ("GET", "/api/v1/token"), ("DELETE", "/api/v1/token"),
          ("GET", "/api/v1/message"), ("DELETE", "/api/v1/message")}
LOOPBACK_PUSH = "https://127.0.0.1:9/fuzz"


@lru_cache(maxsize=1)
def fuzz_user() -> User:
    pem = os.environ["MSGRELAY_FUZZ_KEY"].encode("ascii")
    return User(serialization.load_pem_private_key(pem, None))


@lru_cache(maxsize=1)
def builder() -> RequestBuilder:
    url = os.environ["MSGRELAY_FUZZ_URL"]
    info = sync_request("GET", url + "/api/v1/server").body
    return RequestBuilder(url, info["name"], info["key"])


@lru_cache(maxsize=1)
def throwaway() -> User:
    """The account `DELETE /user` erases (registered again before each such case)."""
    return User(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def _chosen(case: Any) -> bool:
    """A fixed three quarters of positive cases, decided by their content (reproducible)."""
    meta = getattr(case, "meta", None)
    if meta is not None and meta.generation.mode.is_negative:
        return False
    seed = json.dumps([case.method, case.path, case.query, case.body], sort_keys=True, default=str)
    return hashlib.sha256(seed.encode()).digest()[0] % 4 != 0


def _sign(case: Any, user: User) -> None:
    method, path = case.method.upper(), case.path
    source = case.query if method == "GET" else case.body
    own = {k: v for k, v in (source or {}).items() if k not in ("user_id", "date", "signature")}
    validity = own.pop("validity", 60)
    if path == "/api/v1/user" and method == "PUT" and own.get("push_endpoint"):
        own["push_endpoint"] = LOOPBACK_PUSH
    try:
        params = builder().signed_params(user, method, path, validity=validity, **own)
    except ValueError:  # e.g. 1.0, an "integer" to JSON Schema: the relay refuses it unsigned (100)
        return
    if method == "GET":
        case.query = {k: str(v) for k, v in params.items()}
    else:
        case.body = params


def _packet(case: Any) -> None:
    """A genuine packet for the fuzz user, its content and algorithm taken from the case."""
    generated = case.body if isinstance(case.body, dict) else {}
    content = json.dumps(generated, default=str).encode()
    inner = seal(fuzz_user().key.public_key(), content)
    packet = {"id": uuid.uuid4().hex, "user_id": fuzz_user().user_id, "token": os.environ["MSGRELAY_FUZZ_TOKEN"],
              **inner, "ttl": 1 + len(content)}
    algorithm = generated.get("algorithm")
    outer = algorithm if algorithm in ("AES-256-GCM", "CHACHA20-POLY1305") else "AES-256-GCM"
    case.body = seal(builder().server_key, json.dumps(packet).encode(), outer)


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    method, path = case.method.upper(), case.path
    if not _chosen(case):
        return
    if (method, path) in SIGNED:
        user = fuzz_user()
        if (method, path) == ("DELETE", "/api/v1/user"):
            user = throwaway()
            sync_request("POST", builder().url + "/api/v1/user", json.dumps({"key": user.pem}).encode())
        _sign(case, user)
    elif (method, path) == ("POST", "/api/v1/message"):
        _packet(case)


@schemathesis.check
def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """No 5xx, except 507 errno 160: the protocol's own answer for a full quota (section 9).

    schemathesis' `not_a_server_error` counts that 507 as a crash; a long run fills the fuzz
    user's token cap and meets it.
    """
    if response.status_code < 500:
        return None
    if response.status_code == 507:
        try:
            if json.loads(response.content).get("errno") == 160:
                return None
        except ValueError:
            pass
    raise AssertionError(f"server error {response.status_code}: {response.content[:300]!r}")


@schemathesis.check
def section9_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every refusal is a JSON error body with a section 9 errno matching its status."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [None])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    try:
        body: Any = json.loads(response.content)
    except ValueError:
        body = response.content[:200]
    found = section9_problems(response.status_code, content_type, body)
    if found:
        raise AssertionError("; ".join(found))
    return None
