"""Open the store the settings name, at start-up (blocking once, before the reactor runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from twisted.python.threadpool import ThreadPool

from ..settings import Settings
from .interface import IStore


#: The most database connections one relay process opens (its store threads share them).
POSTGRES_CONNECTIONS = 16


def maildir_root(settings: Settings) -> Path:
    """The maildir's own folder: it sweeps its tmp/ and trash/, which nothing else may share."""
    return settings.state_dir / "maildir"


def open_store(settings: Settings, reactor: Any, pool: Optional[ThreadPool] = None) -> IStore:
    """The configured backend, opened; raises StoreUnavailable with a one-line reason.

    Store calls run in `pool`, the relay's store pool (msgrelay/pools.py), which the
    service tree starts and stops; without one the store makes its own (tools).
    """
    if settings.store.backend == "postgresql":
        from .postgres import PostgresStore

        store = PostgresStore(settings.store.postgres_dsn, reactor, threadpool=pool,
                              max_size=min(pool.max, POSTGRES_CONNECTIONS) if pool is not None else 8)
        store.open_blocking()
        return store
    from .maildir import MaildirStore

    return MaildirStore(maildir_root(settings), reactor, threadpool=pool,
                        message_cache_bytes=settings.store.message_cache_mib * 1024 * 1024,
                        log_messages=settings.store.maildir_messages == "log")
