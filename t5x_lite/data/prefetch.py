"""Batches of the coming steps made by worker processes (``data.workers``).

A ``Batches`` is a pure function of the step, so making batches parallelises across steps with
no coordination: while the device runs step n, ``workers`` processes make steps n+1 ... n+2W,
and the loop takes step n+1's batch when it needs it. The batches are the ones the loop would
have made itself, bit for bit (a resume, a jump, another worker count change nothing).

Span corruption runs document by document in numpy, one core's worth of Python: one process
driving several GPUs makes every local device's rows, and the host can become the limit
(``bench/pipeline.py``; the training log's ``data_time``). Workers start with ``forkserver``
(the trainer's threads, JAX's included, are never forked), receive the ``Batches`` pickled once
(a prepared or cached corpus travels as its directory and is memory-mapped again), ignore
Ctrl-C / SIGTERM (the trainer stops cleanly and closes them) and exit if the trainer dies. If a
worker dies anyway, the loop says so and makes its batches itself from then on: nothing is lost.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import pickle
import signal
import threading
import time
from typing import Callable, Optional

_BATCHES = None  # the worker's copy of the Batches


def _init_worker(blob: bytes, trainer_pid: int) -> None:
    global _BATCHES
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    # The trainer killed (-9): exit too. Watching the parent would not do: that is the forkserver,
    # which itself waits for every worker to close its copy of a pipe before it exits.
    def watch():
        while True:
            time.sleep(1.0)
            try:
                os.kill(trainer_pid, 0)
            except ProcessLookupError:
                os._exit(0)

    threading.Thread(target=watch, daemon=True).start()
    _BATCHES = pickle.loads(blob)


def _make(step: int, process_index: int, process_count: int) -> dict:
    return _BATCHES(step, process_index, process_count)


class Prefetcher:
    """Called like the ``Batches`` it wraps (``source(step, process_index, process_count)``);
    every other attribute is the wrapped one's. Close it (or use it as a context manager)."""

    def __init__(self, batches, workers: int, log: Callable[[str], None] = print, depth: Optional[int] = None):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._batches, self._log = batches, log
        self.workers, self.depth = workers, depth or 2 * workers
        if "forkserver" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["t5x_lite.data.pipeline"])
        else:  # Windows: spawn (also never forks the trainer)
            ctx = multiprocessing.get_context("spawn")
        self._pool: Optional[cf.ProcessPoolExecutor] = cf.ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker,
            initargs=(pickle.dumps(batches), os.getpid()))
        self._futures: dict[tuple, cf.Future] = {}

    def __getattr__(self, name):
        return getattr(self._batches, name)

    def __call__(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
        if self._pool is None:
            return self._batches(step, process_index, process_count)
        wanted = [(s, process_index, process_count) for s in range(step, step + self.depth)]
        for key in [k for k in self._futures if k not in wanted]:  # a jump: drop what will not be asked for
            self._futures.pop(key).cancel()
        try:
            for key in wanted:
                if key not in self._futures:
                    self._futures[key] = self._pool.submit(_make, *key)
            return self._futures.pop(wanted[0]).result()
        except (cf.process.BrokenProcessPool, OSError) as e:  # OSError: a worker that could not start
            self._log(f"data: batch worker processes failed before step {step}'s batch ({type(e).__name__}: killed, "
                      "out of memory, or a script without `if __name__ == '__main__':`); the training process "
                      "makes the batches itself from here on")
            self.close()
            return self._batches(step, process_index, process_count)

    def close(self) -> None:
        if self._pool is not None:
            self._futures.clear()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
