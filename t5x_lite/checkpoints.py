"""Orbax checkpoints of the whole training state.

A checkpoint step directory holds two items: ``state`` (params, optimizer state, step: sharded
arrays, each process writing its own shards) and ``meta`` (JSON: the data position and RNG
seed, which together with the step make the run's future fully determined). Saves are
asynchronous: the arrays are copied to host memory, then written in the background while
training goes on; orbax finalizes a step directory atomically, so a save that dies half-way
never looks complete. Restores go straight into the target shardings of the current run,
whatever mesh or ZeRO stage the checkpoint was written with.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from t5x_lite.config import Config

CHECKPOINT_DIR = "checkpoints"


class Checkpoints:
    """Thin wrapper over ``ocp.CheckpointManager`` with the project's items and policies."""

    def __init__(self, workdir: str, cfg: Config):
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        c = cfg.checkpoint
        options = ocp.CheckpointManagerOptions(
            max_to_keep=c.keep,
            enable_async_checkpointing=c.async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
        """Start saving ``state`` at ``step``; returns once the arrays are on host."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore into the shardings of ``abstract_state`` (a tree of ShapeDtypeStruct with
        ``sharding`` set): every process reads only the shards its devices hold."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        return out["state"], dict(out["meta"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
