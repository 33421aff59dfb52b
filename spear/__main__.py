import sys

from spear.cli.main import main

sys.exit(main())
