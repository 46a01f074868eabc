"""Every operator setting in one table: defaults, validation and the TOML layout.

Options come from defaults, then the TOML file, then the command line; each value is
checked here, in one place, and a bad one is reported as `SettingError` naming it.
"""

from __future__ import annotations

import socket
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Protocol

from .wire.addresses import is_server_name, parse_server


class SettingError(Exception):
    """A bad setting; `str()` is one line naming the setting and what is wrong."""


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    kind: type  # int, str, bool or list (of str)
    default: Any
    check: Optional[Callable[[Any], Optional[str]]] = None  # returns a problem or None
    reloadable: bool = False  # may change on SIGHUP without a restart
    secret: bool = False  # never shown in logs (a reload says only that it changed)

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


def _positive(value: int) -> Optional[str]:
    return None if value > 0 else "must be a positive integer"


def _non_negative(value: int) -> Optional[str]:
    return None if value >= 0 else "must be zero or a positive integer"


def _one_of(*choices: str) -> Callable[[str], Optional[str]]:
    def check(value: str) -> Optional[str]:
        return None if value in choices else f"must be one of {', '.join(choices)}, not {value!r}"
    return check


def _server_name(value: str) -> Optional[str]:
    return None if is_server_name(value) else f"{value!r} is not a DNS name with an optional :port"


#: Suffixes of names that never resolve on the public Internet (RFC 2606, 6761, 6762, 8375
#: and common private conventions).
_PRIVATE_SUFFIXES = ("localhost", "local", "localdomain", "lan", "home", "home.arpa", "internal", "intranet",
                     "corp", "private", "test", "example", "invalid")


def looks_public(name: str) -> bool:
    """Whether a server name looks like a public DNS name: dotted, not an IP address, and
    not under a suffix that only resolves locally. A host name often is none of these."""
    host = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
    host = host.lower().rstrip(".")
    try:
        import ipaddress

        ipaddress.ip_address(host)
        return False
    except ValueError:
        pass
    if "." not in host:
        return False
    return not any(host == s or host.endswith("." + s) for s in _PRIVATE_SUFFIXES)


def _non_empty_list(value: list) -> Optional[str]:
    return None if value else "needs at least one entry"


def _rate(value: str) -> Optional[str]:
    from .ratelimit import Rate

    try:
        Rate.parse(value)
    except ValueError as e:
        return str(e)
    return None


def _networks(value: list) -> Optional[str]:
    import ipaddress

    for entry in value:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            return f"{entry!r} is not an IP address or network (e.g. 10.0.0.1 or 10.0.0.0/8)"
    return None


def _between(low: int, high: int) -> Callable[[int], Optional[str]]:
    def check(value: int) -> Optional[str]:
        return None if low <= value <= high else f"must be between {low} and {high}"
    return check



def _peer_table(value: list) -> Optional[str]:
    from .federation.peers import PeerError, parse_peer_table

    try:
        parse_peer_table(value)
    except PeerError as e:
        return str(e)
    return None


def _name_servers(value: list) -> Optional[str]:
    for entry in value:
        try:
            parse_server(entry)
        except ValueError as e:
            return str(e)
    return None


def _readable_file(value: str) -> Optional[str]:
    if value and not Path(value).is_file():
        return f"{value!r} is not a readable file"
    return None


