"""`twistd msgrelay`: options parsed and checked in one place, and the service tree.

A bad option or setting stops start-up with one line naming it and exit status 2;
nothing here prints a traceback for an operator's mistake.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from typing import Any, Optional

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized

from . import __version__
from .builder import Relay, build_relay
from .federation.push import PushNotifier
from .federation.resolver import CachingResolver
from .federation.service import FederationService
from .heap import StartUpHeap
from .keyrotation import KeyringWatcher, load_keyring
from .logs import LevelPredicate, TwistdLogOptions, build_observer, worker_tag
from .metrics import RelayMetrics
from .relay import RelayCore
from .control.server import build_control
from .reload import ReloadService
from .serverkey import ServerKeyError
from .settings import SettingError, Settings, looks_public, read_toml, resolve
from .startrecord import write_record
from .store.interface import StoreUnavailable
from .timeouts import raise_open_file_limit
from .twisted_compat import raise_listen_errors_synchronously, server_tls_context
from .web.site import RelaySite
from .workers import AdoptedListener, BoundListener, ParentWatch, WorkerRole, WorkerSupervisor, worker_command

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
        ["workers", None, None, "Relay processes serving the same listening sockets; overrides server.workers "
                                "(more than 1 needs the PostgreSQL store; see docs/operations.md). [default: 1]", int],
        # Set by the supervising parent on the workers it starts (msgrelay/workers.py), not by hand.
        ["worker", None, None, "Internal: run as worker INDEX of a parent, on its inherited sockets FD,..."],
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
        if self["workers"] is not None:
            overrides["server.workers"] = self["workers"]
        try:
            self.role = WorkerRole.parse(self["worker"]) if self["worker"] is not None else None
        except ValueError:
            fail(f"--worker: {self['worker']!r} is not INDEX:FD,... (it is set by the parent process)")
        self.overrides = overrides
        # Where twistd would send logs (--logfile, --nodaemon, --syslog, --logger): msgrelay
        # builds that observer itself, in log.format and filtered by log.level (logs.py).
        self.twistd_logging = TwistdLogOptions(getattr(self, "parent", None))
        try:
            settings = self.settings = self.load_settings()
        except SettingError as e:
            fail(str(e))
        if self.role is not None:
            return  # the parent checked and bound the endpoints; their sockets are inherited
        for description in settings.server.listen:
            _check_endpoint(description)
        for description in settings.metrics.listen:
            _check_endpoint(description, "metrics.listen")

    def load_settings(self) -> Settings:
        """Config file (read now) and command-line overrides, resolved; SettingError if bad.
        Used at start-up and again on each SIGHUP."""
        file_values = read_toml(self["config"]) if self["config"] else {}
        overrides = getattr(self, "overrides", {})
        if "federation.peers" in overrides and "federation.mode" not in {**file_values, **overrides}:
            overrides = {**overrides, "federation.mode": "allowlist"}  # peers given: meant to be reached
        return resolve(file_values, overrides)


def _check_endpoint(description: str, setting: str = "server.listen / --listen") -> Any:
    """Parse an endpoint string now, so a typo stops start-up with its name."""
    from twisted.internet import reactor

    try:
        return serverFromString(reactor, description)
    except IndexError:  # systemd:...:index=N with fewer sockets passed
        fail(f"{setting}: {description!r}: no such socket was passed by systemd (is the .socket unit active?)")
    except (ValueError, TypeError, KeyError, OSError) as e:
        fail(f"{setting}: {description!r} is not a usable endpoint: {e}")


class ListeningService(StreamServerEndpointService):
    """Listen at start-up, turning a port already in use into one clear line."""

    def __init__(self, endpoint: Any, factory: Any, description: str, on_failure: Any = None):
        super().__init__(endpoint, factory)
        raise_listen_errors_synchronously(self)
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


def makeService(options: Options, reactor: Any = None) -> "LoggedService":
    """The relay (builder.py), then its SIGHUP reloader, listeners and timers."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    settings = options.settings
    assert settings is not None
    role: Optional[WorkerRole] = getattr(options, "role", None)
    if role is None and settings.server.workers > 1:
        return _make_supervisor(options, settings, reactor)
    soft, hard = raise_open_file_limit()  # first: the connection caps are sized from it
    log.info("open-file limit {soft} (hard limit {hard})", soft=soft, hard=hard)
    new_key = not settings.key_path().exists()
    once = role is None or role.first  # what must happen once per relay: see msgrelay/workers.py
    relay = _build(settings, reactor)  # workers need PostgreSQL, whose outbox every process shares
    if role is None:
        write_record(settings.state_dir, options["config"], getattr(options, "overrides", {}))
    level = LevelPredicate(settings.log.level)
    metrics_sites = [(description, relay.metrics_site()) for description in settings.metrics.listen]
    reloader = ReloadService(settings, options.load_settings, reactor, source=options["config"] or "",
                             listeners=[*relay.reconfigurables, level, *(site for _, site in metrics_sites)])
    tag = worker_tag(role.index, os.getpid()) if role is not None else None
    top = RelayService(relay, reloader, _log_observer(options, settings, level, tag))
    relay.service.setServiceParent(top)  # pools, DNS, federation, push: started first, stopped last
    reloader.setServiceParent(top)

    def forget_new_key() -> None:  # a start that failed leaves no key behind
        if new_key:
            settings.key_path().unlink(missing_ok=True)

    listeners: list[tuple[str, Any, str]] = [(d, relay.connections, d) for d in settings.server.listen]
    listeners += [(d, site, f"{d} (metrics)") for d, site in metrics_sites]
    _add_listeners(role, listeners, len(settings.server.listen), forget_new_key, reactor, top)
    _add_timers_and_control(settings, relay, once, reactor, top)
    StartUpHeap(reactor).setServiceParent(top)
    _start_up_lines(settings, relay)
    return top


