"""Cross-entropy in float32 with optional z-loss and label smoothing, masked by loss weights.

Functions return *sums* (and the weight total) rather than means, so micro-batches, devices
and eval batches combine exactly: mean = sum / weight, taken once at the end.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array


def _logit_stats_fwd_values(logits_BLV: Array, targets_BL: Array, with_mean: bool) -> tuple:
    x = logits_BLV.astype(jnp.float32)  # fused into each reduction: no float32 copy is kept
    log_z_BL = jax.nn.logsumexp(x, axis=-1)
    target_BL = jnp.take_along_axis(x, targets_BL[..., None], axis=-1)[..., 0]
    mean_BL = jnp.mean(x, axis=-1) if with_mean else jnp.zeros_like(log_z_BL)
    return log_z_BL, target_BL, mean_BL


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def logit_stats(logits_BLV: Array, targets_BL: Array, with_mean: bool = False) -> tuple:
    """``(logsumexp, target logit, mean logit)`` over the vocabulary, float32 ``[B, L]`` each, from
    logits of any float dtype (``mean`` is 0 unless ``with_mean``).

    Its gradient is written out instead of differentiated: ``g_z softmax + g_t onehot + g_m / V``,
    one elementwise pass over the logits in their own dtype. Differentiating the float32 ops
    instead makes XLA scatter the target's gradient into a zeroed ``[B, L, V]`` float32 buffer and
    pass over float32 logits several times (H100, llama_1b's 16,384 x 32,000 logits: ~14 GB of
    traffic a step where this moves ~7, by ``bench/offline_gpu.py``'s count)."""
    return _logit_stats_fwd_values(logits_BLV, targets_BL, with_mean)


def _logit_stats_fwd(logits_BLV, targets_BL, with_mean):
    out = _logit_stats_fwd_values(logits_BLV, targets_BL, with_mean)
    return out, (logits_BLV, targets_BL, out[0])


def _logit_stats_bwd(with_mean, residuals, cotangents):
    logits_BLV, targets_BL, log_z_BL = residuals
    g_z, g_t, g_m = (c.astype(jnp.float32)[..., None] for c in cotangents)
    x = logits_BLV.astype(jnp.float32)
    vocab = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    d = g_z * jnp.exp(x - log_z_BL[..., None]) + jnp.where(vocab == targets_BL[..., None], g_t, 0.0)
    if with_mean:
        d = d + g_m / x.shape[-1]
    return d.astype(logits_BLV.dtype), None


logit_stats.defvjp(_logit_stats_fwd, _logit_stats_bwd)


def cross_entropy_sums(logits_BLV: Array, targets_BL: Array, weights_BL: Array, *, z_loss: float = 0.0,
                       label_smoothing: float = 0.0) -> dict:
    """Sums over the batch of: ``loss`` (cross-entropy + z-loss), ``z_loss``, ``weight`` and
    ``correct`` (argmax == target), each weighted by ``weights_BL``. Computed in float32 from
    logits of any dtype (``logit_stats``); their gradient comes back in the logits' dtype."""
    weights = weights_BL.astype(jnp.float32)
    log_z_BL, target_logit_BL, mean_logit_BL = logit_stats(logits_BLV, targets_BL, bool(label_smoothing))
    nll_BL = log_z_BL - target_logit_BL
    if label_smoothing:
        nll_BL = (1.0 - label_smoothing) * nll_BL + label_smoothing * (log_z_BL - mean_logit_BL)
    z_BL = z_loss * jnp.square(log_z_BL)
    correct_BL = (jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)  # bf16 -> f32 is exact
    return {
        "loss": jnp.sum((nll_BL + z_BL) * weights),
        "z_loss": jnp.sum(z_BL * weights),
        "weight": jnp.sum(weights),
        "correct": jnp.sum(correct_BL * weights),
    }


def chunked_cross_entropy_sums(hidden_BLD: Array, head_fn, targets_BL: Array, weights_BL: Array, chunk: int,
                               **kwargs) -> dict:
    """``cross_entropy_sums`` of ``head_fn(hidden)`` computed ``chunk`` positions at a time.

    The logits of one chunk (``[B, chunk, V]``) exist at a time, in the forward pass and, through
    ``jax.checkpoint``, in the backward pass too: the float32 logits of the whole batch are
    never materialised. Chunks run along the length axis so each keeps the batch sharding.
    """
    b, length, d = hidden_BLD.shape
    pad = -length % chunk
    if pad:  # padded positions carry weight 0
        hidden_BLD = jnp.pad(hidden_BLD, ((0, 0), (0, pad), (0, 0)))
        targets_BL = jnp.pad(targets_BL, ((0, 0), (0, pad)))
        weights_BL = jnp.pad(weights_BL, ((0, 0), (0, pad)))
    n = (length + pad) // chunk

    def chunks(x):
        return jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def one(h_BCD, t_BC, w_BC):
        return cross_entropy_sums(head_fn(h_BCD), t_BC, w_BC, **kwargs)

    def body(acc, xs):
        return jax.tree.map(jnp.add, acc, one(*xs)), None

    zeros = {k: jnp.zeros((), jnp.float32) for k in ("loss", "z_loss", "weight", "correct")}
    sums, _ = jax.lax.scan(body, zeros, (chunks(hidden_BLD), chunks(targets_BL), chunks(weights_BL)))
    return sums


def max_scored_positions(length: int, rate: float) -> int:
    """The most positions per row the MLM objective scores: it picks ``round(rate * m)`` (at
    least one) of a row's ``m <= length`` maskable tokens, which never exceeds this."""
    return max(1, math.ceil(rate * length))


def gather_scored(weights_BL: Array, count: int) -> Array:
    """Indices ``[B, count]`` of every position with weight > 0 in each row (rows with fewer are
    filled with weight-0 positions). Needs at most ``count`` weighted positions per row."""
    _, index_BM = jax.lax.top_k((weights_BL > 0).astype(jnp.int32), count)
    return index_BM


def masked_cross_entropy_sums(hidden_BLD: Array, head_fn, targets_BL: Array, weights_BL: Array, rate: float,
                              chunk: int = 0, **kwargs) -> dict:
    """``cross_entropy_sums`` of ``head_fn(hidden)`` for masked-LM rows, with the vocabulary head
    run only at the scored positions (``max_scored_positions`` of them per row, ~15% of the
    length) instead of all of them: the same sums, about a sixth of the head's FLOPs and logits
    memory. ``chunk`` > 0 further splits those positions as ``chunked_cross_entropy_sums``."""
    count = max_scored_positions(targets_BL.shape[1], rate)
    if count >= targets_BL.shape[1]:
        index_BM = jnp.broadcast_to(jnp.arange(targets_BL.shape[1]), targets_BL.shape)
    else:
        index_BM = gather_scored(weights_BL, count)
    hidden_BMD = jnp.take_along_axis(hidden_BLD, index_BM[..., None], axis=1)
    targets_BM = jnp.take_along_axis(targets_BL, index_BM, axis=1)
    weights_BM = jnp.take_along_axis(weights_BL, index_BM, axis=1)
    if chunk and chunk < count:
        return chunked_cross_entropy_sums(hidden_BMD, head_fn, targets_BM, weights_BM, chunk, **kwargs)
    return cross_entropy_sums(head_fn(hidden_BMD), targets_BM, weights_BM, **kwargs)