SETTINGS: list[Setting] = [
    Setting("server", "name", str, "", _server_name),
    Setting("server", "listen", list, ["tcp:8080:interface=127.0.0.1"], _non_empty_list),
    Setting("server", "state_dir", str, "./msgrelay-data"),
    Setting("server", "key_file", str, ""),
    # Read by `msgrelay-admin rotate-key` when it retires a key; the deadline is then fixed.
    Setting("server", "key_grace_period", int, 604800, _non_negative, reloadable=True),
    Setting("server", "key_check_interval", int, 5, _positive),
    # How long /api/v1/server lists a key transition (docs/protocol.md section 5: at least a year).
    Setting("server", "key_transition_keep", int, 34560000, _between(31536000, 2**31), reloadable=True),
    Setting("server", "errors_url", str, ""),
    # Relay processes serving the same listening sockets (msgrelay/workers.py); >1 needs PostgreSQL.
    Setting("server", "workers", int, 1, _between(1, 64)),
    Setting("store", "backend", str, "maildir", _one_of("maildir", "postgresql")),
    Setting("store", "postgres_dsn", str, ""),
    Setting("store", "expire_interval", int, 60, _positive),
    # Memory for recent message bodies, so fetches read no file for them (maildir; 0: off).
    Setting("store", "message_cache_mib", int, 32, _between(0, 65536)),
    # How the maildir keeps pending messages: appended to a log per user, or a file each.
    Setting("store", "maildir_messages", str, "log", _one_of("log", "files")),
    Setting("registration", "mode", str, "open", _one_of("open", "token", "closed"), reloadable=True),
    Setting("registration", "tokens", list, [], reloadable=True, secret=True),
    Setting("limits", "max_body_bytes", int, 1048576, _positive, reloadable=True),
    Setting("limits", "default_ttl", int, 604800, _positive, reloadable=True),
    Setting("limits", "max_ttl", int, 2592000, _positive, reloadable=True),
    Setting("limits", "max_validity", int, 300, _positive, reloadable=True),
    Setting("limits", "max_skew", int, 120, _non_negative, reloadable=True),
    Setting("limits", "token_lifetime", int, 7776000, _non_negative, reloadable=True),
    Setting("limits", "allow_permanent_tokens", bool, True, reloadable=True),
    Setting("limits", "quota_messages", int, 10000, _positive, reloadable=True),
    Setting("limits", "quota_bytes", int, 104857600, _positive, reloadable=True),
    Setting("limits", "fetch_default", int, 100, None, reloadable=True),
    # Bound on a fetch answer's plaintext; at least max_body_bytes (docs/protocol.md section 6).
    Setting("limits", "max_fetch_bytes", int, 4194304, _positive, reloadable=True),
    Setting("limits", "max_tokens_per_user", int, 100, _positive, reloadable=True),
    # Operations (issue 5): proxies, rate limits, timeouts, metrics, logs.
    Setting("server", "trusted_proxies", list, [], _networks, reloadable=True),
    Setting("rate_limits", "register_per_address", str, "20/3600", _rate, reloadable=True),
    Setting("rate_limits", "send_per_address", str, "300/60", _rate, reloadable=True),
    Setting("rate_limits", "fetch_per_user", str, "120/60", _rate, reloadable=True),
    Setting("rate_limits", "token_per_user", str, "60/3600", _rate, reloadable=True),
    Setting("rate_limits", "account_per_user", str, "30/60", _rate, reloadable=True),
    Setting("rate_limits", "token_manage_per_user", str, "60/60", _rate, reloadable=True),
    Setting("rate_limits", "ack_per_user", str, "120/60", _rate, reloadable=True),
    Setting("rate_limits", "exempt", list, [], _networks, reloadable=True),
    Setting("rate_limits", "ipv6_prefix", int, 64, _between(16, 128), reloadable=True),
    Setting("rate_limits", "max_tracked", int, 50000, _positive, reloadable=True),
    Setting("timeouts", "idle", int, 60, _positive, reloadable=True),
    Setting("timeouts", "headers", int, 20, _positive, reloadable=True),
    Setting("timeouts", "body", int, 120, _positive, reloadable=True),
    # Connection caps (issue 9): msgrelay/web/connlimit.py.
    Setting("connections", "per_address", int, 64, _positive, reloadable=True),
    Setting("connections", "max_total", int, 2048, _positive, reloadable=True),
    Setting("connections", "reserve_fds", int, 256, _non_negative, reloadable=True),
    Setting("metrics", "listen", list, []),
    Setting("metrics", "token", str, "", reloadable=True, secret=True),
    Setting("metrics", "stats_interval", int, 60, _positive, reloadable=True),
    Setting("log", "format", str, "text", _one_of("text", "json")),
    Setting("log", "level", str, "info", _one_of("debug", "info", "warn", "error", "critical"), reloadable=True),
    # Federation and push (issue 4): docs/protocol.md sections 7 and 8; see docs/federation.md.
    Setting("federation", "mode", str, "off", _one_of("off", "allowlist", "open"), reloadable=True),
    Setting("federation", "peers", list, [], _peer_table, reloadable=True),
    Setting("federation", "ca_file", str, "", _readable_file),
    Setting("federation", "backoff_min", int, 1, _positive),
    Setting("federation", "backoff_max", int, 3600, _positive),
    Setting("federation", "timeout", int, 30, _positive),
    Setting("federation", "key_refresh", int, 3600, _positive),
    Setting("federation", "max_queue", int, 100000, _positive),
    # PostgreSQL store only: how often a relay looks for packets other processes queued.
    Setting("federation", "poll_interval", int, 5, _positive),
    Setting("push", "allow_private", bool, False),
    Setting("push", "ca_file", str, "", _readable_file),
    Setting("push", "retries", int, 3, _between(0, 10)),
    Setting("push", "timeout", int, 10, _positive),
    Setting("push", "backoff_min", int, 1, _positive),
    Setting("push", "backoff_max", int, 60, _positive),
    # The browser client at /app/ (issue 12, docs/web-client.md); needs a restart.
    Setting("web_client", "enabled", bool, True),
    # DNS for push endpoints and federation (issue 9): msgrelay/federation/resolver.py.
    Setting("dns", "servers", list, [], _name_servers),
    Setting("dns", "timeout", int, 5, _between(1, 60)),
    Setting("dns", "max_concurrent", int, 64, _positive),
    Setting("dns", "cache_ttl", int, 300, _non_negative),
    Setting("dns", "negative_ttl", int, 60, _non_negative),
    Setting("dns", "cache_size", int, 10000, _positive),
    # Thread pools (issue 8): the most threads for each kind of blocking work.
    Setting("pools", "store", int, 32, _between(1, 256)),
    Setting("pools", "outbox", int, 4, _between(1, 64)),
    # 0: one fewer than the CPUs the process may run on, at least one (pools.pool_size).
    Setting("pools", "crypto", int, 0, _between(0, 64)),
]

