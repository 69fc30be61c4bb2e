"""The attention bias's own gradient (``models/bias_grad.py``): the Pallas kernel (in Pallas'
interpreter here) and the XLA sum against differentiating XLA's attention, the VJP's assembly
with XLA standing in for cuDNN, and the same on a mesh of 8 devices."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from t5x_lite.models import bias_grad as bg
from t5x_lite.models.layers import dot_product_attention

B, T, N, K, H = 3, 64, 4, 2, 16  # GQA: two query heads a kv head
SCALE = 0.3


def _inputs(batch: int = B):
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q = jax.random.normal(keys[0], (batch, T, N, H))
    k, v = (jax.random.normal(key, (batch, T, K, H)) for key in keys[1:3])
    bias = jax.random.normal(keys[3], (1, N, T, T))
    rows = [[1] * 30 + [2] * 26 + [0] * 8, [1] * T, [1] * 10 + [2] * 50 + [3] * 4]  # documents, padding
    seg = jnp.asarray([rows[i % 3] for i in range(batch)])
    causal = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
    mask = (seg[:, None, :, None] == seg[:, None, None, :]) & (seg[:, None, :, None] > 0) & causal
    # the cotangent at padding rows is 0 in a model (the loss never reads them, nor do other rows)
    w = jax.random.normal(keys[4], (batch, T, N, H)) * (seg > 0)[:, :, None, None]
    return q, k, v, bias, mask, w


def _xla_grads(q, k, v, bias, mask, w):
    loss = lambda *a: jnp.sum(dot_product_attention(*a[:3], mask, a[3], SCALE, "xla") * w)  # noqa: E731
    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)


def _own_grads(q, k, v, bias, mask, w, bias_grad):
    loss = lambda *a: jnp.sum(bg.attention_own_bias_grad(*a, mask, SCALE, bg.xla_core, bias_grad) * w)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)


def _pallas(*args):
    return bg.bias_grad_pallas(*args, block=32, interpret=True)


@pytest.mark.parametrize("bias_grad", [bg.bias_grad_reference, _pallas], ids=["xla_sum", "pallas"])
def test_own_bias_grad_equals_differentiating_xla_attention(bias_grad):
    """q, k, v from the core's VJP and the bias from the kernel (or the XLA sum): the gradients
    of differentiating XLA's attention, with documents, padding, causality and GQA."""
    q, k, v, bias, mask, w = _inputs()
    want = _xla_grads(q, k, v, bias, mask, w)
    got = _own_grads(q, k, v, bias, mask, w, bias_grad)
    for name, a, b in zip("qkvb", want, got):
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=2e-5, err_msg=name)
    assert float(jnp.max(jnp.abs(want[3]))) > 1.0  # a gradient worth comparing


@pytest.mark.parametrize("causal", [False, True])
def test_own_bias_grad_over_row_lengths_equals_differentiating_xla_attention(causal):
    """Rows of one document from slot 0 given as lengths (model.max_segments 1): the core gets the
    [1, N, T, S] bias and the lengths (causal or not), the kernel (in the interpreter) the mask
    they make; the gradients of real queries' outputs equal differentiating XLA's attention under
    the segment mask, and padded queries get none."""
    q, k, v, bias, _, w = _inputs()
    lengths_B = jnp.asarray([T, 41, 1][:B], jnp.int32)
    seg = (jnp.arange(T)[None, :] < lengths_B[:, None]).astype(jnp.int32)
    mask = (seg[:, None, :, None] == seg[:, None, None, :]) & (seg[:, None, :, None] > 0)
    if causal:
        mask = mask & (jnp.arange(T)[:, None] >= jnp.arange(T)[None, :])
    w = w * (seg > 0)[:, :, None, None]
    want = _xla_grads(q, k, v, bias, mask, w)

    def loss(q, k, v, bias):
        out = bg.attention_own_bias_grad(q, k, v, bias, None, SCALE, bg.xla_core, _pallas,
                                         lengths=(lengths_B, lengths_B), causal=causal)
        return jnp.sum(out * w)

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
    for name, a, b in zip("qkvb", want, got):
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=2e-5, err_msg=name)
    assert bool(jnp.all(jnp.isfinite(got[3])))


def test_pallas_kernel_equals_xla_sum_tile_by_tile():
    """The kernel alone on blocks of 16 (16 programs a head), the log-sum-exp and D given."""
    q, k, v, bias, mask, w = _inputs()
    out, lse = bg.xla_core(q, k, v, bg.combine_bias_and_mask(bias, mask, q.dtype), SCALE)
    delta = jnp.einsum("btnh,btnh->bnt", w, out)
    args = (q, k, v, w, lse, delta, bias, mask, SCALE)
    want = bg.bias_grad_reference(*args)
    got = bg.bias_grad_pallas(*args, block=16, interpret=True)
    assert got.shape == (N, T, T) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    rect = bg.bias_grad_pallas(*args, block=16, block_k=32, interpret=True)  # 16 x 32 tiles
    np.testing.assert_allclose(rect, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiples of 48"):
        bg.bias_grad_pallas(*args, block=48, interpret=True)
    assert bg.kernel_fits(512, 512, 64) and not bg.kernel_fits(114, 114, 64) and not bg.kernel_fits(64, 64, 24)


def test_own_bias_grad_on_a_mesh_equals_one_device():
    """8 devices (data 2 x fsdp 2 x tensor 2): each sums its own rows, then over the batch's axes."""
    q, k, v, bias, mask, w = _inputs(batch=4)
    want = _own_grads(q, k, v, bias, mask, w, bg.bias_grad_reference)
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    rules = (("act_batch", ("data", "fsdp")), ("act_length", None), ("act_heads", "tensor"),
             ("act_kv_heads", "tensor"), ("act_kv", None))

    def loss(q, k, v, bias):
        q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", "act_kv"))
        return jnp.sum(bg.attention_own_bias_grad(q, k, v, bias, mask, SCALE, bg.xla_core, _pallas) * w)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        assert "shard_map" in str(step.trace(q, k, v, bias).jaxpr)
        got = step(q, k, v, bias)
    for name, a, b in zip("qkvb", want, got):
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=2e-5, err_msg=name)


def test_bias_in_the_compute_dtype_recomputes_what_the_kernel_saw():
    """bf16 compute: the probabilities are recomputed from the bias rounded as the attention read
    it, and the gradient returns in the bias's own float32, close to differentiating in float32."""
    q, k, v, bias, mask, w = _inputs()
    want = _xla_grads(q, k, v, bias, mask, w)[3]
    lo = lambda a: a.astype(jnp.bfloat16)  # noqa: E731
    got = _own_grads(lo(q), lo(k), lo(v), bias, mask, lo(w), bg.bias_grad_reference)[3]
    assert got.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(got - want))) < 0.05 * float(jnp.max(jnp.abs(want)))
