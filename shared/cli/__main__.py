"""`python -m shared.cli`: the operations CLI."""

import sys

from ..local.private import make_private
from .commands import main

# Before the local queue is opened: what it creates (its -wal, -shm) is the user's alone.
make_private()
sys.exit(main())
