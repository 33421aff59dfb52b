"""The Python that spear's own child processes run: this one, without the working directory put
first on its import path (`-P`, Python 3.11).

`python -m spear …` imports `spear` from the working directory before the installed one: a
`spear up` started in an old source checkout ran the checkout's workers and projection beside
its own gateway (probe48). Users' task modules still import from the working directory: loading
them puts it on the path (`spear.worker.loading`), once spear itself is imported.
"""

from __future__ import annotations

import sys

PYTHON = (sys.executable, "-P")  # the start of a child's command line