BY_NAME = {s.name: s for s in SETTINGS}


def _typed(setting: Setting, value: Any) -> Any:
    kind = setting.kind
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise SettingError(f"{setting.name}: must be an integer, not {value!r}")
    if kind is bool and not isinstance(value, bool):
        raise SettingError(f"{setting.name}: must be true or false, not {value!r}")
    if kind is str and not isinstance(value, str):
        raise SettingError(f"{setting.name}: must be a string, not {value!r}")
    if kind is list:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise SettingError(f"{setting.name}: must be a list of strings, not {value!r}")
        return tuple(value)  # frozen settings hold tuples
    return value


def read_toml(path: str) -> dict[str, Any]:
    """Flatten a TOML config to {"section.key": value}, refusing unknown names."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise SettingError(f"--config: cannot read {path}: {e.strerror}")
    except tomllib.TOMLDecodeError as e:
        raise SettingError(f"--config: {path} is not valid TOML: {e}")
    flat: dict[str, Any] = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise SettingError(f"{section}: expected a [{section}] table in {path}")
        for key, value in table.items():
            if isinstance(value, dict):
                flat.update({f"{section}.{key}.{k}": v for k, v in value.items()})
            else:
                flat[f"{section}.{key}"] = value
    return flat


def resolve(file_values: dict[str, Any], overrides: dict[str, Any]) -> "Settings":
    """Defaults < file < command line; every value typed and checked."""
    values: dict[str, Any] = {}
    from_host = False
    merged = {**file_values, **overrides}
    for name in merged:
        if name not in BY_NAME:
            raise SettingError(f"{name}: unknown setting")
    for setting in SETTINGS:
        value = merged.get(setting.name, setting.default)
        value = _typed(setting, value)
        if setting.name == "server.name" and not value:
            value = socket.gethostname().lower()
            from_host = True
        if setting.check is not None:
            problem = setting.check(value)
            if problem:
                raise SettingError(f"{setting.name}: {problem}")
        values[setting.name] = value
    if values["limits.default_ttl"] > values["limits.max_ttl"]:
        raise SettingError("limits.default_ttl: must not exceed limits.max_ttl")
    if values["registration.mode"] == "token" and not values["registration.tokens"]:
        raise SettingError("registration.tokens: mode 'token' needs at least one registration token")
    if values["store.backend"] == "postgresql" and not values["store.postgres_dsn"]:
        raise SettingError("store.postgres_dsn: needed when store.backend is 'postgresql'")
    if values["server.workers"] > 1 and values["store.backend"] != "postgresql":
        raise SettingError(f"server.workers: {values['server.workers']} needs store.backend = 'postgresql': the "
                           "maildir store's index, quota and dedup are kept in one process (docs/operations.md)")
    from .relay import MAX_FETCH_LIMIT

    if not 1 <= values["limits.fetch_default"] <= MAX_FETCH_LIMIT:
        raise SettingError(f"limits.fetch_default: must be between 1 and {MAX_FETCH_LIMIT}")
    if values["limits.max_fetch_bytes"] < values["limits.max_body_bytes"]:
        raise SettingError("limits.max_fetch_bytes: must be at least limits.max_body_bytes, "
                           "so that any message a relay accepts can be fetched")
    _check_federation(values)
    return Settings.from_values(values, name_from_host=from_host)


def _check_federation(values: dict[str, Any]) -> None:
    """Cross-checks of the federation settings (each one alone was checked above)."""
    if values["federation.backoff_min"] > values["federation.backoff_max"]:
        raise SettingError("federation.backoff_min: must not exceed federation.backoff_max")
    if values["push.backoff_min"] > values["push.backoff_max"]:
        raise SettingError("push.backoff_min: must not exceed push.backoff_max")
    # An allowlist with no peers yet is allowed (the relay logs a warning): you need the
    # other relay's fingerprint first, and peers are added later with a SIGHUP.
    own = values["server.name"].lower()
    for entry in values["federation.peers"]:
        if entry.partition("=")[0].strip().lower() == own:
            raise SettingError(f"federation.peers: {own} is this relay's own name, not a peer")


# -- the typed, frozen settings ------------------------------------------------------
#
# One frozen dataclass per section, one field per SETTINGS row of that section (lists are
# tuples). Adding a setting is two lines: its row in SETTINGS and its field here. Import
# fails (and tests/test_settings.py says which) if the two disagree.

Strings = tuple[str, ...]


@dataclass(frozen=True)
class ServerSettings:
    name: str
    listen: Strings
    state_dir: str
    key_file: str
    key_grace_period: int
    key_check_interval: int
    errors_url: str
    trusted_proxies: Strings
    key_transition_keep: int
    workers: int


@dataclass(frozen=True)
class StoreSettings:
    backend: str
    postgres_dsn: str
    expire_interval: int
    message_cache_mib: int
    maildir_messages: str


@dataclass(frozen=True)
class RegistrationSettings:
    mode: str
    tokens: Strings


@dataclass(frozen=True)
class LimitsSettings:
    max_body_bytes: int
    default_ttl: int
    max_ttl: int
    max_validity: int
    max_skew: int
    token_lifetime: int
    allow_permanent_tokens: bool
    quota_messages: int
    quota_bytes: int
    fetch_default: int
    max_fetch_bytes: int
    max_tokens_per_user: int


@dataclass(frozen=True)
class RateLimitsSettings:
    register_per_address: str
    send_per_address: str
    fetch_per_user: str
    token_per_user: str
    exempt: Strings
    ipv6_prefix: int
    max_tracked: int
    account_per_user: str
    token_manage_per_user: str
    ack_per_user: str


@dataclass(frozen=True)
class TimeoutsSettings:
    idle: int
    headers: int
    body: int


@dataclass(frozen=True)
class MetricsSettings:
    listen: Strings
    token: str
    stats_interval: int


@dataclass(frozen=True)
class LogSettings:
    format: str
    level: str


@dataclass(frozen=True)
class FederationSettings:
    mode: str
    peers: Strings
    ca_file: str
    backoff_min: int
    backoff_max: int
    timeout: int
    key_refresh: int
    max_queue: int
    poll_interval: int


@dataclass(frozen=True)
class PushSettings:
    allow_private: bool
    ca_file: str
    retries: int
    timeout: int
    backoff_min: int
    backoff_max: int


@dataclass(frozen=True)
class PoolsSettings:
    store: int
    outbox: int
    crypto: int


@dataclass(frozen=True)
class ConnectionsSettings:
    per_address: int
    max_total: int
    reserve_fds: int


@dataclass(frozen=True)
class WebClientSettings:
    enabled: bool


@dataclass(frozen=True)
class DnsSettings:
    servers: Strings
    timeout: int
    max_concurrent: int
    cache_ttl: int
    negative_ttl: int
    cache_size: int


@dataclass(frozen=True)
class Settings:
    """Resolved settings, frozen: `settings.limits.max_ttl`. A reload makes a new object."""

    server: ServerSettings
    store: StoreSettings
    registration: RegistrationSettings
    limits: LimitsSettings
    rate_limits: RateLimitsSettings
    timeouts: TimeoutsSettings
    metrics: MetricsSettings
    log: LogSettings
    federation: FederationSettings
    push: PushSettings
    pools: PoolsSettings
    connections: ConnectionsSettings
    web_client: WebClientSettings
    dns: DnsSettings
    #: True when server.name was not set and is the machine's host name (a start-up warning).
    name_from_host: bool = False

    @classmethod
    def from_values(cls, values: dict[str, Any], name_from_host: bool = False) -> "Settings":
        """From {"section.key": value} holding every setting (as `resolve` makes it)."""
        sections: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            section, key = name.split(".", 1)
            sections.setdefault(section, {})[key] = tuple(value) if isinstance(value, list) else value
        return cls(**{name: SECTION_TYPES[name](**sections[name]) for name in SECTION_TYPES},
                   name_from_host=name_from_host)

    @property
    def values(self) -> dict[str, Any]:
        """Every setting as {"section.key": value}."""
        return {s.name: self.get(s.name) for s in SETTINGS}

    def get(self, name: str) -> Any:
        section, key = name.split(".", 1)
        return getattr(getattr(self, section), key)

    @property
    def state_dir(self) -> Path:
        return Path(self.server.state_dir)

    def key_path(self) -> Path:
        return Path(self.server.key_file) if self.server.key_file else self.state_dir / "server_key.pem"

    def reload_to(self, new: "Settings") -> "Reload":
        """What a SIGHUP does with a freshly read `new`: a reload whose `running` object holds
        `new`'s reloadable values and this object's other values (they need a restart).
        Each change is logged; a secret's values never are."""
        from twisted.logger import Logger

        log = Logger(namespace="msgrelay.settings")
        applied: list[str] = []
        needs_restart: list[str] = []
        running = self.values
        for setting in SETTINGS:
            name = setting.name
            old, value = self.get(name), new.get(name)
            if old == value:
                continue
            shown_old, shown_new = ("(hidden)", "(hidden)") if setting.secret else (_shown(old), _shown(value))
            if setting.reloadable:
                running[name] = value
                applied.append(name)
                log.info("reload: {setting} changed from {old} to {new}", setting=name, old=shown_old, new=shown_new)
            else:
                needs_restart.append(name)
                log.warn("reload: {setting} changed in the configuration ({old} to {new}) but needs a restart; "
                         "still using {old}", setting=name, old=shown_old, new=shown_new)
        return Reload(self, Settings.from_values(running, self.name_from_host), tuple(applied), tuple(needs_restart))


