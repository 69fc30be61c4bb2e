"""Learning-rate schedules and optimizers, built from optax pieces."""

from __future__ import annotations

import jax
import optax

from t5x_lite.config import Config

NO_DECAY_LEAVES = ("scale", "bias", "logits_bias")  # norms and biases are never decayed


def make_schedule(cfg: Config) -> optax.Schedule:
    """Linear warmup to the peak, then cosine / linear / inverse-sqrt decay or constant."""
    o = cfg.optim
    peak, warmup = o.learning_rate, o.warmup_steps
    decay_steps = max(cfg.train.steps - warmup, 1)
    end = peak * o.end_lr_ratio
    if o.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=o.end_lr_ratio)
    elif o.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif o.schedule == "inverse_sqrt":
        offset = max(warmup, 1)
        decay = lambda count: peak * (offset / (count + offset)) ** 0.5
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


def make_optimizer(cfg: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = cfg.optim
    schedule = make_schedule(cfg)
    if o.name == "adamw":
        opt = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)
    else:
        opt = optax.adafactor(learning_rate=schedule, weight_decay_rate=o.weight_decay or None,
                              weight_decay_mask=decay_mask)
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    return optax.chain(*parts, opt), schedule
