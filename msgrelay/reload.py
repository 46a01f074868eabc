"""Configuration reload on SIGHUP.

On SIGHUP the relay reads its config file again, with the same command-line overrides,
and checks every value as at start-up. A bad file changes nothing (one error line says
why). Otherwise the reloadable settings (marked in msgrelay/settings.py: limits,
registration mode and tokens, rate limits, timeouts, trusted proxies, metrics token, log
level, ...) take effect for the next request, on connections already open; each change is
logged, and each changed setting that needs a restart is logged as such and keeps its
running value. No connection is closed by a reload.

Settings are frozen: a reload builds a new `Settings` object (`Settings.reload_to`) and
hands the whole of it to each component whose sections changed (`Reconfigurable`).
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Optional, Sequence

from twisted.application.service import Service
from twisted.logger import Logger

from .settings import EVERY_RELOAD, Reconfigurable, SettingError, Settings

log = Logger(namespace="msgrelay.reload")


class ReloadService(Service):
    """Installs the SIGHUP handler while running; `reload()` can also be called directly."""

    name = "reload"

    def __init__(self, settings: Settings, load: Callable[[], Settings], reactor: Any, source: str = "",
                 listeners: Sequence[Reconfigurable] = ()):
        self.settings = settings
        self.load = load
        self.reactor = reactor
        self.source = source
        self.listeners = tuple(listeners)
        self._previous: Any = None
        self._installed = False

    def startService(self) -> None:
        super().startService()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGHUP, self._signalled)
            self._installed = True

    def stopService(self) -> Any:
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
        return super().stopService()

    def _signalled(self, signum: int, frame: Any) -> None:
        # A signal handler may interrupt anything: do the work from the reactor loop.
        self.reactor.callFromThread(self.reload)

    def reload(self) -> Optional[tuple[list[str], list[str]]]:
        """Re-read and apply; (applied, needing restart), or None if the file was refused."""
        log.info("reloading configuration{source}", source=f" from {self.source}" if self.source else "")
        try:
            new = self.load()
        except SettingError as e:
            log.error("reload refused, the running configuration is unchanged: {error}", error=str(e))
            return None
        reload = self.settings.reload_to(new)
        self.settings = reload.running
        for listener in self.listeners:
            wanted = listener.settings_sections
            if wanted is EVERY_RELOAD or wanted & reload.sections:
                try:
                    listener.reconfigure(reload)
                except Exception:
                    log.failure("reload of {listener!r} failed", listener=listener)
        log.info("reload done: {applied} setting(s) applied, {restart} need a restart",
                 applied=len(reload.applied), restart=len(reload.needs_restart))
        return list(reload.applied), list(reload.needs_restart)
