"""The `spear` command's entry point, kept light: the command line's modules (nats, aiohttp,
OpenTelemetry) take half a second to import, and a Ctrl-C in that time must end the command like
any other interruption (exit 130, one line), not with a KeyboardInterrupt traceback."""

from __future__ import annotations

import sys

from spear.cli.outcomes import INTERRUPTED  # light: spear.errors only


def main(argv: list[str] | None = None) -> int:
    """Run the command `argv` names (spear.cli.main); 130 if interrupted before it could."""
    try:
        from spear.cli.main import main as run  # the heavy part: imported under the guard

        return run(argv)
    except KeyboardInterrupt:  # spear.cli.main answers its own; this is one during the import
        print("spear: interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED
