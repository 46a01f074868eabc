"""Check a real answer of the relay against docs/openapi.yaml (status, headers, body schema).

Shared by tests/test_openapi.py and the schemathesis hooks in tests/fuzz_hooks.py.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from msgrelay.wire.errors import ERRNOS

SPEC_PATH = Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml"
_ROOT = "urn:msgrelay:openapi"


@lru_cache(maxsize=1)
def spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _registry() -> Registry:
    return Registry().with_resource(_ROOT, Resource.from_contents(spec(), default_specification=DRAFT202012))


def _pointer(*parts: str) -> str:
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def _resolve(obj: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Follow a local `$ref` to a components entry; the object and its JSON pointer."""
    ref = obj["$ref"]
    node: Any = spec()
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node, ref.removeprefix("#")


def template_for(path: str) -> Optional[str]:
    """The spec's path template matching a concrete request path, if any."""
    for template in spec()["paths"]:
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            return template
    return None


def operation(method: str, path: str) -> Optional[dict[str, Any]]:
    template = template_for(path)
    return None if template is None else spec()["paths"][template].get(method.lower())


def problems(method: str, path: str, status: int, header: Callable[[str], Optional[str]],
             content_type: Optional[str], body: Any) -> list[str]:
    """Every way the answer departs from the spec; empty when it conforms.

    `header(name)` gives a response header (case-insensitive) or None.
    """
    template = template_for(path)
    if template is None:
        return _generic_error(status, body, expected_errno=132)
    op = spec()["paths"][template].get(method.lower())
    if op is None:
        found = _generic_error(status, body, expected_errno=133)
        if status == 405 and not header("Allow"):
            found.append("405 without an Allow header")
        return found
    responses = op["responses"]
    key = str(status)
    if key not in responses:
        return [f"{method} {template}: status {status} is not documented (body {body!r:.200})"]
    response = responses[key]
    pointer = _pointer("", "paths", template, method.lower(), "responses", key)
    if "$ref" in response:
        response, pointer = _resolve(response)
    found = []
    for name, spec_header in (response.get("headers") or {}).items():
        if "$ref" in spec_header:
            spec_header, _ = _resolve(spec_header)
        value = header(name)
        if value is None:
            if spec_header.get("required"):
                found.append(f"{method} {template} {status}: header {name} is missing")
            continue
        found += [f"{method} {template} {status}: header {name}={value!r}: {e.message}"
                  for e in _validator(spec_header["schema"]).iter_errors(value)]
    content = response.get("content")
    if not content:
        return found
    media = (content_type or "").split(";")[0].strip()
    if media not in content:
        return found + [f"{method} {template} {status}: content type {content_type!r} is not one of {sorted(content)}"]
    schema_pointer = pointer + "/" + _pointer("content", media, "schema")
    validator = Draft202012Validator({"$ref": f"{_ROOT}#{schema_pointer}"}, registry=_registry())
    found += [f"{method} {template} {status}: {'/'.join(map(str, e.absolute_path)) or 'body'}: {e.message}"
              for e in validator.iter_errors(body)]
    return found


def schema_problems(name: str, value: Any) -> list[str]:
    """Errors of `value` against `#/components/schemas/<name>` (e.g. a fetched ServerMessage)."""
    validator = Draft202012Validator({"$ref": f"{_ROOT}#/components/schemas/{name}"}, registry=_registry())
    return [f"{name}: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(value)]


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator(schema, registry=_registry())


def _generic_error(status: int, body: Any, expected_errno: int) -> list[str]:
    found = schema_problems("Error", body)
    if isinstance(body, dict) and body.get("errno") != expected_errno:
        found.append(f"expected errno {expected_errno}, got {body.get('errno')}")
    return found


def section9_problems(status: int, content_type: Optional[str], body: Any) -> list[str]:
    """A refusal must be a JSON error body with a known errno matching its status."""
    if status < 400:
        return []
    if not (content_type or "").startswith("application/json"):
        return [f"{status} answered with content type {content_type!r}, not JSON: {body!r:.200}"]
    found = schema_problems("Error", body)
    if not found and (body["errno"] not in ERRNOS or ERRNOS[body["errno"]][0] != status or body["code"] != status):
        found.append(f"{status} with errno {body['errno']} and code {body['code']}, which section 9 does not pair")
    return found
