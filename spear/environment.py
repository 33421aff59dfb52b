"""The environment a user's program runs in: spear's, without spear's own settings.

Process artifacts, `isolation="process"` children and the child that learns a python artifact's
functions at registration run users' code. A component's `SPEAR_*` variables configure it, and
some are secrets: its NATS login (`SPEAR_NATS__PASSWORD`, a URL with a password in it), API
tokens. A process artifact inherited them, and one that wrote its environment to stderr (a
debugging wrapper does) stored the worker's password in log events that any client may read
(probe57: with it, a `client` forged a terminal event for another caller's execution). Programs
get every other variable, and what spear tells them of their call.
"""

from __future__ import annotations

import os

from spear.core.config import ENV_PREFIX


def for_programs(**spear_variables: str) -> dict[str, str]:
    """The worker's environment without `SPEAR_*`, plus `spear_variables` (SPEAR_EXECUTION_ID,
    …) for the program."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}
    env.update(spear_variables)
    return env
