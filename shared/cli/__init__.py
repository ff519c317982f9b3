"""The operations CLI (`python -m shared.cli`), its queue backends and the webhook sender.

An operator's tool, not deployed (`.funcignore`): see `commands.py` for the commands.
"""

from .commands import main

__all__ = ["main"]