def _shown(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


SECTION_TYPES: dict[str, type] = {
    "server": ServerSettings, "store": StoreSettings, "registration": RegistrationSettings,
    "limits": LimitsSettings, "rate_limits": RateLimitsSettings, "timeouts": TimeoutsSettings,
    "metrics": MetricsSettings, "log": LogSettings, "federation": FederationSettings,
    "push": PushSettings, "pools": PoolsSettings, "connections": ConnectionsSettings,
    "web_client": WebClientSettings, "dns": DnsSettings,
}

_ANNOTATION = {int: "int", str: "str", bool: "bool", list: "Strings"}


def table_mismatches() -> list[str]:
    """Where SETTINGS and the dataclasses above disagree (empty when they agree)."""
    problems: list[str] = []
    rows = {s.name: s for s in SETTINGS}
    sections = {f.name for f in fields(Settings) if f.name != "name_from_host"}
    for section in sorted(({s.section for s in SETTINGS} | set(SECTION_TYPES)) ^ sections):
        problems.append(f"section {section!r}: needs a field of Settings and an entry in SECTION_TYPES")
    for section, kind in SECTION_TYPES.items():
        declared = {f"{section}.{f.name}": f.type for f in fields(kind)}
        for name in sorted(set(declared) - set(rows)):
            problems.append(f"{name}: a field of {kind.__name__} without a SETTINGS row")
        for name, row in rows.items():
            if row.section != section:
                continue
            if name not in declared:
                problems.append(f"{name}: a SETTINGS row without a field in {kind.__name__}")
            elif declared[name] != _ANNOTATION[row.kind]:
                problems.append(f"{name}: field type {declared[name]} but the row says {row.kind.__name__}")
    return problems


_problems = table_mismatches()
if _problems:
    raise ImportError("msgrelay.settings: SETTINGS and the section dataclasses disagree: " + "; ".join(_problems))


@dataclass(frozen=True)
class Reload:
    """One SIGHUP: the settings before, the settings now running, and what changed."""

    old: Settings
    running: Settings
    applied: tuple[str, ...]
    needs_restart: tuple[str, ...]

    @property
    def sections(self) -> frozenset[str]:
        """The sections with an applied change."""
        return frozenset(name.split(".", 1)[0] for name in self.applied)


#: `settings_sections` of a component told of every reload, even one changing nothing.
EVERY_RELOAD: frozenset[str] = frozenset({"*"})


class Reconfigurable(Protocol):
    """A component told of a reload changing a section it reads (`settings_sections`)."""

    settings_sections: ClassVar[frozenset[str]]

    def reconfigure(self, reload: Reload) -> None:
        """Take `reload.running` (the whole new frozen object) for the next use."""