def _add_listeners(role: Optional[WorkerRole], listeners: list[tuple[str, Any, str]], relay_count: int,
                   on_failure: Any, reactor: Any, top: MultiService) -> None:
    """Bind the listeners; a worker adopts the sockets its parent bound instead."""
    if role is not None:
        _adopt_listeners(role, listeners, relay_count, reactor, top)
        ParentWatch(reactor).setServiceParent(top)
        return
    for description, site, shown in listeners:
        ListeningService(serverFromString(reactor, description), site, shown, on_failure).setServiceParent(top)


def _add_timers_and_control(settings: Settings, relay: Relay, once: bool, reactor: Any, top: MultiService) -> None:
    """The key watch in every process; the control socket and expiry sweeps only once per relay."""
    timers: list[tuple[int, Any, Any]] = [(settings.server.key_check_interval, _check_keys, relay.keyring_watcher)]
    if once:
        build_control(settings, relay.federation, relay.keyring_watcher, reactor).setServiceParent(top)
        timers.append((settings.store.expire_interval, _expire, relay.core))
    for interval, function, argument in timers:
        timer = TimerService(interval, function, argument)
        timer.clock = reactor
        timer.setServiceParent(top)


def _adopt_listeners(role: WorkerRole, listeners: list[tuple[str, Any, str]], relay_count: int, reactor: Any,
                     top: MultiService) -> None:
    """A worker serves the parent's sockets: every worker the relay's, worker 0 the metrics ones."""
    if len(role.fds) != len(listeners):
        fail(f"--worker: {len(role.fds)} sockets inherited for {len(listeners)} listeners")
    for position, (fd, (description, site, shown)) in enumerate(zip(role.fds, listeners)):
        if position < relay_count or role.first:
            AdoptedListener(reactor, fd, site, shown, _tls_context(description, reactor)).setServiceParent(top)
        else:
            os.close(fd)


def _tls_context(description: str, reactor: Any) -> Any:
    """The TLS context of an `ssl:` listener (certificate and key read now), else None.
    Other descriptions are not parsed again: a `systemd:` one would look for systemd's
    variables, which only the parent had."""
    if description.partition(":")[0].strip().lower() != "ssl":
        return None
    try:
        endpoint = serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError, OSError) as e:  # e.g. the key file was removed since
        fail(f"cannot listen on {description}: {e}", status=1)
    return server_tls_context(endpoint) if isinstance(endpoint, SSL4ServerEndpoint) else None


def _make_supervisor(options: Options, settings: Settings, reactor: Any) -> "SupervisorService":
    """With server.workers > 1: bind the listeners, and start and watch the workers."""
    try:
        load_keyring(settings, reactor.seconds())  # a new relay's key is made here, once
    except ServerKeyError as e:
        fail(str(e), status=1)
    write_record(settings.state_dir, options["config"], getattr(options, "overrides", {}))
    level = LevelPredicate(settings.log.level)
    top = SupervisorService(_log_observer(options, settings, level))
    bound = [BoundListener(reactor, d, lambda problem: fail(problem, status=1))
             for d in (*settings.server.listen, *settings.metrics.listen)]
    for listener in bound:
        listener.setServiceParent(top)
    args = _worker_args(options)
    command = partial(worker_command, ["--nodaemon", "--pidfile=", "--logfile=-"], args)
    WorkerSupervisor(reactor, settings.server.workers, lambda index: command(), bound).setServiceParent(top)
    log.info("msgrelay {version}: {count} workers on {listen}", version=__version__,
             count=settings.server.workers, listen=", ".join(settings.server.listen))
    return top


