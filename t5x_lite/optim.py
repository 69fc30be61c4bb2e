"""Learning-rate schedules and optimizers, built from optax pieces."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from t5x_lite.config import Config

NO_DECAY_LEAVES = ("scale", "bias", "logits_bias", "router_bias")  # norms and biases are never decayed


def make_schedule(cfg: Config) -> optax.Schedule:
    """Linear warmup to the peak, then cosine / linear / inverse-sqrt decay, constant, or wsd (the
    peak held, then a linear decay to ``end_lr_ratio`` x peak over the last ``decay_fraction`` of
    the steps: a run can be continued from before its decay)."""
    o = cfg.optim
    peak, warmup = o.learning_rate, o.warmup_steps
    decay_steps = max(cfg.train.steps - warmup, 1)
    end = peak * o.end_lr_ratio
    if o.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=o.end_lr_ratio)
    elif o.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif o.schedule == "wsd":  # warmup-stable-decay: the peak until the last decay_fraction of all steps
        cool = max(min(round(o.decay_fraction * cfg.train.steps), decay_steps), 1)
        decay = optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, end, cool)],
                                     [decay_steps - cool])
    elif o.schedule == "inverse_sqrt":
        offset = max(warmup, 1)
        decay = lambda count: peak * (offset / (jnp.maximum(count, 0) + offset)) ** 0.5  # count < 0: join's other side
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    # Step 0 already takes peak / warmup: no update is wasted on a zero learning rate.
    return optax.join_schedules([optax.linear_schedule(peak / warmup, peak, warmup), decay], [warmup])


def decay_mask(params):
    """True for leaves that take weight decay: every weight but norm scales and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in NO_DECAY_LEAVES, params)


MUON_MOMENTUM = 0.95  # Muon's own momentum (optim.b1 / b2 are AdamW's, for the rest)
MUON_RMS = 0.2  # Muon's updates scaled to AdamW's typical RMS (Liu et al. 2025): AdamW's learning rates apply


def muon_dimensions(cfg: Config) -> dict:
    """``keystr(path) -> optax.contrib.MuonDimensionNumbers`` for every parameter Muon updates: the
    layers' projection kernels, read as matrices from their logical axes (the stacked ``layers``
    axis is a batch axis: one orthogonalisation per layer; ``experts`` too: one per expert). A
    kernel writing the residual stream (last axis ``embed``: attention out, MLP out) reduces
    over all its other axes; one reading it (q / k / v, MLP in, BERT's head transform) reduces
    over ``embed`` and outputs the rest. Embeddings, the output layer (``vocab``), MoE routers,
    relative-position tables, norms and biases: AdamW."""
    import flax.linen as nn

    from t5x_lite.models import abstract_params
    from t5x_lite.partitioning import logical_names

    out = {}
    boxed = abstract_params(cfg)
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))[0]
    for (path, _), names in zip(flat, logical_names(boxed)):
        if (getattr(path[-1], "key", None) != "kernel" or "vocab" in names or "embed" not in names
                or names[-1] == "experts"):  # a MoE router: AdamW
            continue
        axes = [i for i, n in enumerate(names) if n not in ("layers", "experts")]  # one matrix per expert
        if names[-1] == "embed":
            reduction, output = axes[:-1], axes[-1:]
        else:
            reduction = [i for i in axes if names[i] == "embed"]
            output = [i for i in axes if names[i] != "embed"]
        out[jax.tree_util.keystr(path)] = optax.contrib.MuonDimensionNumbers(tuple(reduction), tuple(output))
    return out


def _muon(cfg: Config, schedule) -> optax.GradientTransformation:
    o = cfg.optim
    dims = muon_dimensions(cfg)
    label = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: "muon" if jax.tree_util.keystr(path) in dims else "adamw", params)
    muon = optax.contrib.muon(
        schedule, beta=MUON_MOMENTUM, weight_decay=o.weight_decay, consistent_rms=MUON_RMS,
        muon_weight_dimension_numbers=lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: dims[jax.tree_util.keystr(path)], params))
    adamw = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)
    return optax.multi_transform({"muon": muon, "adamw": adamw}, label)


def make_optimizer(cfg: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = cfg.optim
    schedule = make_schedule(cfg)
    if o.name == "adamw":
        opt = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)
    elif o.name == "muon":
        opt = _muon(cfg, schedule)
    else:
        # LoRA: B starts at zero, and Adafactor's steps scale with a parameter's RMS (at least
        # 1e-3): B would move by a thousandth of the learning rate. Unscaled steps there.
        opt = optax.adafactor(learning_rate=schedule, weight_decay_rate=o.weight_decay or None,
                              weight_decay_mask=decay_mask, multiply_by_parameter_scale=not cfg.model.lora_rank)
    if cfg.model.lora_rank:
        from t5x_lite import lora

        opt = lora.only_adapters(opt)
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    tx = optax.chain(*parts, opt)
    if cfg.train.loss_scaling(cfg.model.dtype):
        tx = dynamic_loss_scale(tx, cfg.train.loss_scale_init, cfg.train.loss_scale_period)
    return tx, schedule


# ------------------------------------------------------------------ loss scaling (float16)


class LossScaleState(NamedTuple):
    """The scale the next step multiplies its loss by, finite steps since it last changed, and
    ``optax.apply_if_finite``'s state around the optimizer (its ``total_notfinite``: steps skipped)."""

    scale: jax.Array  # float32 []
    good_steps: jax.Array  # int32 []
    inner: Any


def dynamic_loss_scale(inner: optax.GradientTransformation, init_scale: float, period: int,
                       factor: float = 2.0) -> optax.GradientTransformation:
    """``inner`` behind a dynamic loss scale. The train step multiplies its loss by
    ``loss_scale_of(opt_state)`` and divides the gradients by it before ``update``. Non-finite
    gradients (the scaled backward pass overflowed float16): ``optax.apply_if_finite`` leaves
    params and ``inner``'s state as they were, and the scale is divided by ``factor`` (not below
    1); ``period`` finite steps in a row multiply it by ``factor``. The state lives in the
    optimizer state, so checkpoints, resumes and shardings (replicated scalars) carry it."""
    guarded = optax.apply_if_finite(inner, max_consecutive_errors=2**31 - 1)  # never apply non-finite updates

    def init(params):
        return LossScaleState(jnp.asarray(init_scale, jnp.float32), jnp.zeros((), jnp.int32), guarded.init(params))

    def update(grads, state: LossScaleState, params=None):
        updates, guarded_state = guarded.update(grads, state.inner, params)
        finite = guarded_state.last_finite
        good = jnp.where(finite, state.good_steps + 1, 0)
        grow = good >= period
        scale = jnp.where(finite, jnp.where(grow, state.scale * factor, state.scale),
                          jnp.maximum(state.scale / factor, 1.0))
        return updates, LossScaleState(scale, jnp.where(grow, 0, good).astype(jnp.int32), guarded_state)

    return optax.GradientTransformation(init, update)


def loss_scale_of(opt_state) -> Optional[LossScaleState]:
    """The ``LossScaleState`` of an optimizer state that has one (float16 training), else None."""
    return opt_state if isinstance(opt_state, LossScaleState) else None
