"""`python -m spear`: the command line."""

import sys

from spear.cli.entry import main

if __name__ == "__main__":  # not when a child process (isolation="process") re-imports the main module
    sys.exit(main())
