"""Group commit: many writers share one blocking flush (a folder fsync, a journal write).

A writer that changed something needs *a* flush that started after its change. If one is
running, it waits for the next; whoever finds none running starts it for everyone who is
waiting. So N concurrent deliveries to one mailbox cost their N data fsyncs (in parallel,
in their own threads) and about two folder fsyncs, and still nobody returns before its own
change is durable.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Optional

from ..durable import fsync_dir


class GroupCommit:
    """Rounds of one flush, each shared by every caller waiting when it starts; thread-safe.

    Subclasses say what a round takes (`_take`, under `_cond`), does (`_round`, without
    it) and leaves (`_settle`, under it again, told the round's error if any).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._started = 0  # rounds started
        self._finished = 0  # rounds finished (one at a time, in order)
        self._running = False
        self._failed: dict[int, BaseException] = {}
        #: Rounds done, for tests and metrics: concurrent callers share them.
        self.rounds = 0

    def _take(self) -> Any:
        return None

    def _round(self, taken: Any) -> None:
        raise NotImplementedError

    def _settle(self, taken: Any, error: Optional[BaseException]) -> None:
        pass

    def _join_round(self) -> None:
        """Under `_cond`: return once a round that started after this call has succeeded;
        else raise its error."""
        wanted = self._started + 1  # the next round to start covers the caller's change
        while self._finished < wanted:
            if self._running:
                self._cond.wait()
                continue
            self._running = True
            self._started += 1
            number = self._started
            taken = self._take()
            error: Optional[BaseException] = None
            self._cond.release()
            try:
                self._round(taken)
            except BaseException as e:  # handed to every caller of this round
                error = e
            finally:
                self._cond.acquire()
            self._running = False
            self._finished = number
            self.rounds += 1
            self._settle(taken, error)
            if error is not None:
                self._failed[number] = error
            self._cond.notify_all()
        error = self._failed.get(wanted)
        if len(self._failed) > 16:
            for number in sorted(self._failed)[:-16]:
                del self._failed[number]
        if error is not None:
            raise error

    def _idle(self) -> None:
        """Under `_cond`: wait until no round is running."""
        while self._running:
            self._cond.wait()


class DirSync(GroupCommit):
    """Shared fsyncs of one directory."""

    def __init__(self, path: Path, fsync: Optional[Callable[[Path], None]] = None):
        super().__init__()
        self.path = path
        self._fsync = fsync or fsync_dir

    def _round(self, taken: Any) -> None:
        self._fsync(self.path)

    def sync(self) -> None:
        """Return once an fsync that started after this call has succeeded; else raise its error."""
        with self._cond:
            self._join_round()
