"""What every `msgrelay-admin` command shares: settings, output mode, failures and exit codes.

Settings are resolved exactly as `twistd msgrelay` resolves them (settings.read_toml and
settings.resolve), from `--config` and `--state-dir`, which are accepted before or after the
command name. Other command groups (e.g. `queue`) use `pass_admin` and `common_options`.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import click

from ..settings import BY_NAME, SettingError, Settings, read_toml, resolve
from ..startrecord import RECORD_NAME, read_record

# Exit codes (docs/admin.md lists them too).
EXIT_OK = 0
EXIT_FAILED = 1  # damage found, or the operation failed (missing state dir, store down, unknown user)
EXIT_USAGE = 2  # bad arguments, bad config file or setting

#: Settings twistd msgrelay takes on its command line, which only the relay's record holds.
_COMMAND_LINE_SETTINGS = ("server.name", "server.listen", "federation.", "log.")
_DURATION = re.compile(r"([0-9]+)[ \t]*([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class AdminFailure(click.ClickException):
    """An expected failure: one line on stderr, no traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it per instance too

    def show(self, file: Any = None) -> None:
        click.echo(f"msgrelay-admin: error: {self.format_message()}", err=True)


class AdminContext:
    """Options gathered from the group and the command; settings resolved on first use."""

    def __init__(self) -> None:
        self.config: Optional[str] = None
        self.state_dir: Optional[str] = None
        self.as_json = False
        self._settings: Optional[Settings] = None

    @property
    def settings(self) -> Settings:
        """Resolved as the relay resolved them: its config file, then the command-line options it
        recorded at its last start (relay-options.json in the state directory), then ours."""
        if self._settings is None:
            overrides: dict[str, Any] = {}
            if self.state_dir is not None:
                overrides["server.state_dir"] = self.state_dir
            state_dir = "?"
            recorded: dict[str, Any] = {}
            try:
                file_values = read_toml(self.config) if self.config else {}
                state_dir = overrides.get("server.state_dir") or file_values.get("server.state_dir") \
                    or BY_NAME["server.state_dir"].default
                config, recorded = read_record(Path(state_dir))
                if self.config is None and config is not None and os.path.exists(config):
                    file_values = read_toml(config)
                self._settings = resolve(file_values, {**recorded, **overrides})
            except SettingError as e:
                hint = ""
                if not recorded and str(e).startswith(_COMMAND_LINE_SETTINGS):
                    hint = (f" (msgrelay-admin reads the command-line options the relay recorded in {state_dir}/"
                            f"{RECORD_NAME} at its last start, and found none: give --state-dir DIR as given to "
                            "twistd msgrelay, or start the relay once)")
                raise AdminFailure(f"{e}{hint}", EXIT_USAGE)
        return self._settings

    def require_state_dir(self) -> Settings:
        settings = self.settings
        if not settings.state_dir.is_dir():
            raise AdminFailure(
                f"state directory {settings.state_dir} does not exist (give --state-dir DIR or --config PATH)"
            )
        return settings

    def require_owner(self) -> Settings:
        """Refuse to write into a state directory of another user (typically: run as root).

        Files and folders created now would belong to this user, and the relay, running as
        the directory's owner, could not read its new key or write into a recreated folder.
        """
        settings = self.require_state_dir()
        owner = settings.state_dir.stat().st_uid
        if os.geteuid() != owner:
            try:
                name = pwd.getpwuid(owner).pw_name
            except KeyError:
                name = f"#{owner}"
            raise AdminFailure(
                f"{settings.state_dir} belongs to user {name}: run this command as that user "
                f"(e.g. sudo -u {name} msgrelay-admin ...), so the files it writes stay usable by the relay"
            )
        return settings

    def emit(self, data: Any, lines: Iterable[str]) -> None:
        """One JSON document with --json, else the human lines."""
        if self.as_json:
            click.echo(json.dumps(data, sort_keys=True, ensure_ascii=False))
        else:
            for line in lines:
                click.echo(line)


pass_admin = click.make_pass_decorator(AdminContext, ensure=True)


def _setter(attribute: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def store(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is not None and value is not False:
            setattr(ctx.ensure_object(AdminContext), attribute, value)
    return store


def common_options(function: Callable) -> Callable:
    """--config, --state-dir and --json, accepted on the group and on every command."""
    options = [
        click.option("--config", "-c", metavar="PATH", expose_value=False, callback=_setter("config"),
                     help="The relay's TOML config file (as given to twistd msgrelay --config)."),
        click.option("--state-dir", "-d", metavar="DIR", expose_value=False, callback=_setter("state_dir"),
                     help="The relay's state directory (overrides server.state_dir)."),
        click.option("--json", "as_json", is_flag=True, default=None, expose_value=False,
                     callback=_setter("as_json"), help="One JSON document on stdout, for scripts."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), function)


def parse_duration(text: str) -> int:
    """`90`, `45m`, `12h`, `7d`, `2w` -> seconds (0 allowed)."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 45m, 12h, 7d or 2w")
    return int(match.group(1)) * _UNITS[match.group(2)]


def describe_age(seconds: float) -> str:
    """A short human age: 45s, 12m, 3h 5m, 2d 4h."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"
