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

import contextlib
import ctypes
import ctypes.util
import os
import re
import sys

from spear.core.config import ENV_PREFIX


def for_programs(**spear_variables: str) -> dict[str, str]:
    """The worker's environment without `SPEAR_*`, plus `spear_variables` (SPEAR_EXECUTION_ID,
    …) for the program."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}
    env.update(spear_variables)
    return env


# The settings that may hold a secret: logins, tokens, URLs with a password in them, key files
_SECRET_SETTING = re.compile(r"PASSWORD|TOKEN|NATS_URL|NATS__URLS|CREDS|NKEY|TLS_KEY")
PR_SET_DUMPABLE = 4


def keep_secrets_from_user_code() -> None:
    """In a worker, once its settings are read: its secret `SPEAR_*` variables leave its
    environment (code of a registered Python artifact runs in it: `os.environ` showed the NATS
    password, review59), and the process is made non-dumpable, so that another process of its
    user (a process artifact) can no longer read its first environment in /proc/<pid>/environ,
    nor attach to it. Root still can; code running as the worker's user still reads what that
    user may (README, "Security")."""
    for name in [name for name in os.environ if name.startswith(ENV_PREFIX) and _SECRET_SETTING.search(name)]:
        del os.environ[name]
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
