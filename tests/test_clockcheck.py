"""The clock verdict on its own: which deliveries count against the clock, when it judges, and
the sentence it gives. tests/test_clock_skew.py checks the same through a real host process
whose clock libfaketime offsets."""

from __future__ import annotations

import pytest

from shared.clockcheck import MIN_SAMPLES, SKEW_WARNING_SECONDS, WINDOW, ClockWatch


def fed(watch: ClockWatch, ages: list[float], *, stale: bool = False) -> ClockWatch:
    for age in ages:
        watch.record(age, stale=stale)
    return watch


class TestWhatCounts:
    def test_only_a_delivered_at_more_than_the_warning_ahead_is_counted(self) -> None:
        watch = fed(ClockWatch(), [-SKEW_WARNING_SECONDS, 0.0, 900.0])
        assert watch.ahead_count == 0
        watch.record(-SKEW_WARNING_SECONDS - 0.5, stale=False)
        watch.record(-3600.0, stale=False)
        assert watch.ahead_count == 2

    def test_a_delivery_just_within_the_warning_is_not_suspicious(self) -> None:
        watch = fed(ClockWatch(min_samples=1), [-SKEW_WARNING_SECONDS] * 3)
        assert watch.problem() is None

    def test_a_stale_delivery_counts_against_the_clock_whatever_its_age(self) -> None:
        watch = fed(ClockWatch(min_samples=1), [5.0, 5.0], stale=True)
        assert watch.ahead_count == 0
        assert watch.problem() is not None


class TestWhenItJudges:
    def test_not_before_the_minimum_number_of_deliveries(self) -> None:
        watch = fed(ClockWatch(), [1200.0] * (MIN_SAMPLES - 1), stale=True)
        assert watch.problem() is None
        watch.record(1200.0, stale=True)
        assert watch.problem() is not None

    def test_only_when_more_than_half_are_suspicious(self) -> None:
        watch = fed(ClockWatch(min_samples=1), [1.0, 2.0, 3.0])
        fed(watch, [1200.0] * 3, stale=True)  # 3 of 6: not most of them
        assert watch.problem() is None
        watch.record(1200.0, stale=True)  # 4 of 7
        assert watch.problem() is not None

    def test_only_the_last_window_of_deliveries_is_judged(self) -> None:
        watch = fed(ClockWatch(), [1200.0] * WINDOW, stale=True)
        assert watch.problem() is not None
        fed(watch, [1.0] * (WINDOW // 2))  # half of the window now: not most
        assert watch.problem() is None

    def test_a_smaller_window_forgets_sooner(self) -> None:
        watch = fed(ClockWatch(window=4, min_samples=1), [1200.0] * 4, stale=True)
        fed(watch, [1.0, 1.0])
        assert watch.problem() is None

    def test_reset_forgets_the_deliveries_and_the_count(self) -> None:
        watch = fed(ClockWatch(), [-900.0] * 6)
        assert watch.ahead_count == 6 and watch.problem() is not None
        watch.reset()
        assert watch.ahead_count == 0
        fed(watch, [-900.0] * (MIN_SAMPLES - 1))
        assert watch.problem() is None  # the six before the reset are not counted


class TestTheSentence:
    def test_a_fast_clock_gives_the_median_age_of_the_stale_ones(self) -> None:
        watch = fed(ClockWatch(), [1.0, 2.0])
        fed(watch, [1190.0, 1200.0, 1210.0, 5000.0], stale=True)
        assert watch.problem() == (
            "the host clock is probably wrong: 4 of the last 6 deliveries were stale or ahead "
            "of it; it looks ahead of Smartcar's by about 1205 s. Set the clock right (NTP); "
            "deliveries dead-lettered StaleDelivery meanwhile can be replayed after checking them"
        )

    def test_a_slow_clock_says_behind_with_the_skew_as_a_positive_number(self) -> None:
        watch = fed(ClockWatch(), [-600.4] * 5)
        assert watch.problem() == (
            "the host clock is probably wrong: 5 of the last 5 deliveries were stale or ahead "
            "of it; it looks behind Smartcar's by about 600 s (deliveredAt ahead of it). Set "
            "the clock right (NTP); deliveries dead-lettered StaleDelivery meanwhile can be "
            "replayed after checking them"
        )

    @pytest.mark.parametrize(("skew", "direction"), [(0.0, "ahead of"), (-0.4, "behind")])
    def test_a_median_of_zero_is_ahead_and_below_zero_behind(
        self, skew: float, direction: str
    ) -> None:
        watch = fed(ClockWatch(), [skew] * 5, stale=True)
        assert f"it looks {direction} Smartcar's" in (watch.problem() or "")

