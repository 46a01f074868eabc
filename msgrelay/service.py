"""`twistd msgrelay`: options parsed and checked in one place, and the service tree.

A bad option or setting stops start-up with one line naming it and exit status 2;
nothing here prints a traceback for an operator's mistake.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from . import __version__
from .relay import RelayCore
from .serverkey import ServerKeyError, ServerKeyring, load_or_create
from .settings import SettingError, Settings, read_toml, resolve
from .store.factory import open_store
from .store.interface import StoreUnavailable
from .web.api import RelayAPI, allowed_methods
from .web.site import RelaySite

log = Logger()


def fail(message: str, status: int = 2) -> None:
    """Stop start-up with one line on stderr."""
    sys.stderr.write(f"msgrelay: {message}\n")
    sys.stderr.flush()
    raise SystemExit(status)


class Options(usage.Options):
    synopsis = "[--config PATH] [--listen ENDPOINT ...] [--state-dir DIR] [--server-name NAME]"
    longdesc = (
        "Run a msgrelay relay. With no options it serves http://127.0.0.1:8080 from a maildir "
        "store in ./msgrelay-data. Command-line values override the config file."
    )
    optParameters = [
        ["config", "c", None, "TOML config file (see etc/msgrelay.toml)."],
        ["state-dir", "d", None, "State directory: server key and maildir store. [default: ./msgrelay-data]"],
        ["server-name", "n", None, "Public DNS name (with optional :port) of this relay. [default: host name]"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self.settings: Optional[Settings] = None

    def opt_listen(self, endpoint: str) -> None:
        """Twisted server endpoint string to listen on, repeatable
        (e.g. tcp:8080:interface=127.0.0.1, ssl:8443:privateKey=key.pem:certKey=cert.pem).
        [default: tcp:8080:interface=127.0.0.1]"""
        self["listen"].append(endpoint)

    def opt_version(self) -> None:
        """Print the msgrelay version and exit."""
        print(f"msgrelay {__version__}")
        raise SystemExit(0)

    def parseOptions(self, options: Any = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            fail(f"{e} (see twistd msgrelay --help)")

    def postOptions(self) -> None:
        overrides: dict[str, Any] = {}
        if self["listen"]:
            overrides["server.listen"] = list(self["listen"])
        if self["state-dir"] is not None:
            overrides["server.state_dir"] = self["state-dir"]
        if self["server-name"] is not None:
            overrides["server.name"] = self["server-name"]
        try:
            file_values = read_toml(self["config"]) if self["config"] else {}
            self.settings = resolve(file_values, overrides)
        except SettingError as e:
            fail(str(e))
        for description in self.settings.server.listen:
            _check_endpoint(description)


def _check_endpoint(description: str) -> None:
    """Parse an endpoint string now, so a typo stops start-up with its name."""
    from twisted.internet import reactor

    try:
        serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError, OSError) as e:
        fail(f"server.listen / --listen: {description!r} is not a usable endpoint: {e}")


class ListeningService(StreamServerEndpointService):
    """Listen at start-up, turning a port already in use into one clear line."""

    _raiseSynchronously = True

    def __init__(self, endpoint: Any, factory: Any, description: str):
        super().__init__(endpoint, factory)
        self.description = description

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            fail(f"cannot listen on {self.description}: {e}", status=1)
        log.info("listening on {endpoint}", endpoint=self.description)


def build_core(settings: Settings, reactor: Any) -> RelayCore:
    """Store, key and domain core for these settings (start-up errors are one line)."""
    try:
        store = open_store(settings, reactor)
        keyring = ServerKeyring(load_or_create(settings.key_path()))
    except (StoreUnavailable, ServerKeyError) as e:
        fail(str(e), status=1)
    return RelayCore(settings, store, keyring, reactor)


def makeService(options: Options, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    settings = options.settings
    assert settings is not None
    core = build_core(settings, reactor)
    api = RelayAPI(core)
    site = RelaySite(
        api.app.resource(),
        reactor,
        max_body_bytes=lambda: settings.limits.max_body_bytes,
        errors_url=lambda: settings.server.errors_url,
        allowed_methods=lambda path: allowed_methods(api, path),
    )
    top = MultiService()
    top.core = core  # type: ignore[attr-defined]
    top.site = site  # type: ignore[attr-defined]
    for description in settings.server.listen:
        ListeningService(serverFromString(reactor, description), site, description).setServiceParent(top)
    expiry = TimerService(settings.store.expire_interval, _expire, core)
    expiry.clock = reactor
    expiry.setServiceParent(top)
    log.info("msgrelay {version} serving {name} from {backend} store",
             version=__version__, name=core.name, backend=core.store.name)
    return top


async def _expire_once(core: RelayCore) -> None:
    try:
        removed = await core.expire()
    except Exception:
        log.failure("expiry sweep failed; will retry at the next interval")
        return
    if removed:
        log.info("expired {count} messages", count=removed)


def _expire(core: RelayCore) -> Any:
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(_expire_once(core))
