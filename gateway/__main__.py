"""``python -m gateway``: the same as the ``meshgate`` console script."""

import sys

from gateway.cli import main

sys.exit(main())
