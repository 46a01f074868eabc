"""Group commit for directory fsyncs: many writers to one folder share one fsync.

A writer that renamed a file into a folder needs *an* fsync of that folder that started
after its rename. If one is running, it waits for the next; whoever finds none running
starts it for everyone who is waiting. So N concurrent deliveries to one mailbox cost
their N data fsyncs (in parallel, in their own threads) and about two folder fsyncs, and
still nobody returns before its own rename is durable.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Optional

from ..durable import fsync_dir


class DirSync:
    """Shared fsyncs of one directory; thread-safe."""

    def __init__(self, path: Path, fsync: Optional[Callable[[Path], None]] = None):
        self.path = path
        self._fsync = fsync or fsync_dir
        self._cond = threading.Condition(threading.Lock())
        self._started = 0  # number of fsyncs started
        self._finished = 0  # number of fsyncs finished (they finish in order: one at a time)
        self._running = False
        self._failed: dict[int, BaseException] = {}

    def sync(self) -> None:
        """Return once an fsync that started after this call has succeeded; else raise its error."""
        with self._cond:
            wanted = self._started + 1  # the next fsync to start covers our change
            while self._finished < wanted:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._started += 1
                number = self._started
                error: Optional[BaseException] = None
                self._cond.release()
                try:
                    self._fsync(self.path)
                except BaseException as e:  # handed to every writer of this round
                    error = e
                finally:
                    self._cond.acquire()
                self._running = False
                self._finished = number
                if error is not None:
                    self._failed[number] = error
                self._cond.notify_all()
            error = self._failed.get(wanted)
            if len(self._failed) > 16:
                for number in sorted(self._failed)[:-16]:
                    del self._failed[number]
        if error is not None:
            raise error
