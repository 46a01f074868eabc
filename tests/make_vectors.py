"""Generate the client's fixed test vectors in tests/vectors/ (run once; the output is checked in).

    /work/venv/bin/python tests/make_vectors.py

The keys are test-only keys. Expected signature bases are written out by hand below and
compared with what the wire layer computes before anything is saved, so a vector is never
just "whatever the code printed". Sealed envelopes and PSS signatures are randomised, so
for them the vector is one fixed output that the tests must decrypt or verify.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msgrelay.client.identity import Identity  # noqa: E402
from msgrelay.client.messages import (  # noqa: E402
    RAW_DATA, RAW_MESSAGE, TOKEN_REQUEST, build_message, file_data, message_ref, seal_message,
    text_data, token_request_data,
)
from msgrelay.wire.envelope import AES_GCM, CHACHA, seal  # noqa: E402
from msgrelay.wire.keys import public_key_pem  # noqa: E402
from msgrelay.wire.signing import sign_params, signature_base  # noqa: E402

OUT = Path(__file__).resolve().parent / "vectors"
SERVER = "relay.example.org:8443"


def private_pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


def key_entry(key: rsa.RSAPrivateKey) -> dict:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.sha256(der).digest()
    return {
        "bits": key.key_size,
        "private_key": private_pem(key),
        "public_key": public_key_pem(key.public_key()),
        # Computed here straight from section 2, not through msgrelay.wire.keys:
        "user_id": base64.b32encode(digest[:20]).decode("ascii").lower(),
        "fingerprint": digest.hex(),
    }


# Signature bases: parameters, and the exact bytes section 4 says the base must be.
BASES = [
    {
        "comment": "GET /message from a query string: validity and limit are integers, the rest strings",
        "method": "get",
        "path": "/api/v1/message",
        "params": {"user_id": "aaaabbbbccccddddeeeeffffgggghhhh", "date": "2026-11-22T10:15:00Z", "validity": 60, "limit": 10},
        "base": '{"date":"2026-11-22T10:15:00Z","limit":10,"method":"GET","path":"/api/v1/message",'
        '"server":"relay.example.org:8443","user_id":"aaaabbbbccccddddeeeeffffgggghhhh","validity":60}',
    },
    {
        "comment": "DELETE /message with a list in a JSON body",
        "method": "DELETE",
        "path": "/api/v1/message",
        "params": {"user_id": "aaaabbbbccccddddeeeeffffgggghhhh", "date": "2026-11-22T10:15:00Z", "validity": 300,
                   "ids": ["m-1", "m.2", "m_3"]},
        "base": '{"date":"2026-11-22T10:15:00Z","ids":["m-1","m.2","m_3"],"method":"DELETE","path":"/api/v1/message",'
        '"server":"relay.example.org:8443","user_id":"aaaabbbbccccddddeeeeffffgggghhhh","validity":300}',
    },
    {
        "comment": "non-ASCII stays unescaped UTF-8 (accents, CJK, an astral emoji)",
        "method": "POST",
        "path": "/api/v1/token",
        "params": {"user_id": "aaaabbbbccccddddeeeeffffgggghhhh", "date": "2026-11-22T10:15:00Z", "validity": 60,
                   "label": "Zoë 日本 \U0001F600", "expires_in": 0},
        "base": '{"date":"2026-11-22T10:15:00Z","expires_in":0,"label":"Zoë 日本 \U0001F600","method":"POST",'
        '"path":"/api/v1/token","server":"relay.example.org:8443","user_id":"aaaabbbbccccddddeeeeffffgggghhhh",'
        '"validity":60}',
    },
    {
        "comment": "control characters: short escapes for \\b\\f\\n\\r\\t, \\u00xx (lower-case hex) for others, DEL raw",
        "method": "POST",
        "path": "/api/v1/token",
        "params": {"user_id": "aaaabbbbccccddddeeeeffffgggghhhh", "date": "2026-11-22T10:15:00Z", "validity": 60,
                   "label": 'q"b\\\b\f\n\r\t\x00\x01\x1f\x7f\u2028end'},
        "base": '{"date":"2026-11-22T10:15:00Z","label":"q\\"b\\\\\\b\\f\\n\\r\\t\\u0000\\u0001\\u001f\x7f\u2028end",'
        '"method":"POST","path":"/api/v1/token","server":"relay.example.org:8443",'
        '"user_id":"aaaabbbbccccddddeeeeffffgggghhhh","validity":60}',
    },
    {
        "comment": "PUT /user clearing the push endpoint: an empty string is still a parameter",
        "method": "PUT",
        "path": "/api/v1/user",
        "params": {"user_id": "aaaabbbbccccddddeeeeffffgggghhhh", "date": "2026-11-22T10:15:00.5+00:00", "validity": 1,
                   "push_endpoint": ""},
        "base": '{"date":"2026-11-22T10:15:00.5+00:00","method":"PUT","path":"/api/v1/user","push_endpoint":"",'
        '"server":"relay.example.org:8443","user_id":"aaaabbbbccccddddeeeeffffgggghhhh","validity":1}',
    },
]


def main() -> None:
    OUT.mkdir(exist_ok=True)
    alice = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bob = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    keys = {"alice": key_entry(alice), "bob": key_entry(bob)}

    envelopes = []
    for algorithm in (AES_GCM, CHACHA):
        for name, key in (("alice", alice), ("bob", bob)):
            plaintext = json.dumps({"hello": name, "algorithm": algorithm, "text": "Grüße ✓"}, ensure_ascii=False)
            envelopes.append({"recipient": name, "plaintext": plaintext,
                              "envelope": seal(key.public_key(), plaintext.encode("utf-8"), algorithm)})

    bases = []
    for case in BASES:
        computed = signature_base(case["params"], case["method"], case["path"], SERVER)
        assert computed == case["base"].encode("utf-8"), (case["comment"], computed, case["base"])
        signed = sign_params(alice, case["params"], case["method"], case["path"], SERVER)
        bases.append({**case, "server": SERVER, "base_hex": computed.hex(), "signer": "alice",
                      "signature": signed["signature"]})

    a, b = Identity(alice, "relay-a.example.org"), Identity(bob, "relay-b.example.org:8443")
    samples = [
        build_message(a, b.address, RAW_MESSAGE, text_data("Hello Bob, ça va? 🙂\nline two", None, "Alice"), 1795342500),
        build_message(a, b.address, RAW_DATA, file_data(bytes(range(256))), 1795342501),
        build_message(a, b.address, TOKEN_REQUEST, token_request_data(a.address, "tok_ABCDEFGHIJKLMNOPQRSTUV"), 1795342502),
    ]
    samples.append(build_message(b, a.address, RAW_MESSAGE, text_data("Hi Alice", message_ref(samples[0]), "Bob"), 1795342503))
    messages = []
    for obj in samples:
        recipient = "bob" if obj["to"] == b.address else "alice"
        messages.append({"recipient": recipient, "recipient_server": (b if recipient == "bob" else a).server_name,
                         "message": obj, "ref": message_ref(obj),
                         "sealed": {"id": f"m{len(messages)}", "token": "0123456789abcdef",
                                    **seal_message((bob if recipient == "bob" else alice).public_key(), obj)}})

    for name, value in (("keys", keys), ("envelopes", envelopes), ("signature_bases", bases), ("messages", messages)):
        (OUT / f"{name}.json").write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {', '.join(sorted(p.name for p in OUT.glob('*.json')))} to {OUT}")


if __name__ == "__main__":
    main()
