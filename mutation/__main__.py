"""`python -m mutation` (`make mutate`): run mutmut afresh, then print one JSON line per module.

mutmut's own progress goes to stderr, and so do the survivors (what no test noticed) and stale
equivalents (killed, or matching no mutant of the run); stdout has only the JSON lines. The exit
status is 1 when a module is below its target score. `--summary-only` re-reads the results of
the last run in mutants/ without running.

What is mutated: the files `[tool.mutmut] only_mutate` names (pyproject.toml), every function,
except where SCOPE narrows a module to some of its functions. `--module` (repeatable) limits a run
and its summary to some of those modules, e.g. after adding a module, without re-running the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests import azurite

from .summary import (
    load_equivalents,
    module_globs,
    module_name,
    mutant_glob,
    mutated_paths,
    summarise,
)

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENTS = Path(__file__).with_name("equivalent.toml")
#: Minimum score per module (issue 15); every other mutated module needs DEFAULT_TARGET.
TARGETS = {"shared.signature": 0.95, "shared.receiver": 0.95, "shared.processor": 0.95}
DEFAULT_TARGET = 0.90
#: The front door (shared/local/http.py) is scored for the rules it keeps on top of llhttp as
#: it parses: the head's checks (version, target, framing fields, transfer coding, Expect),
#: the head and framing limits, and the body's cut at its limit. The rest of it (routing, the
#: answers' encoding, accepting, deadlines, back-pressure, eviction, stop) is tested by
#: behaviour in test_local_http.py, test_slow_clients.py and test_front_door.py, but not
#: scored: each of its surviving mutants reruns the whole HTTP suite, hours in all.
#: The local queue is tested for its settlement code (peek-lock, complete, abandon, dead-letter,
#: lock expiry, a damaged row dead-lettered on receive, messages locked at send for the local
#: host's free workers), the semantics the processor relies on; its storage set-up and CLI
#: operations are not in scope, nor are its sibling modules (queue_rows.py, queue_schema.py,
#: queue_open.py: row types and decoding, the schema, opening a state directory's queue),
#: which is why only_mutate does not name them.
SCOPE = {
    "shared.local.queue": [
        "_max_delivery_description",
        "_undecodable_description",
        "LocalQueue._transaction",
        "LocalQueue._sweep_expired_locks",
        "LocalQueue.send_and_lock",
        "LocalQueue._send",
        "LocalQueue._send_once",
        "LocalQueue._any_available",
        "LocalQueue._locked_row",
        "LocalQueue._dead_letter_row",
        "LocalQueue.receive",
        "LocalQueue.complete_and_receive",
        "LocalQueue._complete_rows",
        "LocalQueue.renew_lock",
        "LocalQueue.complete",
        "LocalQueue.complete_many",
        "LocalQueue.abandon",
        "LocalQueue.dead_letter",
        "LocalQueue.dead_letter_by_sequence",
    ],
    "shared.local.http": [
        "_Connection.on_url",
        "_Connection.on_header",
        "_Connection._head_size",
        "_Connection.on_body",
        "_Connection._count",
        "_Connection._check_head",
    ],
}


def paths(modules: Sequence[str] = ()) -> list[str]:
    """The mutated files, or those of `modules` (dotted names) only."""
    every = mutated_paths(ROOT / "pyproject.toml")
    if not modules:
        return every
    unknown = sorted(set(modules) - {module_name(p) for p in every})
    if unknown:
        raise SystemExit(f"--module {', '.join(unknown)}: not in [tool.mutmut] only_mutate "
                         f"(pyproject.toml); expected one of "
                         f"{', '.join(module_name(p) for p in every)}")
    return [p for p in every if module_name(p) in modules]


def globs(modules: Sequence[str] = ()) -> list[str]:
    result = []
    for path in paths(modules):
        module = module_name(path)
        functions = SCOPE.get(module)
        if functions is None:
            result.extend(module_globs(module))
        else:
            result.extend(mutant_glob(module, f) for f in functions)
    return result


def run_mutmut(jobs: int, modules: Sequence[str]) -> None:
    # A fresh run: mutmut would otherwise keep earlier verdicts for unchanged functions, and a
    # score must reflect today's tests.
    shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    started = time.monotonic()
    env = dict(os.environ)
    if Path("/dev/shm").is_dir():  # noqa: S108 - a tmpfs, not a shared temporary file
        # The tests' temporary files (SQLite queues with synchronous=FULL) on tmpfs: an fsync
        # on a busy disk would otherwise dominate each mutant's run.
        env["TMPDIR"] = "/dev/shm"  # noqa: S108
    # The store tests' Table cases start Azurite from this checkout's node_modules, which
    # mutmut's copy of the repository (mutants/) does not have.
    env.setdefault(azurite.BIN_DIR_VARIABLE, str(azurite.BIN_DIR))
    subprocess.run(  # noqa: S603 - our own interpreter and fixed arguments
        [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *globs(modules)],
        cwd=ROOT, stdout=sys.stderr, check=True, env=env,
    )
    print(f"mutmut run took {time.monotonic() - started:.0f}s with {jobs} workers",
          file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m mutation", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=3, help="mutants tested in parallel")
    parser.add_argument("--summary-only", action="store_true",
                        help="summarise the last run in mutants/ without running mutmut")
    parser.add_argument("--module", action="append", default=[], metavar="NAME",
                        help="only this module of only_mutate, e.g. shared.retry (repeatable)")
    args = parser.parse_args()
    paths(args.module)  # an unknown name stops here, before a run
    if not args.summary_only:
        run_mutmut(args.jobs, args.module)
    equivalents = load_equivalents(EQUIVALENTS)
    scores = summarise(ROOT, paths(args.module), equivalents, globs(args.module))
    below = []
    for score in scores:
        print(json.dumps(score.line()), flush=True)
        for m in score.survivors:
            print(f"survived: {m.module} {m.function} ({m.key})\n  - {m.before}\n  + {m.after}",
                  file=sys.stderr)
        for m in score.killed_equivalents:
            print(f"listed as equivalent but killed, remove it from {EQUIVALENTS.name}: "
                  f"{m.module} {m.function}\n  - {m.before}\n  + {m.after}", file=sys.stderr)
        for e in score.unmatched_equivalents:
            print(f"listed as equivalent but no mutant of this run matches it (the code "
                  f"changed), update or remove it in {EQUIVALENTS.name}: {e.module} "
                  f"{e.function}\n  - {e.before}\n  + {e.after}", file=sys.stderr)
        if score.not_checked:
            print(f"{score.module}: {score.not_checked} mutants not checked (interrupted run); "
                  "counted as survived", file=sys.stderr)
        if score.score < TARGETS.get(score.module, DEFAULT_TARGET):
            below.append(score.module)
    if below:
        print(f"below target: {', '.join(below)}", file=sys.stderr)
    return 1 if below else 0


if __name__ == "__main__":
    sys.exit(main())
