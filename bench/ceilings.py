"""This machine's ceilings, measured in the bench's own run: what bounds each relay figure.

- RSA-OAEP decryptions/s with the relay's own server key, on one core: every accepted
  packet costs one.
- RSA-PSS verifications/s of a 2048-bit user signature, on one core: every signed request
  (fetch, acknowledge) costs one.
- Durable 2 KiB file writes/s (write a new file, fsync, rename, fsync the folder) on the
  state directory's filesystem, from 1 and from 8 threads: every stored message and every
  signed request (its replay entry) costs at least one. With them, the kernel CPU each of
  those writes took (from 8 threads): on virtual machines a block write costs the guest CPU
  too, and then the disk takes CPU from everything else the relay does.

`DiskProbe` measures that disk's sync latency beside a paced scenario, which bounds its p99.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from loadgen import percentile

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


def _kernel_seconds() -> float:
    """The calling thread's kernel CPU time (Linux), or 0.0 where threads are not counted apart."""
    who = getattr(resource, "RUSAGE_THREAD", None)
    return 0.0 if who is None else resource.getrusage(who).ru_stime


def durable_writes(folder: Path, seconds: float, threads: int = 1) -> tuple[float, float]:
    """New 2 KiB files made durable per second (write, fsync, rename, fsync the folder), and
    the kernel CPU milliseconds each took, counted in the writing threads."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(2048)
    counts = [0] * threads
    kernel = [0.0] * threads
    stop = time.perf_counter() + seconds

    def work(slot: int) -> None:
        sub = folder / f"t{slot}"
        sub.mkdir(exist_ok=True)
        n = 0
        kernel_before = _kernel_seconds()
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
        counts[slot], kernel[slot] = n, _kernel_seconds() - kernel_before
        for name in os.listdir(sub):
            os.unlink(sub / name)
        os.rmdir(sub)

    started = time.perf_counter()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return sum(counts) / (time.perf_counter() - started), sum(kernel) * 1000 / max(sum(counts), 1)


def measure(server_key_pem: bytes, user_key: rsa.RSAPrivateKey, folder: Path, seconds: float) -> dict[str, float]:
    writes_1, _ = durable_writes(folder, seconds, 1)
    writes_8, kernel_ms = durable_writes(folder, seconds, 8)
    return {
        "rsa_oaep_decrypt": oaep_decryptions(server_key_pem, seconds),
        "pss_verify": pss_verifications(user_key, seconds),
        "durable_write_1": writes_1,
        "durable_write_8": writes_8,
        "durable_write_kernel_ms": kernel_ms,
    }


class DiskProbe:
    """fdatasync latency of the state directory's disk while a scenario runs.

    A relay's p99 can be no better than the disk's: every stored message and every signed
    request waits for a sync. This thread appends 150 bytes and fdatasyncs them every 10 ms
    (the size of a replay journal entry), so a paced scenario's report can say whether its
    slowest requests met a slow disk. On 2026-12-04 the same probe on an idle 2-core VM saw
    p50 0.4 ms and a maximum of 247 ms in 30 s: such a stall in a 10 s run at 100 req/s
    holds up about 2.5% of the requests, enough to set the p99.
    """

    def __init__(self, folder: Path):
        self._path = folder / "disk-probe"
        self._stop = threading.Event()
        self._latencies: list[float] = []
        self._thread = threading.Thread(target=self._run, name="disk-probe", daemon=True)

    def __enter__(self) -> "DiskProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            while not self._stop.wait(0.01):
                os.write(fd, b"x" * 150)
                started = time.perf_counter()
                os.fdatasync(fd)
                self._latencies.append(time.perf_counter() - started)
        finally:
            os.close(fd)
            self._path.unlink()

    def figures(self) -> dict[str, float]:
        """p50, p99 and maximum in milliseconds (NaN when no sync completed)."""
        return {"disk_p50_ms": percentile(self._latencies, 0.5) * 1000,
                "disk_p99_ms": percentile(self._latencies, 0.99) * 1000,
                "disk_max_ms": percentile(self._latencies, 1.0) * 1000}
