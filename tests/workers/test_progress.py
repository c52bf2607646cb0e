"""A job's progress as one figure: percent across phases of different units, and the ETA."""

from __future__ import annotations

import pytest

from workers.progress import Phase, Tracker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def job(clock: Clock) -> Tracker:
    """100 items, then 10 training steps, then 100 items."""
    return Tracker(
        [
            Phase("before evaluation", "items", 100),
            Phase("training", "steps", 10),
            Phase("after evaluation", "items", 100),
        ],
        clock=clock,
    )


def test_percent_spans_the_whole_job_and_the_eta_waits_for_each_unit_ahead() -> None:
    clock = Clock()
    tracker = job(clock)
    first = tracker.at("before evaluation", done=0, measured=False)
    assert first["percent"] == 0.0 and first["eta_seconds"] is None
    clock.now = 50.0
    half = tracker.at("before evaluation", done=50)  # 1 s per item
    # A step counts as an item until one is measured: 50 of 210 units.
    assert half["percent"] == pytest.approx(100 * 50 / 210, abs=0.1)
    assert half["eta_seconds"] is None, "no step measured yet: no honest ETA"
    assert (half["done"], half["total"], half["stage"]) == (50, 100, "before evaluation")
    clock.now = 100.0
    tracker.at("before evaluation", done=100)
    clock.now = 130.0
    step = tracker.at("training", done=1, unit="steps")  # 30 s per step
    # Done: 100 items (100 s) + 1 step (30 s); ahead: 9 steps (270 s) + 100 items (100 s).
    assert step["eta_seconds"] == pytest.approx(370.0)
    # 130 of 500 s, but the figure had shown 100 of 210 units: it holds until passed.
    assert step["percent"] == pytest.approx(100 * 100 / 210, abs=0.1)
    assert (step["done"], step["total"], step["stage"]) == (1, 10, "training")
    clock.now = 370.0
    nine = tracker.at("training", done=9, unit="steps")
    assert nine["percent"] == pytest.approx(100 * 370 / 500, abs=0.1)
    assert nine["eta_seconds"] == pytest.approx(130.0)


def test_the_percent_never_goes_back_when_a_slow_unit_is_measured() -> None:
    clock = Clock()
    tracker = job(clock)
    tracker.at("before evaluation", done=0, measured=False)
    clock.now = 100.0
    before = tracker.at("before evaluation", done=100)["percent"]
    clock.now = 1100.0
    after = tracker.at("training", done=1, unit="steps")  # a step takes 1000 items' time
    assert after["percent"] >= before
    assert after["eta_seconds"] == pytest.approx(9 * 1000 + 100)


def test_units_done_without_work_count_as_done_but_not_in_the_rate() -> None:
    clock = Clock()
    tracker = job(clock)
    tracker.at("before evaluation", done=0, measured=False)
    clock.now = 10.0
    tracker.at("before evaluation", done=10)  # 1 s per item
    clock.now = 11.0
    # A resumed after-evaluation: 90 items stored by an earlier attempt, in one second.
    resumed = tracker.at("after evaluation", done=90, measured=False)
    tracker.skip("training")
    assert resumed["done"] == 90
    clock.now = 21.0
    now = tracker.at("after evaluation", done=100)
    # Still 1 s per item: 90 before-evaluation items ahead.
    assert now["eta_seconds"] == pytest.approx(90.0)


def test_work_found_on_the_way_joins_after_the_current_phase() -> None:
    clock = Clock()
    tracker = job(clock)
    tracker.at("training", done=2, unit="steps", measured=False)
    tracker.at("ewc", total=40, unit="examples")
    tracker.resize("domain before evaluation", 30)
    assert [p.name for p in tracker.phases] == [
        "before evaluation",
        "training",
        "ewc",
        "domain before evaluation",
        "after evaluation",
    ]
    added = tracker.at("ewc", add=5, unit="examples")
    assert (added["done"], added["total"]) == (5, 40)


def test_a_finished_job_is_100_percent_with_nothing_left() -> None:
    clock = Clock()
    tracker = Tracker([Phase("items", "items", 4)], clock=clock)
    tracker.at("items", measured=False)
    clock.now = 2.0
    assert tracker.at("items", done=2)["eta_seconds"] == pytest.approx(2.0)
    clock.now = 4.0
    done = tracker.at("items", done=4)
    assert done["percent"] == 100.0 and done["eta_seconds"] == 0.0
