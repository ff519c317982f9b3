"""`python -m shared.cli`: the operations CLI."""

import sys

from .commands import main

sys.exit(main())
