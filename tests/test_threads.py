"""kernels/threads.py: the thread governor.

The governor's rule is checked with an injected clock and CPU counters (no real load
needed); that the thread count it picks cannot change a result is held elsewhere
(test_model.py, test_attention.py: bitwise equal logits on 1 and many threads).
"""

from __future__ import annotations

import numba
import pytest

from refinfer.kernels import threads


class FakeMachine:
    """A clock and CPU-time counters that advance as the test says."""

    def __init__(self) -> None:
        self.now = self.busy = self.ours = 0.0

    def advance(self, seconds: float, other_cores: float, our_cores: float = 1.0) -> None:
        """`seconds` pass with other processes busy on other_cores and this one on our_cores."""
        self.now += seconds
        self.ours += our_cores * seconds
        self.busy += (other_cores + our_cores) * seconds

    def governor(self, most: int = 2, cores: int = 2) -> threads.ThreadGovernor:
        return threads.ThreadGovernor(
            most, cores, clock=lambda: self.now, busy=lambda: self.busy, ours=lambda: self.ours
        )


@pytest.mark.parametrize(
    "cores, other_cores, expected",
    [(2, 0.0, 2), (2, 0.2, 2), (2, 0.5, 1), (2, 1.0, 1), (2, 2.0, 1), (8, 3.0, 5), (8, 0.0, 8)],
)
def test_governor_uses_the_cores_others_leave_free(cores, other_cores, expected) -> None:
    machine = FakeMachine()
    governor = machine.governor(most=cores, cores=cores)
    machine.advance(1.0, other_cores, our_cores=1.5)
    assert governor.update() == expected


def test_governor_never_exceeds_its_ceiling_and_recovers() -> None:
    machine = FakeMachine()
    governor = machine.governor(most=3, cores=8)
    machine.advance(1.0, 0.0)
    assert governor.update() == 3  # 8 free cores, ceiling 3
    machine.advance(1.0, 7.0)
    assert governor.update() == 1
    machine.advance(1.0, 0.0)
    assert governor.update() == 3


def test_governor_waits_a_period_between_readings() -> None:
    machine = FakeMachine()
    governor = machine.governor()
    machine.advance(threads.ThreadGovernor.PERIOD / 2, 2.0)
    assert governor.update() == 2  # too soon to re-measure
    machine.advance(threads.ThreadGovernor.PERIOD, 2.0)
    assert governor.update() == 1


def test_governor_without_cpu_counters_keeps_its_ceiling() -> None:
    governor = threads.ThreadGovernor(2, 2, busy=lambda: None)
    assert governor.update() == 2


def test_machine_busy_seconds_grows_with_work() -> None:
    before = threads.machine_busy_seconds()
    if before is None:
        pytest.skip("no /proc/stat here")
    x = 0
    for i in range(3_000_000):  # about 0.1 s of one core
        x += i
    assert threads.machine_busy_seconds() > before


def test_fit_threads_applies_the_choice_in_the_calling_thread(monkeypatch) -> None:
    saved = numba.get_num_threads()
    machine = FakeMachine()
    monkeypatch.setattr(threads, "_governor", machine.governor(most=numba.config.NUMBA_NUM_THREADS))
    try:
        machine.advance(1.0, float(numba.config.NUMBA_NUM_THREADS))  # every core taken
        threads.fit_threads()
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(saved)
