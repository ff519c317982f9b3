"""`python -m shared.local`: start the local host (what `make run` does)."""

import sys

from .host import main

sys.exit(main())
