"""One thread steps the continuous-batching Engine; HTTP handlers reach it through Jobs.

Where it sits: between the HTTP app (app.py, on the asyncio event loop) and
`decoding.batching.Engine`, which is not thread-safe, so only this thread touches it.
Requests join and leave between steps:

    handler --submit(job)--> command queue --engine thread: add_request--> Engine
    Engine.step --on_token, on_text--> Piece events --call_soon_threadsafe--> job.events
    Engine.step --a finished Completion--> Done event (the handler answers; the job ends)
    handler gone (client disconnected) --cancel(job)--> Engine.cancel: its blocks are freed

Log-probabilities are the log-softmax of the logits row each token was drawn from: the
model's own distribution, before repetition penalty, filters and temperature (as
OpenAI's and vLLM's), computed in float64 from refinfer's float32 logits.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from refinfer.decoding.batching import Completion, Engine, EngineStats, Request
from refinfer.errors import InvalidParameterError

log = logging.getLogger("refinfer.server")


@dataclass
class Logprob:
    """A generated token's log-probability and its `top` likeliest alternatives (ids)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # (id, logprob), likeliest first, ties by lowest id


def token_logprob(token: int, logits: np.ndarray, n_top: int) -> Logprob:
    """log softmax(logits)[token] and the n_top largest entries, in float64."""
    z = logits.astype(np.float64)  # (V,)
    m = z.max()
    log_z = m + math.log(np.exp(z - m).sum())  # log sum_j exp(z_j)
    best = np.argpartition(-z, n_top)[:n_top] if n_top else np.zeros(0, np.int64)
    best = best[np.lexsort((best, -z[best]))]  # likeliest first, then lowest id
    return Logprob(token, float(z[token] - log_z), [(int(i), float(z[i] - log_z)) for i in best])


@dataclass
class Piece:
    """Text streamed since the last event, with the tokens' log-probabilities since then."""

    text: str
    logprobs: list[Logprob] = field(default_factory=list)


@dataclass
class Done:
    """The request finished; logprobs are those of tokens not yet sent with a Piece."""

    completion: Completion
    logprobs: list[Logprob] = field(default_factory=list)


class Job:
    """One HTTP request in the engine: its Request, and its events back to the handler.

    Create it on the event loop; the engine thread fills `events` (Piece..., then Done).
    n_top is None without log-probabilities, else the alternatives wanted per token.
    """

    def __init__(self, request: Request, n_top: int | None = None) -> None:
        self.event_loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Piece | Done] = asyncio.Queue()
        self.request = request
        self.request_id: int | None = None  # set by the engine thread
        self.n_top = n_top
        self._logprobs: list[Logprob] = []  # computed, not yet sent (engine thread only)
        request.on_text = self._on_text
        if n_top is not None:
            request.on_token = self._on_token

    def finish(self, completion: Completion) -> None:
        """Engine thread: the request ended."""
        self._put(Done(completion, self._take()))

    def _on_token(self, token: int, logits: np.ndarray) -> None:
        self._logprobs.append(token_logprob(token, logits, self.n_top))

    def _on_text(self, text: str) -> None:
        self._put(Piece(text, self._take()))

    def _take(self) -> list[Logprob]:
        out, self._logprobs = self._logprobs, []
        return out

    def _put(self, event: Piece | Done) -> None:
        self.event_loop.call_soon_threadsafe(self.events.put_nowait, event)


class EngineLoop:
    """The thread that owns the Engine: adds and cancels requests between steps.

    `stats` is a snapshot taken after each step (read it from any thread);
    `busy_seconds` is the time spent in steps; `failure` is set if a step ever raised.
    """

    def __init__(self, engine: Engine, threads: int = 0) -> None:
        """A loop over engine; threads: Numba threads for its kernels (0: Numba's default)."""
        self.engine = engine
        self.threads = threads
        self.stats: EngineStats = engine.stats
        self.kv_blocks_used = 0.0  # fraction of the pool's blocks held by sequences now
        self.busy_seconds = 0.0
        self.failure: str | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()  # (verb, job), None = stop
        self._jobs: dict[int, Job] = {}  # request id -> job; engine thread only
        self._thread = threading.Thread(target=self._run, name="refinfer-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current step; unfinished jobs get no more events."""
        self._commands.put(None)
        self._thread.join()

    def submit(self, job: Job) -> None:
        """Queue job's request for the engine (any thread)."""
        self._commands.put(("add", job))

    def cancel(self, job: Job) -> None:
        """Cancel job's request if it has not finished; its blocks are freed (any thread)."""
        self._commands.put(("cancel", job))

    # -- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        if self.threads:
            import numba

            numba.set_num_threads(self.threads)  # per thread: set it in the one that computes
        while True:
            for command in self._commands_now(wait=not self._has_work()):
                if command is None:
                    return
                self._apply(*command)
            if self._has_work():
                self._step()
            self._snapshot()

    def _has_work(self) -> bool:
        return self.failure is None and self.engine.has_unfinished()

    def _commands_now(self, wait: bool) -> list:
        """The queued commands; when wait, block until there is one (the engine is idle)."""
        commands = [self._commands.get()] if wait else []
        while not self._commands.empty():
            commands.append(self._commands.get_nowait())
        return commands

    def _apply(self, verb: str, job: Job) -> None:
        if self.failure is not None:
            job.finish(Completion(None, [], finish_reason="error", error=self.failure))
        elif verb == "add":
            job.request_id = self.engine.add_request(job.request)
            self._jobs[job.request_id] = job
        elif job.request_id in self._jobs:
            try:
                self.engine.cancel(job.request_id)
            except InvalidParameterError:  # it finished in add_request; the next step says so
                pass

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            finished = self.engine.step()
        except Exception as e:  # a bug: fail every request and refuse new ones, stay up
            log.exception("the engine failed; the server now answers every request with 500")
            self.failure = f"the engine failed ({type(e).__name__}); see the server log"
            for job in self._jobs.values():
                job.finish(Completion(None, [], finish_reason="error", error=self.failure))
            self._jobs.clear()
            return
        self.busy_seconds += time.perf_counter() - start
        for completion in finished:
            self._jobs.pop(completion.id).finish(completion)

    def _snapshot(self) -> None:
        """Publish the statistics for other threads (after steps, cancellations)."""
        pool = self.engine.pool
        self.stats = self.engine.stats
        self.kv_blocks_used = 1 - pool.n_free_blocks / pool.n_blocks
