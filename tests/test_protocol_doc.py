"""docs/protocol.md is the project's protocol: it must cover what the code speaks.

Every errno the code can raise is in its error table (and in the errno reference served at
/errors), every route of the Klein app is in its endpoint table, and its worked examples are
what the wire layer computes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from msgrelay.web.api import RelayAPI
from msgrelay.wire.canonical import canonical_json
from msgrelay.wire.errors import ERRNOS
from msgrelay.wire.keys import fingerprint, load_public_key, public_key_der, user_id_for_key
from msgrelay.wire.signing import signature_base, verify_signature

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
ERRORS_MD = (ROOT / "msgrelay" / "web" / "errors.md").read_text(encoding="utf-8")
KEYS = json.loads((ROOT / "tests" / "vectors" / "keys.json").read_text(encoding="utf-8"))


def section(number: int) -> str:
    """The text of `## <number>.` up to the next `## ` heading."""
    match = re.search(rf"^## {number}\. .*?(?=^## |\Z)", DOC, re.S | re.M)
    assert match, f"docs/protocol.md has no section {number}"
    return match.group(0)


def doc_errnos() -> dict[int, int]:
    """errno -> status from the rows `| status | errno | ...` of section 9's table."""
    rows = re.findall(r"^\| (\d{3}) \| (\d{3}) \|", section(9), re.M)
    return {int(errno): int(status) for status, errno in rows}


def code_errnos() -> set[int]:
    """Every errno the package can raise: the table, ProtocolError(N...) calls, malformed()."""
    found = set(ERRNOS)
    for path in (ROOT / "msgrelay").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        found |= {int(n) for n in re.findall(r"ProtocolError\(\s*(\d+)", text)}
        if re.search(r"\bmalformed\(", text):
            found.add(100)
    return found


def test_code_errnos_are_found():
    """The scan itself works: it sees errnos raised only by call sites, not just the table."""
    assert {100, 106, 110, 130, 140, 999} <= code_errnos()


def test_every_errno_in_the_code_is_in_the_protocol_error_table():
    table = doc_errnos()
    missing = sorted(code_errnos() - set(table))
    assert not missing, f"errnos used in the code but missing from docs/protocol.md section 9: {missing}"
    for errno, status in table.items():
        assert errno in ERRNOS, f"docs/protocol.md lists errno {errno}, which the code does not know"
        assert ERRNOS[errno][0] == status, f"errno {errno}: status {status} in the doc, {ERRNOS[errno][0]} in the code"


def test_every_errno_in_the_code_is_in_the_errno_reference():
    anchors = {int(n) for n in re.findall(r'<a id="errno-(\d+)"></a>', ERRORS_MD)}
    headings = {int(n): int(s) for n, s in re.findall(r"^## (\d+): .*\((\d{3})\)$", ERRORS_MD, re.M)}
    missing = sorted(code_errnos() - anchors)
    assert not missing, f"errnos missing from msgrelay/web/errors.md: {missing}"
    for errno in code_errnos():
        assert headings.get(errno) == ERRNOS[errno][0], f"errors.md heading of errno {errno} has the wrong status"


def doc_endpoints() -> set[tuple[str, str]]:
    """(method, path) pairs of section 5's endpoint table."""
    rows = re.findall(r"^\| (GET|POST|PUT|DELETE) \| `([^`]+)` \|", section(5), re.M)
    return {(method, path) for method, path in rows}


def app_routes() -> set[tuple[str, str]]:
    """(method, path) of every rule of the Klein app, with `<name>` written `{name}`."""
    routes = set()
    for rule in RelayAPI.app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                routes.add((method, path))
    return routes


def test_every_route_of_the_app_is_in_the_protocol():
    routes = app_routes()
    assert ("POST", "/api/v1/message") in routes and ("GET", "/api/v1/user/{user_id}") in routes
    missing = sorted(routes - doc_endpoints())
    assert not missing, f"routes missing from docs/protocol.md section 5: {missing}"


def test_every_endpoint_of_the_protocol_is_routed():
    """The other direction: everything the doc promises is served (GET /user is revision 2)."""
    documented = {(m, p) for m, p in doc_endpoints() if p != "/metrics"}
    assert documented - app_routes() == set()


