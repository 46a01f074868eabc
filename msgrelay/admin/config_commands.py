"""`msgrelay-admin config example`: the example configuration shipped inside the package.

`pip install` does not install the repository's etc/ folder, so the build copies
etc/msgrelay.toml into the package (setup.py); a source checkout falls back to etc/ itself.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import click

from .context import AdminFailure


def example_config() -> str:
    """The text of etc/msgrelay.toml: every setting with its default, commented."""
    shipped = files("msgrelay").joinpath("msgrelay.toml")
    if shipped.is_file():
        return shipped.read_text("utf-8")
    checkout = Path(__file__).resolve().parents[2] / "etc" / "msgrelay.toml"
    try:
        return checkout.read_text("utf-8")
    except OSError:
        raise AdminFailure("the example configuration is not installed (reinstall msgrelay with pip install .)")


@click.group("config")
def config() -> None:
    """The relay's configuration file."""


@config.command("example")
def example() -> None:
    """Print an example config with every setting and its default (save it, edit it, --config it)."""
    click.echo(example_config(), nl=False)
