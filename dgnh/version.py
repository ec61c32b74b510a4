"""The installed version of dgnh (set once, in ``pyproject.toml``)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dgnh")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"
