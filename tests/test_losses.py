"""Cross-entropy: the written-out gradient of ``logit_stats`` against differentiating the float32 ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite.losses import cross_entropy_sums, logit_stats


def reference_sums(logits, targets, weights, z_loss=0.0, label_smoothing=0.0):
    """The loss as plain float32 jax ops (what jax differentiates by itself)."""
    x = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(x, axis=-1)
    nll = log_z - jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    if label_smoothing:
        nll = (1 - label_smoothing) * nll + label_smoothing * (log_z - jnp.mean(x, axis=-1))
    z = z_loss * jnp.square(log_z)
    return {"loss": jnp.sum((nll + z) * weights), "z_loss": jnp.sum(z * weights), "weight": jnp.sum(weights),
            "correct": jnp.sum((jnp.argmax(x, -1) == targets) * weights)}


def batch(dtype, seed=0, b=3, length=5, vocab=37):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(b, length, vocab)) * 3, dtype)
    targets = jnp.asarray(rng.integers(0, vocab, (b, length)), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, (b, length)), jnp.float32).at[0, 0].set(1.0)
    return logits, targets, weights


@pytest.mark.parametrize("z_loss,smoothing", [(0.0, 0.0), (1e-2, 0.0), (0.0, 0.1), (1e-3, 0.2)])
def test_values_and_gradient_match_differentiating_the_float32_ops(z_loss, smoothing):
    logits, targets, weights = batch(jnp.float32)
    ours = cross_entropy_sums(logits, targets, weights, z_loss=z_loss, label_smoothing=smoothing)
    ref = reference_sums(logits, targets, weights, z_loss, smoothing)
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6, err_msg=k)

    def objective(fn):  # both outputs that carry gradient, mixed so that each cotangent matters
        return lambda x: (lambda s: s["loss"] + 0.5 * s["z_loss"])(fn(x))

    g = jax.grad(objective(lambda x: cross_entropy_sums(x, targets, weights, z_loss=z_loss,
                                                        label_smoothing=smoothing)))(logits)
    g_ref = jax.grad(objective(lambda x: reference_sums(x, targets, weights, z_loss, smoothing)))(logits)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(g).sum()) > 0


def test_bf16_logits_get_a_bf16_gradient_close_to_the_float32_one():
    logits, targets, weights = batch(jnp.bfloat16, seed=1)
    g = jax.grad(lambda x: cross_entropy_sums(x, targets, weights, z_loss=1e-3)["loss"])(logits)
    g_ref = jax.grad(lambda x: reference_sums(x, targets, weights, 1e-3)["loss"])(logits.astype(jnp.float32))
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), g_ref, rtol=1e-2, atol=1e-3)


def test_logit_stats_under_jit_and_vmap_and_its_mean():
    logits, targets, _ = batch(jnp.float32, seed=2)
    log_z, target, mean = jax.jit(logit_stats, static_argnums=2)(logits, targets, True)
    np.testing.assert_allclose(log_z, jax.nn.logsumexp(logits, -1), rtol=1e-6)
    np.testing.assert_allclose(mean, logits.mean(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(target, jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])
    # the gradient of each output alone: softmax, the one-hot of the target, 1 / V
    for i, expect in enumerate((jax.nn.softmax(logits, -1), jax.nn.one_hot(targets, logits.shape[-1]),
                                jnp.full(logits.shape, 1 / logits.shape[-1]))):
        g = jax.grad(lambda x: jnp.sum(logit_stats(x, targets, True)[i]))(logits)
        np.testing.assert_allclose(g, expect, rtol=1e-5, atol=1e-7)
    per_row = jax.vmap(lambda x, t: logit_stats(x, t)[0])(logits, targets)
    np.testing.assert_allclose(per_row, log_z, rtol=1e-6)
