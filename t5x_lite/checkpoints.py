"""Orbax checkpoints of the whole training state.

A checkpoint step directory holds three items: ``params`` and ``opt_state`` (sharded arrays,
each process writing its own shards; separate so that serving can read the params alone) and
``meta`` (JSON: the step, data position and RNG seed, which make the run's future fully
determined). Saves are
asynchronous: the arrays are copied to host memory, then written in the background while
training goes on; orbax finalizes a step directory atomically, so a save that dies half-way
never looks complete. Restores go straight into the target shardings of the current run,
whatever mesh or ZeRO stage the checkpoint was written with.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from t5x_lite.config import Config

CHECKPOINT_DIR = "checkpoints"
ITEMS = ("params", "opt_state", "meta")


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
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
        """Start saving a TrainState at ``step``; returns once the arrays are on host."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                                    opt_state=ocp.args.StandardSave(state.opt_state),
                                    meta=ocp.args.JsonSave(dict(meta, step=int(step)))),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore a TrainState into the shardings of ``abstract_state`` (ShapeDtypeStructs with
        ``sharding`` set): every process reads only the shards its devices hold."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_state.params),
                                    opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
                                    meta=ocp.args.JsonRestore()),
        )
        meta = dict(out["meta"] or {})
        step_array = jax.device_put(np.int32(meta.get("step", step)), abstract_state.step.sharding)
        state = type(abstract_state)(step=step_array, params=out["params"], opt_state=out["opt_state"])
        return state, meta

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters (no optimizer state is read)."""
        out = self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
        return out["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def load_for_inference(workdir: str, mesh=None, step: Optional[int] = None):
    """``(cfg, params, tokenizer)`` from a training work dir: the saved config, the tokenizer
    beside it and the parameters of checkpoint ``step`` (default: latest), restored straight
    into the sharding the config's rules give on ``mesh`` (default: all devices)."""
    import flax.linen as nn
    import yaml

    from t5x_lite import partitioning
    from t5x_lite.config import ConfigError, config_from_dict
    from t5x_lite.data import Tokenizer
    from t5x_lite.models import abstract_params

    cfg_path = os.path.join(workdir, "config.yaml")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{workdir} is not a t5x_lite work dir (no config.yaml)")
    with open(cfg_path) as f:
        cfg = config_from_dict(yaml.safe_load(f) or {})
    ckpt = Checkpoints(workdir, cfg)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train first")
    mesh = mesh if mesh is not None else partitioning.make_mesh(cfg)
    boxed = abstract_params(cfg)
    shardings = partitioning.shardings_from_logical(boxed, mesh, partitioning.logical_rules(cfg, mesh))
    params = ckpt.restore_params(step, abstract_with_shardings(nn.meta.unbox(boxed), shardings))
    ckpt.close()
    tok_path = cfg.data.tokenizer or os.path.join(workdir, "tokenizer.model")
    if not os.path.exists(tok_path):
        raise ConfigError(f"tokenizer {tok_path} not found")
    return cfg, params, Tokenizer.load(tok_path)
