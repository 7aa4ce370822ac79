"""Scale-out: a corpus's chunks scored on a Ray cluster, one model per worker process.

Where this sits: perplexity.py and files.py cut a corpus into chunks; instead of
running their per-chunk function (perplexity.scored_logits, files.chunk_logits) here,
a WorkerPool sends groups of chunks to Ray actors that run that same function on their
own copy of the model and yields each chunk's result back in chunk order, whatever
order the workers finish in. Everything after the forward pass (NLL, PPL, the KLD base
file, the KLD statistics, the logits file) stays in this process, on the same arrays:

    chunks --WorkerPool.map(fn)--> [actor: load(path, numerics); fn(model, group)] --> rows

The results are bitwise those of one process: each chunk is a fresh sequence, so its
logits depend only on its own tokens, never on the thread count, on which chunks share
a forward call or on which process computed them (DESIGN.md, invariant 4), and the
driver reduces them in chunk order exactly as the one-process loop does.

Ray is an optional extra (`pip install 'refinfer[ray]'`), imported only here and only
when a pool is made. Every node must read the model file at the same path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from refinfer.errors import InvalidParameterError, RefinferError
from refinfer.model import check_numerics
from refinfer.oracle.perplexity import scored_logits


def _ray():
    """The ray module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise RefinferError("--ray needs Ray: pip install 'refinfer[ray]'") from e
    return ray


@contextmanager
def cluster(spec: str) -> Iterator[None]:
    """Ray for the duration: 'local:N' starts a local instance of N CPUs (shut down after),
    'auto' joins the cluster this node belongs to, anything else is a Ray address. A
    process already connected (ray.init done by the caller) stays as it is."""
    ray = _ray()
    kind, _, n = spec.partition(":")
    if kind == "local" and not (n.isdigit() and int(n) >= 1):
        raise InvalidParameterError(f"--ray local:N takes a number of workers, not {spec!r}")
    if ray.is_initialized():
        yield
        return
    if kind == "local":
        ray.init(num_cpus=int(n), include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=spec, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


class _ModelWorker:
    """A Ray actor's state: one model, loaded from its path in the driver's numerics, on a
    fixed number of threads."""

    def __init__(self, model_path: str, threads: int, numerics: str):
        import numba

        import refinfer

        numba.set_num_threads(threads)
        self.model = refinfer.load(model_path, numerics=numerics)

    def run(self, fn, chunks: np.ndarray, *args) -> list:
        """fn(model, chunks, *args), one result per chunk, as a list."""
        return list(fn(self.model, chunks, *args))


class WorkerPool:
    """One actor per `threads` CPUs of the connected Ray cluster, each holding the model of
    `model_path` loaded with `numerics` (the driver's model's: the rows must be its rows);
    needs ray.init first (cluster() does it). A context manager: the actors, and the CPUs
    they hold, are released on exit."""

    def __init__(self, model_path: str | Path, threads: int = 1, numerics: str = "exact"):
        ray = _ray()
        from ray.util import ActorPool

        check_numerics(numerics)  # here, not in every actor

        self.n_workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
        actor = ray.remote(num_cpus=threads)(_ModelWorker)
        self.actors = [
            actor.remote(str(model_path), threads, numerics) for _ in range(self.n_workers)
        ]
        self.pool = ActorPool(self.actors)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        for a in self.actors:
            _ray().kill(a)

    def map(self, fn, chunks: np.ndarray, *args, per_task: int = 1) -> Iterator:
        """fn(model, group, *args) on the workers for each group of per_task chunks, where fn
        (a module-level function, pickled by name) yields one result per chunk; the results
        come back in chunk order, whichever worker finishes first."""
        groups = [chunks[c : c + per_task] for c in range(0, len(chunks), per_task)]
        for results in self.pool.map(lambda a, g: a.run.remote(fn, g, *args), groups):
            yield from results

    def scored_logits(self, chunks: np.ndarray, n_batch: int) -> Iterator[np.ndarray]:
        """As perplexity.scored_logits(model, chunks, n_batch), computed by the workers, each
        taking n_batch // n_ctx chunks at a time (one forward call's worth)."""
        per_task = max(1, n_batch // chunks.shape[1])
        return self.map(scored_logits, chunks, n_batch, per_task=per_task)
