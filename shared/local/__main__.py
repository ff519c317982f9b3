"""`python -m shared.local`: start the local host (what `make run` does)."""

import sys

from .command import main

sys.exit(main())