def _worker_args(options: Options) -> list[str]:
    """The parent's own msgrelay options, for its workers (they read the same config file)."""
    args: list[str] = []
    for name in ("config", "state-dir", "server-name", "federation", "log-format", "log-level"):
        if options[name] is not None:
            args += [f"--{name}", str(options[name])]
    for name in ("listen", "peer"):
        for value in options[name]:
            args += [f"--{name}", value]
    return args


def _start_up_lines(settings: Settings, relay: Relay) -> None:
    log.info("msgrelay {version} serving {name} from {backend} store",
             version=__version__, name=relay.core.name, backend=relay.store.name)
    if settings.name_from_host and not looks_public(relay.core.name):
        log.warn("server.name is unset and the host name {name!r} does not look like a public DNS name; "
                 "addresses and signatures use it, so set server.name (or --server-name) to the relay's "
                 "public name", name=relay.core.name)
    if settings.federation.mode == "allowlist" and not settings.federation.peers:
        log.warn("federation allowlist has no peers yet: every remote address is refused (errno 122) until "
                 "you add one to federation.peers and reload (SIGHUP), or restart with --peer NAME=URL[#FP]")


def _build(settings: Settings, reactor: Any) -> Relay:
    """build_relay, with start-up errors as one line; the outbox lock is taken now, so a
    second relay on the same state directory stops here."""
    from .federation.outbox import OutboxBusy, OutboxUnavailable

    try:
        relay = build_relay(settings, reactor)
        relay.federation.acquire_lock()
    except (StoreUnavailable, ServerKeyError) as e:
        fail(str(e), status=1)
    except OutboxBusy as e:
        fail(f"federation outbox: {e}; is another relay using state_dir {settings.state_dir}?", status=1)
    except (OutboxUnavailable, OSError, ValueError) as e:
        fail(f"federation: {e}", status=1)
    return relay


def _log_observer(options: Options, settings: Settings, level: LevelPredicate,
                  tag: Optional[dict[str, int]] = None) -> Optional[ILogObserver]:
    """msgrelay's log observer for twistd, unless the operator named a --logger; a worker's
    lines carry its `tag` (logs.worker_tag)."""
    twistd = getattr(options, "twistd_logging", None)
    if twistd is not None and twistd.ours:
        return build_observer(twistd, settings.log.format, level, warn=lambda message: log.warn(message), tag=tag)
    if twistd is not None and twistd.under_twistd:
        log.warn("twistd --logger is given: log.format and log.level do not apply")
    return None


class LoggedService(MultiService):
    """A top service that gives twistd msgrelay's log observer.

    twistd takes its log observer from, in order: its `--logger` option; an `ILogObserver`
    component of the application; its own `--logfile`/`--syslog` options. It builds the
    application after `makeService` returns and only then attaches this service to it, so
    attaching is the one moment a plugin can set that component (docs/architecture.md).
    """

    def __init__(self, log_observer: Optional[ILogObserver] = None):
        super().__init__()
        self.log_observer = log_observer

    def setServiceParent(self, parent: Any) -> Any:
        if (self.log_observer is not None and isinstance(parent, Componentized)
                and parent.getComponent(ILogObserver, None) is None):
            parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)


class SupervisorService(LoggedService):
    """The service tree of the parent with server.workers > 1: bound sockets and the workers."""


class RelayService(LoggedService):
    """The service tree of `twistd msgrelay` (or of one worker): the relay's parts, its
    reloader and listeners."""

    def __init__(self, relay: Relay, reloader: ReloadService, log_observer: Optional[ILogObserver] = None):
        super().__init__(log_observer)
        self.relay = relay
        self.reloader = reloader

    @property
    def core(self) -> RelayCore:
        return self.relay.core

    @property
    def site(self) -> RelaySite:
        return self.relay.site

    @property
    def metrics(self) -> RelayMetrics:
        return self.relay.metrics

    @property
    def federation(self) -> FederationService:
        return self.relay.federation

    @property
    def resolver(self) -> CachingResolver:
        return self.relay.resolver

    @property
    def connections(self) -> Any:
        return self.relay.connections

    @property
    def push(self) -> PushNotifier:
        return self.relay.push


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
