"""`python -m benchmarks --quick` runs and speaks the JSON-lines schema; no timing assertions."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import median_interval

ROOT = Path(__file__).resolve().parent.parent

REQUIRED = {
    "receiver_hot_path": {
        f"{kind}_{size}"
        for kind in ("us_per_request", "baseline_us", "overhead_ratio")
        for size in ("1kb", "5kb", "50kb")
    },
    "receiver_concurrency": {"requests_per_s", "p50_ms", "p99_ms", "sync_baseline_requests_per_s"},
    "processor_hot_path": {"us_per_message_5kb", "baseline_us_5kb", "overhead_ratio_5kb",
                           "us_per_message_5kb_signals_read", "us_per_message_5kb_data_read"},
    "local_end_to_end": {"events_per_s", "ack_p50_ms", "ack_p99_ms", "lost",
                         "duplicates_processed", "host_cpu_us_per_event",
                         "host_cpu_us_per_event_store_off", "host_cpu_ratio_store_on_off",
                         "host_cpu_ratio_of_medians", "host_cpu_ratio_store_on_off_fleet",
                         *(f"host_cpu_ratio_store_on_off{fleet}_{bound}"
                           for fleet in ("", "_fleet") for bound in ("low", "high", "coverage")),
                         "host_cpu_us_per_event_fleet", "host_cpu_us_per_event_fleet_store_off",
                         "host_cpu_us_per_event_bare", "host_cpu_us_per_event_bare_store_off",
                         "events_per_s_bare",
                         *(f"host_cpu_ratio_store_on_off_bare{bound}"
                           for bound in ("", "_low", "_high", "_coverage")),
                         "dead_lettered", "other_outcomes", "refused", "left_in_queue",
                         "log_lines_per_event", "log_lines_per_event_bare",
                         "host_cpu_us_per_event_timed", "host_cpu_us_per_event_timed_store_off",
                         "cpu_us_inbox_check", "cpu_us_apply", "cpu_us_inbox_record",
                         "cpu_us_commit", "cpu_us_handlers", "cpu_us_outcome_log",
                         "cpu_us_handlers_store_off", "cpu_us_outcome_log_store_off"},
    "vehicle_state_store": {f"{backend}_{call}_{p}_ms" for backend in ("sqlite", "table_azurite")
                            for call in ("apply", "event") for p in ("p50", "p99")}
    | {"sqlite_event_mean_ms", "sqlite_deferred_event_mean_ms", "sqlite_deferred_event_p99_ms",
       "sqlite_host_calls_cpu_us_per_event",
       "sqlite_host_calls_cpu_us_per_event_decision_replayed",
       "decision_share_of_host_calls_cpu"},
    "runtime_invocation": {f"{host}_{figure}" for host in ("in_process", "local_host", "runtime")
                           for figure in ("us", "p99_us")}
    | {"local_host_overhead_us", "runtime_overhead_us"},
    "worker_memory": {"rssAfterImportMB", "peakRssMB", "cpuMsPerWebhook",
                      "cpuMsPerProcessedEvent", "spanBytesPerEvent", "logBytesPerEvent"},
}


# The benchmark run is bounded by its subprocess timeout; the runtime benchmark's installs are
# done before it, by the runtime tests' fixture (which has pip's own limit).
pytestmark = pytest.mark.timeout(120, func_only=True)


@pytest.fixture(scope="module")
def lines(runtime_dependencies: tuple[Path, Path]) -> list[dict[str, object]]:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_every_line_has_the_schema(lines: list[dict[str, object]]) -> None:
    assert lines
    for line in lines:
        assert set(line) == {"benchmark", "metric", "value", "unit"}, line
        assert isinstance(line["benchmark"], str) and isinstance(line["metric"], str)
        assert isinstance(line["unit"], str) and line["unit"]
        value = line["value"]
        assert isinstance(value, int | float) and not isinstance(value, bool), line
        assert math.isfinite(value) and value >= 0, line


def test_every_required_metric_is_reported_once(lines: list[dict[str, object]]) -> None:
    seen: dict[str, list[object]] = {}
    for line in lines:
        seen.setdefault(str(line["benchmark"]), []).append(line["metric"])
    for benchmark, metrics in REQUIRED.items():
        reported = seen.get(benchmark, [])
        assert metrics <= set(reported), (benchmark, metrics - set(reported))
        assert len(reported) == len(set(reported)), benchmark


def test_end_to_end_loses_nothing_and_processes_nothing_twice(
    lines: list[dict[str, object]],
) -> None:
    e2e = {line["metric"]: line["value"] for line in lines
           if line["benchmark"] == "local_end_to_end"}
    assert e2e["lost"] == 0
    assert e2e["duplicates_processed"] == 0
    assert e2e["refused"] == 0
    assert e2e["left_in_queue"] == 0
    assert e2e["dead_lettered"] == 0
    assert e2e["other_outcomes"] == 0


def test_the_served_rounds_run_make_run_s_telemetry_and_the_bare_ones_do_not(
    lines: list[dict[str, object]],
) -> None:
    """The headline rounds build their host with `served_host`, as `make run` does: each event
    leaves log lines (the receiver's and one per span); the bare rounds log warnings only."""
    e2e = {line["metric"]: line["value"] for line in lines
           if line["benchmark"] == "local_end_to_end"}
    served, bare = e2e["log_lines_per_event"], e2e["log_lines_per_event_bare"]
    assert isinstance(served, float) and served >= 2
    assert bare == 0


def test_an_event_counts_as_processed_only_by_a_processed_outcome() -> None:
    """A dead-lettered event has a line in handled.jsonl too: it is lost to the benchmark, not
    processed, and it is counted by name."""
    from benchmarks.end_to_end import round_figures

    def line(event_id: str, outcome: str) -> dict[str, object]:
        return {"eventId": event_id, "outcome": outcome,
                "handledAt": "2026-12-08T00:00:01+00:00"}

    load = {"acked": ["a", "b", "c", "d"], "start": 1765152000.0, "end": 1765152001.0,
            "ack_ms": [1.0, 2.0, 3.0, 4.0], "failures": {}}
    records = [line("a", "handled"), line("b", "unhandled"), line("c", "dead_lettered"),
               line("d", "retried"), line("a", "handled")]
    figures = round_figures(records, load, {"active": 0, "deadLettered": 1, "scheduled": 0})
    assert figures["processed"] == 2
    assert figures["lost"] == 2  # c and d
    assert figures["duplicates_processed"] == 1
    assert (figures["dead_lettered"], figures["other_outcomes"]) == (1, 1)
    assert figures["left_in_queue"] == 1


def test_the_store_parts_are_timed_where_the_host_calls_them(
    lines: list[dict[str, object]],
) -> None:
    """Each timed call was reached: a wrapper the host bypassed would report 0 (no timing
    assertion)."""
    e2e = {line["metric"]: line["value"] for line in lines
           if line["benchmark"] == "local_end_to_end"}
    timed = [f"cpu_us_{part}" for part in ("inbox_check", "apply", "inbox_record", "commit",
                                            "handlers", "outcome_log")]
    for metric in [*timed, "cpu_us_handlers_store_off", "cpu_us_outcome_log_store_off"]:
        value = e2e[metric]
        assert isinstance(value, float) and value > 0, metric


def test_the_ratio_comes_with_its_interval(lines: list[dict[str, object]]) -> None:
    e2e = {line["metric"]: line["value"] for line in lines
           if line["benchmark"] == "local_end_to_end"}
    for metric in ("host_cpu_ratio_store_on_off", "host_cpu_ratio_store_on_off_fleet",
                   "host_cpu_ratio_store_on_off_bare"):
        low, ratio, high = (e2e[f"{metric}_low"], e2e[metric], e2e[f"{metric}_high"])
        assert isinstance(low, float) and isinstance(high, float)
        assert isinstance(ratio, float) and low <= ratio <= high, metric


# The sign test's interval for a median, as statistics tables give it: from n values, the k-th
# smallest to the k-th largest, with its coverage.
@pytest.mark.parametrize(("n", "k", "coverage"), [
    (6, 1, 0.96875), (8, 1, 0.9921875),  # 2nd to 7th of 8 covers only 92.97 %
    (9, 2, 0.9609375), (10, 2, 0.978515625), (12, 3, 0.96142578125),
    (20, 6, 0.9586105346679688), (30, 10, 0.9572260547429323),
])
def test_median_interval_is_the_sign_test_interval(n: int, k: int, coverage: float) -> None:
    values = [float(v) for v in range(1, n + 1)]
    random.Random(n).shuffle(values)
    low, high, covered = median_interval(values)
    assert (low, high) == (k, n + 1 - k)
    assert covered == pytest.approx(coverage)


def test_median_interval_with_too_few_values_is_the_widest_and_says_so() -> None:
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0, 0.9375)
    assert median_interval([1.5]) == (1.5, 1.5, 0.0)
    low, high, coverage = median_interval([])
    assert math.isnan(low) and math.isnan(high) and coverage == 0.0


def test_median_interval_takes_the_narrowest_that_reaches_the_confidence() -> None:
    # From five values, 2nd to 4th covers exactly 62.5 %; the narrowest is the median alone.
    assert median_interval([5.0, 4.0, 3.0, 2.0, 1.0], confidence=0.625) == (2.0, 4.0, 0.625)
    assert median_interval([3.0, 1.0, 2.0], confidence=0.0) == (2.0, 2.0, 0.0)
    assert median_interval([4.0, 1.0, 3.0, 2.0], confidence=0.0) == (2.0, 3.0, 0.375)


def test_median_interval_covers_a_known_median_as_often_as_it_says() -> None:
    """Nine draws from an exponential distribution (median ln 2), many times: the interval
    holds the true median in about 96.1 % of the trials, whatever the distribution."""
    rng = random.Random(20261207)
    trials = 4000
    held = 0
    for _ in range(trials):
        low, high, _ = median_interval([rng.expovariate(1.0) for _ in range(9)])
        held += low <= math.log(2) <= high
    assert abs(held / trials - 0.9609375) < 0.015
