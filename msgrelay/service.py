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
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized

from . import __version__
from .logs import TwistdLogOptions, build_observer
from .metrics import MetricsPage, MetricsSite, RelayMetrics, StoreStats
from .ratelimit import RateLimits
from .reload import ReloadService
from .timeouts import raise_open_file_limit
from .relay import RelayCore
from .control.server import build_control
from .keyrotation import KeyringWatcher, load_keyring, previous_keys_dir
from .serverkey import ServerKeyError
from .settings import SettingError, Settings, looks_public, read_toml, resolve
from .startrecord import write_record
from .store.factory import open_store
from .store.interface import StoreUnavailable
from .web.api import RelayAPI, allowed_methods
from .web.app import web_client_routes
from .web.connlimit import connection_limiter
from .web.site import RelaySite

log = Logger()


def fail(message: str, status: int = 2) -> None:
    """Stop start-up with one line on stderr."""
    sys.stderr.write(f"msgrelay: {message}\n")
    sys.stderr.flush()
    raise SystemExit(status)


class Options(usage.Options):
    synopsis = ("[--config PATH] [--listen ENDPOINT ...] [--state-dir DIR] [--server-name NAME] "
                "[--peer NAME=URL[#FINGERPRINT] ...] [--federation off|allowlist|open]")
    longdesc = (
        "Run a msgrelay relay. With no options it serves http://127.0.0.1:8080 from a maildir "
        "store in ./msgrelay-data. Command-line values override the config file."
    )
    optParameters = [
        ["config", "c", None, "TOML config file (`msgrelay-admin config example` prints one with every setting)."],
        ["state-dir", "d", None, "State directory: server key and maildir store. [default: ./msgrelay-data]"],
        # No short flag: twistd users type -n for --nodaemon.
        ["server-name", None, None, "Public DNS name (with optional :port) of this relay. [default: host name]"],
        ["federation", None, None, "Federation mode: off, allowlist or open; overrides federation.mode. "
                                   "[default: allowlist when --peer is given, else off]"],
        ["log-format", None, None, "Log as 'text' or 'json' (one JSON object per line); overrides log.format. "
                                   "[default: text]"],
        ["log-level", None, None, "Least severe level logged: debug, info, warn, error or critical; "
                                  "overrides log.level. [default: info]"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["peer"] = []
        self.settings: Optional[Settings] = None

    def opt_listen(self, endpoint: str) -> None:
        """Twisted server endpoint string to listen on, repeatable
        (e.g. tcp:8080:interface=127.0.0.1, ssl:8443:interface=127.0.0.1:privateKey=key.pem:certKey=cert.pem).
        [default: tcp:8080:interface=127.0.0.1]"""
        self["listen"].append(endpoint)

    def opt_peer(self, entry: str) -> None:
        """Federation peer NAME=URL[#fingerprint], repeatable (replaces federation.peers); see docs/federation.md."""
        self["peer"].append(entry)

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
        if self["peer"]:
            overrides["federation.peers"] = list(self["peer"])
        if self["federation"] is not None:
            overrides["federation.mode"] = self["federation"]
        if self["log-format"] is not None:
            overrides["log.format"] = self["log-format"]
        if self["log-level"] is not None:
            overrides["log.level"] = self["log-level"]
        self.overrides = overrides
        # Where twistd would send logs (--logfile, --nodaemon, --syslog, --logger): msgrelay
        # builds that observer itself, in log.format and filtered by log.level (logs.py).
        self.twistd_logging = TwistdLogOptions(getattr(self, "parent", None))
        try:
            self.settings = self.load_settings()
        except SettingError as e:
            fail(str(e))
        for description in self.settings.server.listen:
            _check_endpoint(description)
        for description in self.settings.metrics.listen:
            _check_endpoint(description, "metrics.listen")

    def load_settings(self) -> Settings:
        """Config file (read now) and command-line overrides, resolved; SettingError if bad.
        Used at start-up and again on each SIGHUP."""
        file_values = read_toml(self["config"]) if self["config"] else {}
        overrides = getattr(self, "overrides", {})
        if "federation.peers" in overrides and "federation.mode" not in {**file_values, **overrides}:
            overrides = {**overrides, "federation.mode": "allowlist"}  # peers given: meant to be reached
        return resolve(file_values, overrides)


def _check_endpoint(description: str, setting: str = "server.listen / --listen") -> None:
    """Parse an endpoint string now, so a typo stops start-up with its name."""
    from twisted.internet import reactor

    try:
        serverFromString(reactor, description)
    except IndexError:  # systemd:...:index=N with fewer sockets passed
        fail(f"{setting}: {description!r}: no such socket was passed by systemd (is the .socket unit active?)")
    except (ValueError, TypeError, KeyError, OSError) as e:
        fail(f"{setting}: {description!r} is not a usable endpoint: {e}")


class ListeningService(StreamServerEndpointService):
    """Listen at start-up, turning a port already in use into one clear line."""

    _raiseSynchronously = True

    def __init__(self, endpoint: Any, factory: Any, description: str, on_failure: Any = None):
        super().__init__(endpoint, factory)
        self.description = description
        self.on_failure = on_failure

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            if self.on_failure is not None:
                self.on_failure()
            fail(f"cannot listen on {self.description}: {e}", status=1)
        log.info("listening on {endpoint}", endpoint=self.description)


def build_core(settings: Settings, reactor: Any) -> RelayCore:
    """Store, key and domain core for these settings (start-up errors are one line)."""
    try:
        store = open_store(settings, reactor)
        keyring = load_keyring(settings, reactor.seconds())
    except (StoreUnavailable, ServerKeyError) as e:
        fail(str(e), status=1)
    return RelayCore(settings, store, keyring, reactor)


def makeService(options: Options, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    settings = options.settings
    assert settings is not None
    new_key = not settings.key_path().exists()
    core = build_core(settings, reactor)
    write_record(settings.state_dir, options["config"], getattr(options, "overrides", {}))
    limits = RateLimits(settings, reactor)
    api = RelayAPI(core, limits)
    site = RelaySite(
        api.app.resource(),
        reactor,
        max_body_bytes=lambda: settings.limits.max_body_bytes,
        errors_url=lambda: settings.server.errors_url,
        allowed_methods=lambda path: allowed_methods(api, path),
        idle_timeout=lambda: settings.timeouts.idle,
        header_timeout=lambda: settings.timeouts.headers,
        body_timeout=lambda: settings.timeouts.body,
        trusted_proxies=lambda: settings.server.trusted_proxies,
    )
    top = RelayService()
    top.core = core  # type: ignore[attr-defined]
    top.site = site  # type: ignore[attr-defined]
    top.limits = limits  # type: ignore[attr-defined]
    reloader = _add_operations(top, options, settings, core, api, site, limits, reactor)
    federation = _add_federation(top, core, settings, reactor, reloader)
    if settings.web_client.enabled:  # the browser client at /app/ (msgrelay/web/app.py)
        site.routes.update(web_client_routes(settings.server.errors_url or None))
    limiter = connection_limiter(site, settings, limits, reactor)
    top.connections = limiter  # type: ignore[attr-defined]
    top.metrics.attach_transport(limiter, top.resolver)  # type: ignore[attr-defined]

    def forget_new_key() -> None:  # a start that failed leaves no key behind
        if new_key:
            settings.key_path().unlink(missing_ok=True)

    for description in settings.server.listen:
        ListeningService(serverFromString(reactor, description), limiter, description,
                         forget_new_key).setServiceParent(top)
    expiry = TimerService(settings.store.expire_interval, _expire, core)
    expiry.clock = reactor
    expiry.setServiceParent(top)
    # Picks up `msgrelay-admin rotate-key` and drops retired keys after their grace period.
    watcher = KeyringWatcher(core.keyring, settings.key_path(), previous_keys_dir(settings), reactor)
    top.keyring_watcher = watcher  # type: ignore[attr-defined]
    reloader.on_reload.append(lambda applied: _check_keys(watcher))  # SIGHUP re-reads the key files too
    key_watch = TimerService(settings.server.key_check_interval, _check_keys, watcher)
    key_watch.clock = reactor
    key_watch.setServiceParent(top)
    build_control(settings, federation, watcher, reactor).setServiceParent(top)  # msgrelay-admin's socket
    log.info("msgrelay {version} serving {name} from {backend} store",
             version=__version__, name=core.name, backend=core.store.name)
    if settings.name_from_host and not looks_public(core.name):
        log.warn("server.name is unset and the host name {name!r} does not look like a public DNS name; "
                 "addresses and signatures use it, so set server.name (or --server-name) to the relay's "
                 "public name", name=core.name)
    if settings.federation.mode == "allowlist" and not settings.federation.peers:
        log.warn("federation allowlist has no peers yet: every remote address is refused (errno 122) until "
                 "you add one to federation.peers and reload (SIGHUP), or restart with --peer NAME=URL[#FP]")
    return top


class RelayService(MultiService):
    """The service tree. Under twistd it also hands twistd msgrelay's log observer: twistd
    uses an `ILogObserver` component of the application unless given `--logger`."""

    log_observer: Any = None

    def stopService(self) -> Any:
        stopped = super().stopService()
        core = getattr(self, "core", None)
        if core is not None:  # its worker threads, once every child service has stopped
            stopped.addBoth(lambda result: (core.close(), result)[1])
        return stopped

    def setServiceParent(self, parent: Any) -> Any:
        if (self.log_observer is not None and isinstance(parent, Componentized)
                and parent.getComponent(ILogObserver, None) is None):
            parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)


def _add_operations(top: RelayService, options: Options, settings: Settings, core: RelayCore, api: RelayAPI,
                    site: RelaySite, limits: RateLimits, reactor: Any) -> ReloadService:
    """Open-file limit, metrics, SIGHUP reload and log output (docs/operations.md).
    Returns the SIGHUP reloader, for other parts to hook into."""
    soft, hard = raise_open_file_limit()
    log.info("open-file limit {soft} (hard limit {hard})", soft=soft, hard=hard)

    metrics = RelayMetrics(__version__, core.store.name)
    metrics.attach(site, core, limits, api.app.url_map, lambda: getattr(top, "federation", None))
    stats = StoreStats(metrics, core.store, reactor, lambda: settings.metrics.stats_interval)
    top.metrics = metrics  # type: ignore[attr-defined]
    site.routes[b"/metrics"] = MetricsPage(metrics, lambda: settings.metrics.token, public=True,
                                           errors_url=lambda: settings.server.errors_url, stats=stats)
    for description in settings.metrics.listen:
        page = MetricsPage(metrics, lambda: settings.metrics.token, public=False, stats=stats)
        metrics_site = MetricsSite(page, reactor, idle_timeout=lambda: settings.timeouts.idle,
                                   header_timeout=lambda: settings.timeouts.headers,
                                   body_timeout=lambda: settings.timeouts.body)
        ListeningService(serverFromString(reactor, description), metrics_site,
                         f"{description} (metrics)").setServiceParent(top)

    reloader = ReloadService(settings, options.load_settings, reactor, source=options["config"] or "")
    reloader.setServiceParent(top)
    top.reloader = reloader  # type: ignore[attr-defined]

    twistd = getattr(options, "twistd_logging", None)
    if twistd is not None and twistd.ours:
        top.log_observer = build_observer(twistd, settings.log.format, lambda: settings.log.level,
                                          warn=lambda message: log.warn(message))
    elif twistd is not None and twistd.under_twistd:
        log.warn("twistd --logger is given: log.format and log.level do not apply")
    return reloader


def _add_federation(top: MultiService, core: RelayCore, settings: Settings, reactor: Any,
                    reloader: ReloadService) -> Any:
    """Federation sender (docs/protocol.md section 7) and push notifier (section 8).

    Added before the listeners, so it is started first and stopped last.
    """
    from .federation.factory import build_push, build_sender
    from .federation.outbox import OutboxBusy, OutboxUnavailable
    from .federation.resolver import build_resolver

    try:
        resolver = build_resolver(settings, reactor)  # one DNS cache for push and federation
        sender = build_sender(settings, reactor, resolver.resolve)
        sender.acquire_lock()
        push = build_push(settings, core.store, reactor, resolver.resolve)
    except OutboxBusy as e:
        fail(f"federation outbox: {e}; is another relay using state_dir {settings.state_dir}?", status=1)
    except (OutboxUnavailable, OSError, ValueError) as e:
        fail(f"federation: {e}", status=1)
    core.forwarder = sender.forwarder
    core.message_observers.append(push)
    from .federation.factory import reload_policy

    def federation_reloaded(applied: list[str]) -> None:  # SIGHUP: a new mode or peer table applies at once
        if any(name in ("federation.mode", "federation.peers") for name in applied):
            reload_policy(sender, settings)

    reloader.on_reload.append(federation_reloaded)
    resolver.setServiceParent(top)
    sender.setServiceParent(top)
    push.setServiceParent(top)
    top.resolver = resolver  # type: ignore[attr-defined]
    top.federation = sender  # type: ignore[attr-defined]
    top.push = push  # type: ignore[attr-defined]
    return sender


async def _expire_once(core: RelayCore) -> None:
    try:
        removed = await core.expire()
    except Exception:
        log.failure("expiry sweep failed; will retry at the next interval")
        return
    if removed:
        log.info("expired {count} messages", count=removed)


def _check_keys(watcher: KeyringWatcher) -> None:
    try:
        watcher.check()
    except Exception:
        log.failure("server key check failed; will retry at the next interval")


def _expire(core: RelayCore) -> Any:
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(_expire_once(core))
