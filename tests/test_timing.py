"""PhaseTimer: each phase counts its own seconds, nested phases are not counted twice, pop starts a new window."""
from distreward import timing
from distreward.timing import PhaseTimer, timed


def test_nested_phases_count_their_own_time_once(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 10.0, 10.0, 14.0])  # outer opens 0, inner 1-3, outer closes 10; again 10-14
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    timer = PhaseTimer()
    with timer.phase("loss"):
        with timer.phase("generation"):
            pass
    with timed(timer, "loss"):
        pass
    assert timer.pop() == {"generation": 2.0, "loss": 8.0 + 4.0}
    assert timer.pop() == {}

