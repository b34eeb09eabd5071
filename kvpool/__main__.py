"""``python -m kvpool``: the ``kvpool`` command, for processes started by a path to Python."""

import sys

from kvpool.cli import main

sys.exit(main())
