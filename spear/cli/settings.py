"""Where the CLI reads configuration: the spear.toml file (`--config`, `SPEAR_CONFIG`, or
./spear.toml if present), the SPEAR_* environment, then command-line flags."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from spear.core.config import ConfigError, Settings, load_settings, with_overrides


def settings_from(args: argparse.Namespace) -> Settings:
    path = Path(args.config or os.environ.get("SPEAR_CONFIG", "spear.toml"))
    text = path.read_text() if path.exists() else None
    if args.config and text is None:
        raise ConfigError(f"config file {path} not found")
    settings = load_settings(text, os.environ)
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
