"""Log output for `twistd msgrelay`: text or JSON lines, filtered by level.

twistd owns logging: it begins logging after `makeService`, to the observer of its
`--logger` option if given, else to the application's `ILogObserver` component if it has
one, else to one it builds from its own options (`--logfile`, `--syslog`). msgrelay gives
the application that component (see `RelayService` in service.py), built here from the
same twistd options, so `--logfile` and friends keep their meaning, plus two settings:

- `log.format` ("text" or "json", or `--log-format`): "json" writes one JSON object per
  line with `time`, `level`, `namespace`, `message` and the event's own fields; the access
  log line carries `method`, `path`, `status`, `errno`, `duration_ms` and `client`.
- `log.level` (or `--log-level`): the least severe level written; a SIGHUP reload
  applies at once (`LevelPredicate.reconfigure`).

An explicit `twistd --logger ...` still wins (then neither setting applies).

With `server.workers > 1` each worker formats and filters its own lines, tagged with its
index and pid (`worker_tag`), and writes them to a pipe; the parent passes them on as they
are (`WORKER_OUTPUT` events), so a worker's JSON line stays one JSON object in the log.

Every answered request is logged, so formatting is on the hot path: both formats keep the
current second's timestamp text and format plain `{name}` messages with `str.format_map`,
leaving anything else (tracebacks, `{call()}` fields, legacy events) to Twisted's formatter.
"""

from __future__ import annotations

import json
import math
import signal
import sys
from datetime import datetime, timezone
from functools import partial
from typing import Any, Callable, ClassVar, Optional

from twisted.logger import (
    FileLogObserver, FilteringLogObserver, ILogFilterPredicate, ILogObserver, LegacyLogObserverWrapper, LogLevel,
    PredicateResult, formatEvent, formatEventAsClassicLogText, formatTime,
)
from zope.interface import implementer
from twisted.python import logfile

from .settings import Reload

#: The namespace of a worker's output as its parent passes it on: lines the worker has already
#: formatted and filtered, in the event's `worker_output` field, written as they are.
WORKER_OUTPUT = "msgrelay.workers.output"

#: Keys of legacy (twisted.python.log) events that repeat what `message` already says.
_NOISE = {"message", "format", "isError", "system", "time", "why", "failure"}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def message_text(event: dict[str, Any]) -> str:
    """`formatEvent(event)`, with plain formats (no `{call()}` fields) done by `str.format_map`."""
    fmt = event.get("log_format")
    if isinstance(fmt, str) and "()" not in fmt and "log_flattened" not in event:
        try:
            return fmt.format_map(event)
        except Exception:
            pass  # Twisted's formatter says what could not be formatted
    return formatEvent(event)


def _verbatim(event: dict[str, Any]) -> Optional[str]:
    """A worker's already formatted lines, when `event` carries them."""
    if event.get("log_namespace") == WORKER_OUTPUT:
        text = event.get("worker_output")
        if isinstance(text, str):
            return text
    return None


def worker_tag(index: int, pid: int) -> dict[str, int]:
    """The fields a worker adds to each of its lines, so that the parent's log says whose."""
    return {"worker": index, "worker_pid": pid}


class SecondCache:
    """`render(whole second)` computed once per second: log timestamps cost a strftime and a
    time zone lookup each, and a busy relay writes hundreds of lines a second."""

    def __init__(self, render: Callable[[int], str]):
        self._render = render
        self._last: tuple[int, str] = (-1, "")  # one tuple: threads that log may race here

    def __call__(self, when: float) -> tuple[str, int]:
        """The text of `when`'s second and the microseconds past it, rounded as
        `datetime.fromtimestamp` rounds them."""
        fraction, whole = math.modf(when)
        micro = round(fraction * 1e6)
        second = int(whole)
        if micro >= 1_000_000:
            second, micro = second + 1, micro - 1_000_000
        elif micro < 0:
            second, micro = second - 1, micro + 1_000_000
        last = self._last
        if last[0] != second:
            last = self._last = (second, self._render(second))
        return last[1], micro


class TextFormatter:
    """Twisted's classic text lines (`formatEventAsClassicLogText`), faster for common events.
    A worker's `tag` goes after the `[namespace#level]` part: `worker 1 pid 4242: `."""

    def __init__(self, tag: Optional[dict[str, int]] = None) -> None:
        self._time = SecondCache(lambda second: formatTime(second))
        self._tag = f"worker {tag['worker']} pid {tag['worker_pid']}: " if tag else ""

    def format_time(self, when: Optional[float]) -> str:
        return formatTime(when) if when is None else self._time(when)[0]

    def __call__(self, event: dict[str, Any]) -> Optional[str]:
        verbatim = _verbatim(event)
        if verbatim is not None:
            return verbatim
        level, namespace, when = event.get("log_level"), event.get("log_namespace"), event.get("log_time")
        if ("log_failure" in event or "log_system" in event or level is None or namespace is None or when is None
                or not isinstance(event.get("log_format"), str)):
            line = formatEventAsClassicLogText(event, formatTime=self.format_time)
            if line and self._tag:
                head, bracket, rest = line.partition("] ")
                line = head + bracket + self._tag + rest if bracket else self._tag + line
            return line
        text = message_text(event)
        if not text:
            return None
        return f"{self._time(when)[0]} [{namespace}#{level.name}] {self._tag}{text.replace(chr(10), chr(10) + chr(9))}\n"


