"""``t5x-lite plan``: what one device holds and what the compiler needs, before any training."""

from __future__ import annotations

from typing import Optional, Sequence

import jax

from t5x_lite import partitioning
from t5x_lite.config import Config
from t5x_lite.metrics import human_bytes, tokens_per_step, train_flops_per_step


def compiled_plan(cfg: Config, devices: Optional[Sequence[jax.Device]] = None) -> dict:
    """Compile the train step ahead of time on ``devices`` (default: all) without allocating
    the model, and report per-device state bytes from the actual shardings next to the
    compiler's own memory analysis."""
    from t5x_lite.trainer import compile_train_step, compiled_stats, make_setup

    mesh = partitioning.make_mesh(cfg, devices)
    setup = make_setup(cfg, mesh)
    sizes = setup.bytes_per_device()
    stats = compiled_stats(compile_train_step(setup))
    num_params = sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))
    return {
        "mesh": dict(mesh.shape),
        "num_devices": int(mesh.size),
        "zero_stage": cfg.sharding.zero_stage,
        "family": cfg.model.family,
        "num_params": int(num_params),
        "params_bytes_per_device": sizes["params"],
        "grads_bytes_per_device": sizes["grads"],
        "opt_state_bytes_per_device": sizes["opt_state"],
        "state_bytes_per_device": sizes["params"] + sizes["opt_state"],
        "compiled_temp_bytes": stats.get("temp_bytes"),
        "compiled_argument_bytes": stats.get("argument_bytes"),
        "compiled_output_bytes": stats.get("output_bytes"),
        "compiled_flops_per_device": stats.get("flops"),
        "model_flops_per_step": train_flops_per_step(cfg),
        "tokens_per_step": tokens_per_step(cfg),
    }


def format_plan(plan: dict) -> str:
    rows = [
        ("mesh", " x ".join(f"{k}={v}" for k, v in plan["mesh"].items())),
        ("zero stage", str(plan["zero_stage"])),
        ("parameters", f"{plan['num_params']:,}"),
        ("params / device", human_bytes(plan["params_bytes_per_device"])),
        ("grads / device", human_bytes(plan["grads_bytes_per_device"])),
        ("optimizer state / device", human_bytes(plan["opt_state_bytes_per_device"])),
        ("state / device (params + opt)", human_bytes(plan["state_bytes_per_device"])),
        ("compiled temp / device", human_bytes(plan["compiled_temp_bytes"] or 0)),
        ("compiled arguments / device", human_bytes(plan["compiled_argument_bytes"] or 0)),
        ("model TFLOP / step", f"{plan['model_flops_per_step'] / 1e12:.4g}"),
        ("tokens / step", f"{plan['tokens_per_step']:,}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
