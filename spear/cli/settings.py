"""Where the CLI reads configuration: the spear.toml file (`--config`, else `SPEAR_CONFIG`, else
./spear.toml if present), the SPEAR_* environment, then command-line flags. A file named by
`--config` or `SPEAR_CONFIG` must exist; every error names its source."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from spear.core.config import ConfigError, Settings, load_settings, meant_settings, with_overrides
from spear.telemetry.logs import FORMATS

log = logging.getLogger(__name__)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings for a command: spear.toml, SPEAR_* environment, then its flags."""
    path, named_by = _config_path(args)
    settings = load_settings(_config_text(path, named_by), os.environ, source=str(path))
    _say_misspelt_variables()
    overrides: dict[str, Any] = {}
    if getattr(args, "nats_url", None):
        overrides["nats"] = {"urls": [u.strip() for u in args.nats_url.split(",") if u.strip()]}
    api: dict[str, Any] = {}
    if getattr(args, "http_port", None) is not None:
        api["http_port"] = args.http_port
    if getattr(args, "host", None):
        api["host"] = args.host
    if getattr(args, "insecure", False):
        api["insecure"] = True
    if api:
        overrides["api"] = api
    worker: dict[str, Any] = {}
    if getattr(args, "concurrency", None):
        worker["concurrency"] = args.concurrency
    if getattr(args, "task", None):  # flags replace [worker] tasks, as every flag replaces its setting
        worker["tasks"] = args.task
    if worker:
        overrides["worker"] = worker
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    return with_overrides(settings, **overrides) if overrides else settings


def _config_text(path: Path, named_by: str) -> str | None:
    """The config file's text (None: no file, and none named); ConfigError for one that cannot be read."""
    try:
        return path.read_text(encoding="utf-8") if named_by or path.exists() else None
    except FileNotFoundError:
        raise ConfigError(f"{named_by} names {path}, which does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({named_by or 'default'}): {exc.strerror}") from None
    except UnicodeDecodeError as exc:  # (probe58: a traceback; TOML is UTF-8)
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}), as a TOML file must be") from None


def _say_misspelt_variables() -> None:
    for variable, meant in meant_settings(os.environ):
        log.warning("environment variable %s names no setting and is ignored: did you mean %s?", variable, meant)


def _config_path(args: argparse.Namespace) -> tuple[Path, str]:
    """The file to read and what named it ("" for the optional ./spear.toml)."""
    if args.config:
        return Path(args.config), "--config"
    if os.environ.get("SPEAR_CONFIG"):
        return Path(os.environ["SPEAR_CONFIG"]), "SPEAR_CONFIG"
    return Path("spear.toml"), ""


def log_level(args: argparse.Namespace) -> int:
    """`--log-level`, else `SPEAR_LOG_LEVEL`, else INFO; an unknown name is an error naming its source."""
    if args.log_level:
        name, source = args.log_level, "--log-level"
    else:
        name, source = os.environ.get("SPEAR_LOG_LEVEL") or "INFO", "SPEAR_LOG_LEVEL"
    if name.upper() not in LOG_LEVELS:
        raise ConfigError(f"{source}: unknown log level {name!r} (one of {', '.join(LOG_LEVELS)})")
    return int(logging.getLevelName(name.upper()))


def log_format(args: argparse.Namespace) -> str:
    """`--log-format`, else `SPEAR_LOG_FORMAT`, else text; an unknown one is an error naming its source."""
    name: str
    if getattr(args, "log_format", None):
        name, source = str(args.log_format), "--log-format"
    else:
        name, source = os.environ.get("SPEAR_LOG_FORMAT") or "text", "SPEAR_LOG_FORMAT"
    if name.lower() not in FORMATS:
        raise ConfigError(f"{source}: unknown log format {name!r} (one of {', '.join(FORMATS)})")
    return name.lower()