def _iso_second(second: int) -> str:
    return datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


_JSON_TIME = SecondCache(_iso_second)


def json_time(stamp: float) -> str:
    """`stamp` as UTC ISO 8601 with milliseconds, e.g. 2026-01-02T03:04:05.678Z."""
    text, micro = _JSON_TIME(stamp)
    return f"{text}.{micro // 1000:03d}Z"


def json_line(event: dict[str, Any], tag: Optional[dict[str, int]] = None) -> str:
    """One event as one line of JSON (newline-terminated); a worker's `tag` fields come first."""
    verbatim = _verbatim(event)
    if verbatim is not None:
        return verbatim
    level = event.get("log_level")
    stamp = event.get("log_time")
    record: dict[str, Any] = {
        "time": json_time(stamp) if stamp is not None else None,
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace"),
        "message": message_text(event),
    }
    if tag:
        record.update(tag)
    for key, value in event.items():
        if key.startswith("log_") or key in record or key in _NOISE:
            continue
        record[key] = _jsonable(value)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = repr(failure)
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


def json_file_observer(out: Any, tag: Optional[dict[str, int]] = None) -> ILogObserver:
    return FileLogObserver(out, partial(json_line, tag=tag) if tag else json_line)


#: What a reload did is always logged (at info and above), whatever log.level says: the
#: operator asked for it, and a reload may itself change log.level.
ALWAYS_INFO = frozenset({"msgrelay.reload", "msgrelay.settings"})


@implementer(ILogFilterPredicate)
class LevelPredicate:
    """Passes events at or above `level`, a level name; a reload of `log.level` changes it."""

    settings_sections: ClassVar[frozenset[str]] = frozenset({"log"})

    def __init__(self, level: str):
        self.level = level

    @property
    def level(self) -> str:
        return self._name

    @level.setter
    def level(self, name: str) -> None:
        self._wanted = LogLevel.levelWithName(name)
        self._name = name

    def reconfigure(self, reload: Reload) -> None:
        self.level = reload.running.log.level

    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        wanted = self._wanted
        level = event.get("log_level", LogLevel.info)
        namespace = event.get("log_namespace")
        if namespace == WORKER_OUTPUT:
            return PredicateResult.maybe  # the worker filtered its lines by the same setting
        if namespace in ALWAYS_INFO:
            wanted = min(wanted, LogLevel.info)
        return PredicateResult.maybe if level >= wanted else PredicateResult.no


class TwistdLogOptions:
    """The twistd options that decide where logs go (captured by `Options.postOptions`)."""

    def __init__(self, parent: Any = None):
        get = parent.get if parent is not None else (lambda key, default=None: default)
        self.logfile: str = get("logfile", "") or ""
        self.nodaemon: bool = bool(get("nodaemon", False))
        self.syslog: bool = bool(get("syslog", False))
        self.prefix: str = get("prefix", "") or ""
        self.logger: Optional[str] = get("logger", None) or None
        self.under_twistd = parent is not None

    @property
    def ours(self) -> bool:
        """Whether msgrelay builds the observer (not when the operator named a --logger)."""
        return self.under_twistd and self.logger is None


def build_observer(twistd: TwistdLogOptions, fmt: str, level: LevelPredicate,
                   warn: Callable[[str], None] = lambda message: None,
                   tag: Optional[dict[str, int]] = None) -> ILogObserver:
    """The observer twistd would have built from its options, in `fmt`, filtered by level;
    a worker's lines carry its `tag`."""
    if twistd.syslog:
        from twisted.python import syslog

        if fmt == "json":
            warn("log.format = \"json\" does not apply with twistd --syslog; syslog gets text")
        destination: ILogObserver = LegacyLogObserverWrapper(
            syslog.SyslogObserver(twistd.prefix).emit)  # type: ignore[arg-type]  # a legacy observer, as it should be
    else:
        if twistd.logfile == "-" or (twistd.nodaemon and not twistd.logfile):
            out: Any = sys.stdout
        else:
            out = logfile.LogFile.fromFullPath(twistd.logfile or "twistd.log")
            _rotate_on_usr1(out)
        destination = json_file_observer(out, tag) if fmt == "json" else FileLogObserver(out, TextFormatter(tag))
    return FilteringLogObserver(destination, [level])


def _rotate_on_usr1(out: logfile.LogFile) -> None:
    """As twistd does for its own log file: SIGUSR1 rotates it."""
    if signal.getsignal(signal.SIGUSR1):
        return

    def rotate(signum: int, frame: Any) -> None:
        from twisted.internet import reactor as default_reactor

        reactor: Any = default_reactor
        reactor.callFromThread(out.rotate)

    signal.signal(signal.SIGUSR1, rotate)

