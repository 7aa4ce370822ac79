"""The threads the kernels run on: how many, chosen for a machine others share.

Every parallel kernel (`prange`) is one parallel region: the calling thread hands out the
iterations and waits until all are done. A decode step launches about a hundred of them,
each short (tens of microseconds), so when another process holds a core, the thread that
has lost it holds up every region until its next time slice, and decoding slows by an
order of magnitude. `ThreadGovernor` fits the thread count to the cores the other
processes leave free: every PERIOD seconds it reads how much CPU time the whole machine
spent (/proc/stat) minus what this process spent, and uses the cores that are left (at
least one). With two cores and one held by another process that is one thread, which
then has a core to itself. The CLI turns it on when no `--threads` is given (`govern`);
Model.forward calls `fit_threads` before each step. A thread count never changes a
result (invariant 4 of DESIGN.md), so neither does this.

Measured (SmolLM2 Q8_0, 2 cores, one `while True: pass` process holding a core; README,
Speed): Numba's omp layer alone kept 28% of its quiet decode speed, with the governor 65%.
Numba's tbb layer (work stealing, the `tbb` wheel) kept 60% without the governor and 67%
with it, but cost 10-15% of the quiet decode speed (its threads wake more slowly at each
region), so refinfer uses Numba's default layer and the governor.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import numba


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes have spent since boot (/proc/stat), or None where unknown."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user .. steal, in ticks


class ThreadGovernor:
    """Chooses the kernel thread count from the cores other processes leave free.

    threads = clamp(floor(cores - others + 1/4), 1, most), where `others` is the number of
    cores other processes kept busy over the last PERIOD seconds: CPU time of the machine
    minus that of this process, over the wall time. (+1/4: a neighbour using more than a
    quarter of a core takes it; a thread that shares a core stalls every region.)
    `clock`, `busy` and `ours` are injectable for tests.
    """

    PERIOD = 0.25  # seconds between two readings

    def __init__(
        self, most: int, cores: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        busy: Callable[[], float | None] = machine_busy_seconds,
        ours: Callable[[], float] = time.process_time,
    ):  # fmt: skip
        self.most = most
        self.cores = cores or os.cpu_count() or 1
        self._clock, self._busy, self._ours = clock, busy, ours
        self._since = (clock(), busy(), ours())
        self.threads = most

    def update(self) -> int:
        """The thread count to use now (re-measured at most every PERIOD seconds)."""
        now, busy, ours = self._clock(), self._busy(), self._ours()
        then, busy0, ours0 = self._since
        if busy is None or busy0 is None or now - then < self.PERIOD:
            return self.threads
        others = max(0.0, (busy - busy0) - (ours - ours0)) / (now - then)  # cores
        self.threads = max(1, min(self.most, math.floor(self.cores - others + 0.25)))
        self._since = (now, busy, ours)
        return self.threads


_governor: ThreadGovernor | None = None


def govern(most: int | None = None) -> None:
    """Let a ThreadGovernor choose the thread count of every forward pass from now on.

    most: the ceiling (default: NUMBA_NUM_THREADS, all cores). Without this call refinfer
    leaves the thread count to whoever sets it (numba.set_num_threads, --threads N).
    """
    global _governor
    _governor = ThreadGovernor(most or numba.config.NUMBA_NUM_THREADS)


def stop_governing() -> None:
    """Stop governing: the thread count stays as the governor last set it (undoes `govern`)."""
    global _governor
    _governor = None


def fit_threads() -> None:
    """Apply the governor's choice in the calling thread (a no-op unless `govern` was called)."""
    if _governor is None:
        return
    threads = _governor.update()
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
