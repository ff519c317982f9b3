"""The local host end to end: its HTTP server on loopback, the SQLite queue, real workers.

The host is built as `make run` builds it (`shared.local.command.served_host`): spans recorded
by the OpenTelemetry SDK and written as console log lines, the inspector's recorder fed by the
host, and log lines at INFO (here to a file in the round's state directory, where `make run`
writes to the terminal). The inspector's own server is not started: it only answers the page.
The same rounds are also run on a bare host (`*_bare`: no telemetry, no recorder, warnings
only), to show what the store costs against the host's own work alone.

Rounds come in pairs, the vehicle state store on (the default) and off
(`VEHICLE_STATE_STORE=off`), so both see the same machine load, and the host's CPU per event
of the two is reported as a ratio: the median of the pairs' ratios, with a distribution-free
interval for it (`median_interval`: 96.1 % from nine pairs), so a run says whether a goal for
the ratio is met, missed, or not decided by this machine's noise. Nine pairs send the events of
one vehicle; three more (`*_fleet`) those of 100 vehicles in turn.

Each round runs in a fresh process (`python -m benchmarks.end_to_end --round ...`), so no round
inherits another's caches, timing wrappers or tracer provider, and every round starts equally
cold. The host (HTTP routes plus queue workers) runs in that process; the load generator
(`benchmarks.loadgen`) in another, so the two share the machine's cores but not an interpreter.
An event counts as processed when the processor wrote its line to `handled.jsonl` with the
outcome handled or unhandled; any other outcome is counted by name (`dead_lettered`, which must
stay 0, as must `lost`).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from shared.local.command import load_function_app, log_handler, run_event_loop, served_host
from shared.local.host import LocalHost
from shared.runtime import HANDLED_FILE, build_runtime, set_runtime
from shared.settings import load_settings

from .common import TOKEN, emit, median, median_interval, note, percentile

NAME = "local_end_to_end"
EVENT_SIZE = 5 * 1024
CLIENTS = 16
#: The fleet of the extra pairs of rounds: events of this many vehicles in turn, so a commit
#: writes several vehicles' rows and the store's cache holds many.
FLEET = 100
DRAIN_TIMEOUT = 60.0
#: The outcomes of a processed event (`handled.jsonl`): any other is counted by name.
PROCESSED = frozenset({"handled", "unhandled"})
#: Where the store's share of the host's CPU goes, per event (`cpu_us_<part>`), from the calls
#: the host makes: (object of the runtime, method). The store's own calls, and two that do more
#: with the store on (the handlers get `on_change` changes, the outcome line the store's
#: result), reported for the round with the store off too (`cpu_us_<part>_store_off`).
PARTS: dict[str, tuple[str, str]] = {
    "inbox_check": ("vehicle_state", "is_processed"),
    "apply": ("vehicle_state", "apply"),
    "inbox_record": ("vehicle_state", "mark_processed"),
    "commit": ("vehicle_state", "flush"),
    "handlers": ("registry", "dispatch"),
    "outcome_log": ("handled_log", "append"),
}
SHARED_PARTS = ("handlers", "outcome_log")


def _timed(call: Callable[..., Any], part: str, spent: Counter[str]) -> Callable[..., Any]:
    """`call`, adding the CPU time of the thread that runs it to `spent[part]`. The store's
    calls do not give up the event loop while they run (SQLite in the calling thread), and
    the handlers here neither (none runs in the pool), so no other task's time is counted."""
    if inspect.iscoroutinefunction(call):
        @functools.wraps(call)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time_ns()
            try:
                return await call(*args, **kwargs)
            finally:
                spent[part] += time.thread_time_ns() - started
        return timed_async

    @functools.wraps(call)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time_ns()
        try:
            return call(*args, **kwargs)
        finally:
            spent[part] += time.thread_time_ns() - started
    return timed


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 16), b""))
    except FileNotFoundError:
        return 0


