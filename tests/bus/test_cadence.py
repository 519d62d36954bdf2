import random

import pytest

from corebus import Cadence


def reference(cadence, previous, step):
    """Brute force: is any due step in (previous, step]?"""
    for s in range(previous + 1, step + 1):
        if cadence.at is not None:
            if s == cadence.at:
                return True
        elif (
            s > cadence.start
            and (cadence.stop is None or s <= cadence.stop)
            and (s - cadence.start) % cadence.every == 0
        ):
            return True
    return False


@pytest.mark.parametrize(
    "cadence",
    [
        Cadence.every_n(1),
        Cadence.every_n(7),
        Cadence.every_n(10, start=3),
        Cadence.once(13),
        Cadence.between(20, 50, every=5),
        Cadence.every_n(4, stop=30),
    ],
)
def test_boundary_crossing_matches_brute_force(cadence):
    rng = random.Random(0)
    for _ in range(2000):
        previous = rng.randrange(0, 80)
        step = previous + rng.randrange(0, 12)
        assert cadence.due(previous, step) == reference(cadence, previous, step), (previous, step)


def test_jumps_of_steps_per_execution_do_not_skip_events():
    every_ten = Cadence.every_n(10)
    fired = [s for s in range(8, 100, 8) if every_ten.due(s - 8, s)]
    # each of 10, 20, ..., 90 is crossed exactly once; `step % 10 == 0` would fire at 40 and 80 only
    assert fired == [16, 24, 32, 40, 56, 64, 72, 80, 96]


def test_resume_continues_where_it_left_off():
    every = Cadence.every_n(5)
    uninterrupted = [s for s in range(1, 31) if every.due(s - 1, s)]
    resumed = [s for s in range(1, 13) if every.due(s - 1, s)] + [s for s in range(13, 31) if every.due(s - 1, s)]
    assert uninterrupted == resumed == [5, 10, 15, 20, 25, 30]


def test_once_fires_once():
    once = Cadence.once(7)
    assert [s for s in range(0, 20, 3) if once.due(max(s - 3, 0), s)] == [9]


def test_bad_cadence():
    with pytest.raises(ValueError, match="positive"):
        Cadence.every_n(0)
