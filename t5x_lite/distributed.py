"""Multi-process initialisation (``jax.distributed``) from the environment.

With no multi-process environment, nothing happens and JAX runs as a single process.
"""

from __future__ import annotations

import os

_DONE = False


def initialize() -> None:
    """Join ``jax.distributed`` when the environment describes several processes."""
    global _DONE
    if _DONE:
        return
    _DONE = True
    coordinator = os.environ.get("T5X_LITE_COORDINATOR")
    if not coordinator:
        return
    import jax

    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=int(os.environ["T5X_LITE_NUM_PROCESSES"]),
        process_id=int(os.environ["T5X_LITE_PROCESS_ID"]),
    )