def _cpu_seconds() -> float:
    """CPU time of this process (the host: HTTP, receiver, queue, workers), not the load
    generator's: steadier than wall-clock rates on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def one_round(events: int, clients: int, *, store: bool = True, vehicles: int = 1,
                    parts: bool = False, served: bool = True) -> dict[str, Any]:
    """One round, in this process (once per process: `served` sets up telemetry and logging
    for good); with `parts`, the CPU of the calls in PARTS is timed too (`cpu_parts`, in µs
    per event), which adds to the round's CPU."""
    spent: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as state_dir:
        settings = load_settings(
            {"SMARTCAR_MANAGEMENT_TOKEN": TOKEN, "LOCAL_STATE_DIR": state_dir,
             "VEHICLE_STATE_STORE": "on" if store else "off"}
        )
        runtime = build_runtime(settings)
        set_runtime(runtime)
        if parts:
            for part, (owner, method) in PARTS.items():
                target = getattr(runtime, owner)
                if target is not None:  # the store, when it is off
                    setattr(target, method, _timed(getattr(target, method), part, spent))
        log = (Path(state_dir) / "host.log").open("w", encoding="utf-8")
        # Served: `make run`'s logging (main), with the terminal a file here.
        logging.basicConfig(level=logging.INFO if served else logging.WARNING,
                            handlers=[log_handler(log)], force=True)
        host = (served_host(settings, runtime, port=0, poll_interval=0.05)[0] if served
                else LocalHost(load_function_app(), runtime, port=0, poll_interval=0.05))
        await host.start()
        handled_path = Path(state_dir) / HANDLED_FILE
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "benchmarks.loadgen",
                "--url", f"{host.base_url}/api/webhooks/smartcar",
                "--events", str(events), "--clients", str(clients), "--size", str(EVENT_SIZE),
                "--vehicles", str(vehicles),
                stdout=asyncio.subprocess.PIPE,
            )
            assert proc.stdout is not None
            # From the moment the load generator has built its events and opened its
            # connections (seconds, during which this host only idles) to the last one handled.
            ready = await proc.stdout.readline()
            cpu_before = _cpu_seconds()
            out = await proc.stdout.read()
            if await proc.wait() != 0 or ready != b"ready\n":
                raise RuntimeError(f"load generator exited with {proc.returncode}")
            load = json.loads(out)
            for _ in range(int(DRAIN_TIMEOUT / 0.05)):
                if _count_lines(handled_path) >= len(load["acked"]):
                    break
                await asyncio.sleep(0.05)
            cpu = _cpu_seconds() - cpu_before
            await asyncio.sleep(0.2)  # let a late duplicate show, if there were one
            stats = runtime.queue.stats()
        finally:
            await host.stop()
            runtime.queue.close()
            if runtime.handled_log is not None:
                runtime.handled_log.close()
            if runtime.vehicle_state is not None:
                await runtime.vehicle_state.close()
            set_runtime(None)
            logging.shutdown()
            log.close()
        records = [json.loads(line) for line in handled_path.read_text().splitlines() if line]
        log_lines = _count_lines(Path(log.name))
    figures = round_figures(records, load, stats)
    processed = max(figures.pop("processed"), 1)
    # What the host wrote to its log per event: shows that a served round ran `make run`'s
    # telemetry and logging (a line per span and per request), and that a bare one did not.
    figures["log_lines_per_event"] = log_lines / processed
    figures["host_cpu_us_per_event"] = cpu / processed * 1e6
    figures["cpu_parts"] = {part: spent[part] / 1000 / processed for part in PARTS}
    return figures


