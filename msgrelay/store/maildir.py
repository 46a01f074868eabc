"""The default store: a maildir-style state directory, one folder per user.

`MaildirStore` is the asynchronous IStore the relay uses: every call runs the matching
blocking method of `MaildirFiles` in a thread pool, so disk work (fsyncs above all) never
stalls the reactor. Only opening the directory, at start-up, blocks the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Union

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from .interface import IStore, NewMessage, Quota, StoreUnavailable, TokenRecord, UserRecord
from .maildir_files import MaildirFiles, UnknownUser

__all__ = ["MaildirStore", "MaildirFiles", "UnknownUser"]

log = Logger(namespace="msgrelay.store.maildir")


_SHARED: Optional[ThreadPool] = None
#: `store.message_cache_mib`'s default, in bytes.
DEFAULT_MESSAGE_CACHE_BYTES = 32 * 1024 * 1024


def _shared_pool(reactor: Any) -> ThreadPool:
    global _SHARED
    if _SHARED is None:
        _SHARED = ThreadPool(0, 4, name="msgrelay-maildir")
        _SHARED.start()
        reactor.addSystemEventTrigger("during", "shutdown", _SHARED.stop)
    return _SHARED


@implementer(IStore)
class MaildirStore:
    """IStore over a state directory; see `maildir_files` for the layout and guarantees."""

    name = "maildir"
    #: The synchronous class doing the work; a subclass may substitute its own.
    files_class: type[MaildirFiles] = MaildirFiles

    def __init__(self, root: Union[str, Path], reactor: Any = None, threadpool: Optional[ThreadPool] = None,
                 message_cache_bytes: int = DEFAULT_MESSAGE_CACHE_BYTES, log_messages: bool = True):
        """Open (creating) the directory and its replay journal now, synchronously: raises
        StoreUnavailable if unusable. Calls run in `threadpool` (the relay's store pool,
        msgrelay/pools.py). `message_cache_bytes` of recent message bodies stay in memory.
        New messages go to their user's log, or with `log_messages` false to a file each;
        either way this process compacts the logs (it is the relay's store)."""
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._reactor = reactor
        # Never the reactor's default pool (DNS lookups queue there): the relay passes its
        # store pool; tools and tests share one small pool of this module's.
        self._pool = threadpool if threadpool is not None else _shared_pool(reactor)
        self.files = self.files_class.open(root, message_cache_bytes, log_messages=log_messages, compact_logs=True)
        try:
            self.files.replay_journal()
        except OSError as e:
            raise StoreUnavailable(f"cannot read the replay journal in {self.files.replay}: {e.strerror or e}") from e

    def _run(self, function: Callable[..., Any], *args: Any) -> Deferred:
        d = deferToThreadPool(self._reactor, self._pool, function, *args)
        d.addErrback(self._log_outage, function.__name__)
        return d

    def _log_outage(self, failure: Failure, operation: str) -> Failure:
        if failure.check(StoreUnavailable):
            log.warn("maildir {operation} failed: {reason}", operation=operation, reason=str(failure.value))
        return failure

    def add_user(self, user: UserRecord) -> Deferred:
        return self._run(self.files.add_user, user)

    def get_user(self, user_id: str) -> Deferred:
        return self._run(self.files.get_user, user_id)

    def set_push_endpoint(self, user_id: str, endpoint: Optional[str]) -> Deferred:
        return self._run(self.files.set_push_endpoint, user_id, endpoint)

    def delete_user(self, user_id: str) -> Deferred:
        return self._run(self.files.delete_user, user_id)

    def add_token(self, user_id: str, token: TokenRecord) -> Deferred:
        return self._run(self.files.add_token, user_id, token)

    def get_token(self, user_id: str, token_id: str) -> Deferred:
        return self._run(self.files.get_token, user_id, token_id)

    def list_tokens(self, user_id: str) -> Deferred:
        return self._run(self.files.list_tokens, user_id)

    def revoke_token(self, user_id: str, token_id: str) -> Deferred:
        return self._run(self.files.revoke_token, user_id, token_id)

    def deliver(self, user_id: str, dedup_key: str, message: NewMessage, quota: Quota, now: int) -> Deferred:
        return self._run(self.files.deliver, user_id, dedup_key, message, quota, now)

    def deliver_checked(self, user_id: str, token_digest: str, dedup_key: str, message: NewMessage,
                        quota: Quota, now: int) -> Deferred:
        return self._run(self.files.deliver_checked, user_id, token_digest, dedup_key, message, quota, now)

    def fetch(self, user_id: str, now: int, limit: int, max_bytes: Optional[int] = None) -> Deferred:
        return self._run(self.files.fetch, user_id, now, limit, max_bytes)

    def usage(self, user_id: str, now: int) -> Deferred:
        return self._run(self.files.usage, user_id, now)

    def acknowledge(self, user_id: str, message_ids: list[str]) -> Deferred:
        return self._run(self.files.acknowledge, user_id, list(message_ids))

    def expire(self, now: int) -> Deferred:
        return self._run(self.files.expire, now)

    def remember_signature(self, digest: bytes, until: int, now: int) -> Deferred:
        return self._run(self.files.remember_signature, digest, until, now)

    def remember_and_fetch(self, digest: bytes, until: int, now: int, user_id: str, limit: int,
                           max_bytes: Optional[int] = None) -> Deferred:
        return self._run(self.files.remember_and_fetch, digest, until, now, user_id, limit, max_bytes)

    def remember_and_acknowledge(self, digest: bytes, until: int, now: int, user_id: str,
                                 message_ids: list[str]) -> Deferred:
        return self._run(self.files.remember_and_acknowledge, digest, until, now, user_id, list(message_ids))

    def check_writable(self) -> Deferred:
        return self._run(self.files.check_writable)

    def stats(self, now: int) -> Deferred:
        return self._run(self.files.stats, now)
