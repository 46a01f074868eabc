"""Run `msgrelay-client` commands in processes forked from one that has imported it already.

Every command still runs in a process of its own, with its own arguments, environment,
working directory and standard streams, talks to the relay over real sockets, and ends with
its own exit status. What is shared is the interpreter's start-up and the imports (twisted,
treq, cryptography, click: about 0.35 s of CPU per command, most of what the end-to-end
client tests spent). The installed console script itself is still run as a program by the
watch tests (test_client_e2e.py, test_first_hour.py), the shell-completion test and the
README's five-minute demo (test_docs_verbatim.py).

The server never imports the reactor (`react` does, in each child), so no epoll instance or
thread crosses a fork.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

_server: Optional[tuple[subprocess.Popen, str]] = None


def run(args: list[str], *, env: dict[str, str], stdin: Optional[str], timeout: float) -> subprocess.CompletedProcess:
    """`msgrelay-client ARGS` in a forked process: like subprocess.run with text capture."""
    path = _socket_path()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as given:
        given.write((stdin or "").encode("utf-8"))
        given.seek(0)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(path)
            request = {"args": args, "env": env, "cwd": os.getcwd()}
            fds = [given.fileno(), out.fileno(), err.fileno()]
            socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], fds)
            reader = conn.makefile("r")
            pid = int(reader.readline())
            try:
                line = reader.readline()
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(["msgrelay-client", *args], timeout)
            if not line:
                raise RuntimeError("the msgrelay-client fork server went away")
            code = int(line)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(["msgrelay-client", *args], code,
                                           out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"))


def _socket_path() -> str:
    """The server of this test process, started on first use (one per pytest worker)."""
    global _server
    if _server is None or _server[0].poll() is not None:
        folder = tempfile.mkdtemp(prefix="msgrelay-clientfork-")
        path = os.path.join(folder, "socket")
        ready = os.path.join(folder, "ready")
        here = str(Path(__file__).parent)
        proc = subprocess.Popen([sys.executable, "-c", f"import clientfork; clientfork.serve({path!r}, {ready!r})"],
                                cwd=here, env={**os.environ, "PYTHONPATH": here}, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not os.path.exists(ready):  # it imports the client first
            try:
                proc.wait(timeout=0.02)
                raise RuntimeError(f"the msgrelay-client fork server exited with {proc.returncode}")
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError("the msgrelay-client fork server did not start within 60 s")
        _server = (proc, path)
    return _server[1]


# -- the server ---------------------------------------------------------------------------------

def serve(path: str, ready: str) -> None:
    """Import the client, then fork one child per request; report each child's exit status."""
    import shutil

    # The commands import from the installed packages only, never a helper of the tests.
    here = str(Path(__file__).parent)
    sys.path[:] = [entry for entry in sys.path if entry not in ("", ".", here)]
    import msgrelay.client.cli  # noqa: F401  (the point: imported once, before any fork)

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    Path(ready).touch()
    try:
        _serve(listener, [wake_read, wake_write])
    finally:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def _serve(listener: socket.socket, pipe: list[int]) -> None:
    import select

    wake_read = pipe[0]
    waiting: dict[int, socket.socket] = {}
    parent = os.getppid()
    while os.getppid() == parent:  # ends with the test process that started it
        readable, _, _ = select.select([listener, wake_read], [], [], 1.0)
        if wake_read in readable:
            os.read(wake_read, 512)
        if listener in readable:
            conn, _ = listener.accept()
            pid = _start(conn, listener, pipe)
            if pid is None:
                conn.close()
            else:
                waiting[pid] = conn
        for pid in list(waiting):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                conn = waiting.pop(pid)
                try:
                    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass
                conn.close()


def _start(conn: socket.socket, listener: socket.socket, pipe: list[int]) -> Optional[int]:
    message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    if len(fds) != 3:
        return None
    while not message.endswith(b"\n"):  # a stream: the rest of a long request may follow
        more = conn.recv(1 << 20)
        if not more:
            return None
        message += more
    request = json.loads(message)
    pid = os.fork()
    if pid == 0:
        _child(request, fds, [conn, listener], pipe)
    for fd in fds:
        os.close(fd)
    conn.sendall(f"{pid}\n".encode())
    return pid


def _child(request: dict, fds: list[int], sockets: list[socket.socket], pipe: list[int]) -> None:
    """Become `msgrelay-client ARGS` as the console script would run it; never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for sock in sockets:
            sock.close()
        for fd in pipe:
            os.close(fd)
        for fd, target in zip(fds, (0, 1, 2)):  # no stdin given: an empty file, at its end at once
            os.dup2(fd, target)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["msgrelay-client", *request["args"]]
        from msgrelay.client.cli import main

        try:
            result = main()
            code = 0 if result is None else int(result)
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)