def round_figures(records: list[dict[str, Any]], load: dict[str, Any],
                  stats: dict[str, int]) -> dict[str, Any]:
    """A round's figures from its `handled.jsonl` lines, the load generator's report and the
    queue's counts: an event is processed only by a line with a PROCESSED outcome."""
    outcomes = Counter(r["outcome"] for r in records)
    processed_ids = Counter(r["eventId"] for r in records if r["outcome"] in PROCESSED)
    last = max((datetime.fromisoformat(r["handledAt"]).timestamp() for r in records),
               default=load["end"])
    return {
        "processed": len(processed_ids),
        "events_per_s": len(processed_ids) / max(last - load["start"], 1e-9),
        "acks_per_s": len(load["acked"]) / (load["end"] - load["start"]),
        "ack_p50_ms": percentile(load["ack_ms"], 50),
        "ack_p99_ms": percentile(load["ack_ms"], 99),
        "lost": len(set(load["acked"]) - set(processed_ids)),
        "duplicates_processed": sum(n - 1 for n in processed_ids.values()),
        "dead_lettered": outcomes["dead_lettered"],
        "other_outcomes": sum(n for o, n in outcomes.items()
                              if o not in PROCESSED and o != "dead_lettered"),
        "refused": sum(load["failures"].values()),
        "left_in_queue": stats["active"] + stats["deadLettered"] + stats["scheduled"],
    }


def fresh_round(events: int, *, store: bool, vehicles: int = 1, parts: bool = False,
                served: bool = True) -> dict[str, Any]:
    """`one_round` in a process of its own; its result."""
    spec = {"events": events, "store": store, "vehicles": vehicles, "parts": parts,
            "served": served}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.end_to_end", "--round", json.dumps(spec)],
        capture_output=True, text=True, check=False, timeout=DRAIN_TIMEOUT * 5,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{NAME} round {spec} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


Rounds = list[dict[str, Any]]


def _pairs(pairs: int, events: int, vehicles: int, *,
           served: bool = True) -> tuple[Rounds, Rounds]:
    """`pairs` pairs of rounds, the store on in one of each and off in the other: the rounds
    with the store on, and those with it off, in pair order."""
    on: Rounds = []
    off: Rounds = []
    what = ("" if vehicles == 1 else f"{vehicles} vehicles, ") + ("" if served else "bare, ")
    for i in range(pairs):
        # In pairs, in turn on first and off first: the machine is shared and its speed
        # drifts, so the two rounds of a pair see the same neighbours.
        for store in (True, False) if i % 2 == 0 else (False, True):
            result = fresh_round(events, store=store, vehicles=vehicles, served=served)
            note(f"{NAME} ({what}store {'on' if store else 'off'}): {result}")
            (on if store else off).append(result)
    return on, off


def _pair_ratios(on: Rounds, off: Rounds) -> list[float]:
    """Each pair's ratio of CPU per event, on over off."""
    return [a["host_cpu_us_per_event"] / max(b["host_cpu_us_per_event"], 1e-9)
            for a, b in zip(on, off, strict=True)]


def _emit_ratio(metric: str, on: Rounds, off: Rounds) -> None:
    """`metric`: the median of the pairs' ratios, steadier than the ratio of the medians when
    the machine's speed drifts between pairs; and how precise it is: `*_low` and `*_high`, the
    interval that holds the median ratio of such pairs on this machine with the probability
    `*_coverage` (96.1 % from nine pairs, 75 % from three, 0 from one)."""
    ratios = _pair_ratios(on, off)
    low, high, coverage = median_interval(ratios)
    emit(NAME, metric, median(ratios), "ratio")
    emit(NAME, f"{metric}_low", low, "ratio")
    emit(NAME, f"{metric}_high", high, "ratio")
    emit(NAME, f"{metric}_coverage", coverage, "ratio")


