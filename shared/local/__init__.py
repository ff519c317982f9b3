"""What runs only on a developer's machine: the local host, its embedded SQLite queue and
group commit. `.funcignore` keeps this package out of the deployment; nothing deployed
imports it (`shared/runtime.py` reaches it lazily, in local mode only).

Start it with `make run` (or `python -m shared.local`).
"""
