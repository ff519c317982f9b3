"""`python -m benchmarks [--quick] [--only NAME ...]`: JSON lines on stdout, progress on stderr."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable

from . import end_to_end, memory, processor, receiver, runtime_host, vehicle_state
from .common import note

BENCHMARKS: dict[str, Callable[..., None]] = {
    receiver.HOT_PATH: receiver.hot_path,
    receiver.CONCURRENCY: receiver.concurrency,
    processor.NAME: processor.run,
    end_to_end.NAME: end_to_end.run,
    vehicle_state.NAME: vehicle_state.run,
    runtime_host.NAME: runtime_host.run,
    memory.NAME: memory.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="a fast smoke run: fewer and shorter rounds, noisier figures")
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS),
                        help="run only this benchmark (repeatable)")
    args = parser.parse_args(argv)
    # Warnings only: the receiver's INFO line per request would flood the terminal.
    logging.basicConfig(level=logging.WARNING)
    for name in args.only or list(BENCHMARKS):
        started = time.perf_counter()
        BENCHMARKS[name](quick=args.quick)
        note(f"{name}: {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