def run(*, quick: bool) -> None:
    events = 300 if quick else 2000
    pairs = 1 if quick else 9
    results, off = _pairs(pairs, events, vehicles=1)
    emit(NAME, "events", events, "count")
    emit(NAME, "concurrent_clients", CLIENTS, "count")
    emit(NAME, "events_per_s", median([r["events_per_s"] for r in results]), "events/s")
    emit(NAME, "acks_per_s", median([r["acks_per_s"] for r in results]), "requests/s")
    emit(NAME, "ack_p50_ms", median([r["ack_p50_ms"] for r in results]), "ms")
    emit(NAME, "ack_p99_ms", median([r["ack_p99_ms"] for r in results]), "ms")
    cpu_on = median([r["host_cpu_us_per_event"] for r in results])
    cpu_off = median([r["host_cpu_us_per_event"] for r in off])
    emit(NAME, "host_cpu_us_per_event", cpu_on, "us")
    emit(NAME, "host_cpu_us_per_event_store_off", cpu_off, "us")
    _emit_ratio("host_cpu_ratio_store_on_off", results, off)
    emit(NAME, "host_cpu_ratio_of_medians", cpu_on / max(cpu_off, 1e-9), "ratio")
    emit(NAME, "events_per_s_store_off", median([r["events_per_s"] for r in off]), "events/s")
    # The bare host: the store against the host's own work alone.
    bare_on, bare_off = _pairs(pairs, events, vehicles=1, served=False)
    emit(NAME, "host_cpu_us_per_event_bare",
         median([r["host_cpu_us_per_event"] for r in bare_on]), "us")
    emit(NAME, "host_cpu_us_per_event_bare_store_off",
         median([r["host_cpu_us_per_event"] for r in bare_off]), "us")
    _emit_ratio("host_cpu_ratio_store_on_off_bare", bare_on, bare_off)
    emit(NAME, "events_per_s_bare", median([r["events_per_s"] for r in bare_on]), "events/s")
    emit(NAME, "log_lines_per_event", median([r["log_lines_per_event"] for r in results]),
         "count")
    emit(NAME, "log_lines_per_event_bare",
         median([r["log_lines_per_event"] for r in bare_on]), "count")
    # The same with a fleet: fewer pairs (the single vehicle's figures are the headline).
    fleet_on, fleet_off = _pairs(1 if quick else 3, events, vehicles=FLEET)
    emit(NAME, "fleet_vehicles", FLEET, "count")
    emit(NAME, "host_cpu_us_per_event_fleet",
         median([r["host_cpu_us_per_event"] for r in fleet_on]), "us")
    emit(NAME, "host_cpu_us_per_event_fleet_store_off",
         median([r["host_cpu_us_per_event"] for r in fleet_off]), "us")
    _emit_ratio("host_cpu_ratio_store_on_off_fleet", fleet_on, fleet_off)
    # Where the store's CPU goes: a pair of rounds of its own, the calls timed.
    timed_on = fresh_round(events, store=True, parts=True)
    timed_off = fresh_round(events, store=False, parts=True)
    note(f"{NAME} (store on, parts timed): {timed_on['cpu_parts']}")
    note(f"{NAME} (store off, parts timed): {timed_off['cpu_parts']}")
    for part in PARTS:
        emit(NAME, f"cpu_us_{part}", timed_on["cpu_parts"][part], "us")
    for part in SHARED_PARTS:
        emit(NAME, f"cpu_us_{part}_store_off", timed_off["cpu_parts"][part], "us")
    emit(NAME, "host_cpu_us_per_event_timed", timed_on["host_cpu_us_per_event"], "us")
    emit(NAME, "host_cpu_us_per_event_timed_store_off", timed_off["host_cpu_us_per_event"], "us")
    # Correctness figures are totals over every round, not medians.
    everything = [*results, *off, *bare_on, *bare_off, *fleet_on, *fleet_off,
                  timed_on, timed_off]
    for metric in ("lost", "duplicates_processed", "dead_lettered", "other_outcomes",
                   "refused", "left_in_queue"):
        emit(NAME, metric, sum(r[metric] for r in everything), "count")


def _main(argv: list[str] | None = None) -> int:
    """`--round SPEC`: one round (`fresh_round`'s JSON spec); its result as JSON on stdout."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.end_to_end")
    parser.add_argument("--round", required=True, help="JSON: events, store, vehicles, ...")
    spec = json.loads(parser.parse_args(argv).round)
    result = run_event_loop(one_round(
        spec["events"], CLIENTS, store=spec["store"], vehicles=spec["vehicles"],
        parts=spec["parts"], served=spec["served"]))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
