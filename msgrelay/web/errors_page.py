"""The errno reference page, shipped with the package and served at /errors."""

from importlib.resources import files

ERRORS_PAGE: bytes = files("msgrelay.web").joinpath("errors.md").read_bytes()
