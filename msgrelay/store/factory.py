"""Open the store the settings name, at start-up (blocking once, before the reactor runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from twisted.python.threadpool import ThreadPool

from ..settings import Settings
from .interface import IStore


def maildir_root(settings: Settings) -> Path:
    """The maildir's own folder: it sweeps its tmp/ and trash/, which nothing else may share."""
    return settings.state_dir / "maildir"


def open_store(settings: Settings, reactor: Any, maildir_pool: Optional[ThreadPool] = None) -> IStore:
    """The configured backend, opened; raises StoreUnavailable with a one-line reason.

    `maildir_pool` runs the maildir's blocking calls (PostgreSQL sizes its own pool to its
    connections); without it, the reactor's shared pool."""
    if settings.store.backend == "postgresql":
        from .postgres import PostgresStore

        store = PostgresStore(settings.store.postgres_dsn, reactor)
        store.open_blocking()
        return store
    from .maildir import MaildirStore

    return MaildirStore(maildir_root(settings), reactor, maildir_pool)
