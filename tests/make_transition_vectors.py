"""Generate tests/vectors/transitions.json (run once; the output is checked in).

    .venv/bin/python tests/make_transition_vectors.py

Three test-only relay keys k0 -> k1 -> k2 and the two transitions between them. The signed
statement bytes are written out by hand below and compared with what the wire layer computes
before anything is saved. PSS signatures are randomised, so the signatures in the file are one
fixed output that the tests must verify.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msgrelay.wire.dates import parse_date  # noqa: E402
from msgrelay.wire.keys import fingerprint  # noqa: E402
from msgrelay.wire.transitions import sign_transition, statement  # noqa: E402

OUT = Path(__file__).resolve().parent / "vectors" / "transitions.json"
SERVER = "relay.example.org:8443"
DATES = ["2026-01-10T09:00:00Z", "2026-06-01T12:30:00Z"]


def main() -> None:
    keys = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)]
    fps = [fingerprint(k.public_key()) for k in keys]
    steps = []
    for i, date in enumerate(DATES):
        entry = sign_transition(keys[i], keys[i + 1].public_key(), SERVER, parse_date(date))
        expected = ('{"date":"%s","from":"%s","server":"%s","to":"%s","type":"msgrelay-key-transition"}'
                    % (date, fps[i], SERVER, fps[i + 1])).encode()
        assert statement(SERVER, fps[i], fps[i + 1], date) == expected
        steps.append({"entry": entry.to_json(), "statement": expected.decode()})
    vector = {
        "server": SERVER,
        "keys": [k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()).decode() for k in keys],
        "fingerprints": fps,
        "transitions": steps,
    }
    OUT.write_text(json.dumps(vector, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
