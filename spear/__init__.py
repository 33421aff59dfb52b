"""spear: event-sourced function invocation on NATS JetStream."""

from importlib import metadata

try:  # one version, pyproject.toml's, read from the installed package's metadata
    __version__ = metadata.version("spear")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"
