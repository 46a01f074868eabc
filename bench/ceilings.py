"""This machine's ceilings, measured in the bench's own run: what bounds each relay figure.

- RSA-OAEP decryptions/s with the relay's own server key, on one core: every accepted
  packet costs one.
- RSA-PSS verifications/s of a 2048-bit user signature, on one core: every signed request
  (fetch, acknowledge) costs one.
- Durable 2 KiB file writes/s (write a new file, fsync, rename, fsync the folder) on the
  state directory's filesystem, from 1 and from 8 threads: every stored message and every
  signed request (its replay entry) costs at least one.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


def _rate(operation, seconds: float) -> float:
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        operation()
        count += 1
    return count / (time.perf_counter() - started)


def oaep_decryptions(server_key_pem: bytes, seconds: float) -> float:
    key = serialization.load_pem_private_key(server_key_pem, password=None)
    wrapped = key.public_key().encrypt(os.urandom(32), OAEP)
    return _rate(lambda: key.decrypt(wrapped, OAEP), seconds)


def pss_verifications(user_key: rsa.RSAPrivateKey, seconds: float) -> float:
    data = b"GET\n/api/v1/message\nbench.test\nuser_id=x&date=y"
    signature = user_key.sign(data, PSS, hashes.SHA256())
    public = user_key.public_key()
    return _rate(lambda: public.verify(signature, data, PSS, hashes.SHA256()), seconds)


def durable_writes(folder: Path, seconds: float, threads: int = 1) -> float:
    """New 2 KiB files made durable per second: write, fsync, rename, fsync the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(2048)
    counts = [0] * threads
    stop = time.perf_counter() + seconds

    def work(slot: int) -> None:
        sub = folder / f"t{slot}"
        sub.mkdir(exist_ok=True)
        n = 0
        while time.perf_counter() < stop:
            tmp, final = sub / f"{n}.tmp", sub / f"{n}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, payload)
            os.fsync(fd)
            os.close(fd)
            os.rename(tmp, final)
            dfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dfd)
            os.close(dfd)
            n += 1
        counts[slot] = n
        for name in os.listdir(sub):
            os.unlink(sub / name)
        os.rmdir(sub)

    started = time.perf_counter()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


def measure(server_key_pem: bytes, user_key: rsa.RSAPrivateKey, folder: Path, seconds: float) -> dict[str, float]:
    return {
        "rsa_oaep_decrypt": oaep_decryptions(server_key_pem, seconds),
        "pss_verify": pss_verifications(user_key, seconds),
        "durable_write_1": durable_writes(folder, seconds, 1),
        "durable_write_8": durable_writes(folder, seconds, 8),
    }