def example(name: str) -> list[str]:
    """The fenced code blocks following `<!-- example: name -->`, up to the next heading or marker."""
    match = re.search(rf"<!-- example: {name} -->(.*?)(?=<!-- example:|^#)", DOC, re.S | re.M)
    assert match, f"no example {name!r} in docs/protocol.md"
    return re.findall(r"```[a-z]*\n(.*?)```", match.group(1), re.S)


def test_example_user_id_and_fingerprint():
    (pem,) = example("key")
    key = load_public_key(pem)
    assert pem == KEYS["alice"]["public_key"]
    import hashlib

    digest = hashlib.sha256(public_key_der(key)).hexdigest()
    for value in (fingerprint(key), digest[:40], user_id_for_key(key)):
        assert f"`{value}`" in section(2)


def test_example_canonical_json():
    source, canonical = example("canonical")
    assert canonical_json(json.loads(source)).decode("utf-8") == canonical.strip()
    assert f"{len(canonical.strip())} characters ({len(canonical.strip().encode())} bytes" in DOC


def test_example_signed_fetch_base_and_query():
    from urllib.parse import parse_qs, urlsplit

    base, request = (block.strip() for block in example("signed-fetch"))
    query = parse_qs(urlsplit(request.split(" ", 1)[1]).query, strict_parsing=True)
    params = {name: values[0] for name, values in query.items()}
    params["validity"], params["limit"] = int(params["validity"]), int(params["limit"])
    assert signature_base(params, "GET", "/api/v1/message", "relay.example.org:8443").decode() == base
    key = load_public_key(KEYS["alice"]["public_key"])
    assert params["user_id"] == user_id_for_key(key)
    verify_signature(key, params["signature"], base.encode("utf-8"))


def test_example_key_transition_verifies():
    statement, signature = (block.strip() for block in example("transition"))
    old, new = (load_public_key(KEYS[name]["public_key"]) for name in ("alice", "bob"))
    expected = {"type": "msgrelay-key-transition", "server": "relay.example.org:8443",
                "from": fingerprint(old), "to": fingerprint(new), "date": "2026-11-27T09:00:00Z"}
    assert canonical_json(expected).decode() == statement
    verify_signature(old, signature, statement.encode("utf-8"))
    assert f"`{fingerprint(new)}`" in section(12) and f"`{user_id_for_key(new)}`" in section(12)


def test_example_error_body_is_what_the_code_writes():
    from msgrelay.wire.errors import ProtocolError

    (body,) = example("error")
    shown = json.loads(body)
    error = ProtocolError(shown["errno"], shown["message"])
    assert error.body("https://relay.example.org/errors") == shown


def test_private_vector_keys_match_their_public_halves():
    """Section 12 sends readers to tests/vectors/keys.json for the private halves."""
    for name in ("alice", "bob"):
        private = serialization.load_pem_private_key(KEYS[name]["private_key"].encode(), None)
        assert fingerprint(private.public_key()) == fingerprint(load_public_key(KEYS[name]["public_key"]))


def test_no_document_points_outside_the_repository_for_the_protocol():
    """A clone has no ../shared/PROTOCOL.md: README and docs link docs/protocol.md instead."""
    texts = [ROOT / "README.md", ROOT / "msgrelay" / "web" / "errors.md", ROOT / "etc" / "msgrelay.toml",
             *sorted((ROOT / "docs").glob("*.md"))]
    for path in texts:
        text = path.read_text(encoding="utf-8")
        assert "../shared" not in text, f"{path.name} points at ../shared"
        assert "protocol-decisions" not in text, f"{path.name} links the removed protocol-decisions.md"
        if path.name != "protocol.md":  # which explains what source comments citing it mean
            assert not re.search(r"(?<![/\w])PROTOCOL\.md", text), f"{path.name} names PROTOCOL.md"


def test_internal_links_point_at_headings():
    """Links like `#4-signed-requests` match a heading's GitHub anchor."""
    def slug(heading: str) -> str:
        text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
        return text.replace(" ", "-")

    anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", DOC, re.M)}
    links = set(re.findall(r"\]\(#([^)]+)\)", DOC))
    assert links and links <= anchors, sorted(links - anchors)
