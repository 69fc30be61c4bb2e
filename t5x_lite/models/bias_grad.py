"""Attention with an additive bias whose gradient is computed apart from the attention kernel.

T5's relative-position bias is one ``[1, N, T, S]`` array, shared by the batch and by every
layer of a stack, trained through 32 buckets a head. jax's cuDNN attention, given that bias and a
``[B, 1, T, S]`` mask, adds them into a ``[B, N, T, S]`` bias and asks the kernel for the
gradient of all of it, which its VJP then sums over the batch. On an H100 (session 8's profile,
2026-11-23) that made t5_base's encoder self-attention backward kernel 1.67 ms a layer, against
0.77 ms for BERT's of the same shape without a bias gradient, plus a 0.2 ms reduction: ~13 ms of
a 93 ms step.

Here (``model.attention_bias_grad: pallas``) cuDNN runs the forward and the backward pass for
q, k and v without a bias gradient, and ``bias_grad_pallas`` computes the bias gradient
``sum_b P * (dP - D)`` straight into ``[N, T, S]``: one program per (query block, key block,
head) loops over the batch, recomputes the probabilities ``P = exp(scale q k^T + bias - lse)``
from cuDNN's log-sum-exp, ``dP = dO v^T`` and ``D = rowsum(dO * O)``, and adds ``P (dP - D)``
into a float32 tile held in registers, written once. That is two of the backward pass's five
matmuls again, in exchange for never writing a ``[B, N, T, S]`` gradient. Lengths that do not
split into the kernel's blocks of 64 (T5's 114-token decoder) keep cuDNN's bias gradient
(``attention_bias_grad_applies``); ``bias_grad_reference`` is the same sum in XLA, for the tests.
A bias with no trainable source (ALiBi) leaves cuDNN without a bias gradient and the kernel's
result unused, which XLA drops.

``attention_own_bias_grad`` takes the attention itself as ``core`` (cuDNN's, ``cudnn_core``, on
a GPU; the tests give it XLA's) and the bias-gradient function, so that the VJP's assembly is
checked on a CPU against differentiating XLA's attention; the kernel is checked there in Pallas'
interpreter.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from t5x_lite.models.layers import NEG_INF

Array = jax.Array
BLOCK = 64  # the kernel's query and key block


def combine_bias_and_mask(bias_1NTS: Array, mask_B1TS: Array, dtype) -> Array:
    """``[B, N, T, S]``: the bias with masked pairs at ``NEG_INF``, in ``dtype`` (what cuDNN reads)."""
    return jnp.where(mask_B1TS, bias_1NTS.astype(dtype), jnp.asarray(NEG_INF, dtype))


def _scores(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, bias: Array, scale: float) -> tuple[Array, Array]:
    """XLA: float32 scores ``scale q k^T + bias`` [B, N, T, S] and v with its heads repeated to q's."""
    g = q_BTNH.shape[2] // k_BSKH.shape[2]
    k_BSNH, v_BSNH = (jnp.repeat(a, g, axis=2) for a in (k_BSKH, v_BSKH))
    s_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH, preferred_element_type=jnp.float32) * scale
    return s_BNTS + bias.astype(jnp.float32), v_BSNH


def bias_grad_reference(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, do_BTNH: Array, lse_BNT: Array,
                        delta_BNT: Array, bias_1NTS: Array, mask_B1TS: Array, scale: float) -> Array:
    """``[N, T, S]`` float32: ``sum_b P * (dP - D)`` in XLA, materialising ``[B, N, T, S]``."""
    s_BNTS, v_BSNH = _scores(q_BTNH, k_BSKH, v_BSKH, bias_1NTS, scale)
    p_BNTS = jnp.where(mask_B1TS, jnp.exp(s_BNTS - lse_BNT[..., None]), 0.0)
    dp_BNTS = jnp.einsum("btnh,bsnh->bnts", do_BTNH, v_BSNH, preferred_element_type=jnp.float32)
    return jnp.sum(p_BNTS * (dp_BNTS - delta_BNT[..., None]), axis=0)


def _bias_grad_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, bias_ref, mask_ref, out_ref, *,
                      scale: float, batch: int):
    """One (query block, key block, head) tile, summed over the batch in registers."""
    from jax.experimental.pallas import triton as plgpu

    bias = bias_ref[...].astype(jnp.float32)

    def one_row(b, acc):
        s = plgpu.dot(q_ref[b], k_ref[b], trans_b=True).astype(jnp.float32) * scale + bias
        p = jnp.where(mask_ref[b] != 0, jnp.exp(s - lse_ref[b][:, None]), 0.0)
        dp = plgpu.dot(do_ref[b], v_ref[b], trans_b=True).astype(jnp.float32)
        return acc + p * (dp - delta_ref[b][:, None])

    out_ref[...] = jax.lax.fori_loop(0, batch, one_row, jnp.zeros(out_ref.shape, jnp.float32))


def kernel_fits(t: int, s: int, h: int, block: int = BLOCK) -> bool:
    """Whether ``bias_grad_pallas`` takes these lengths and head size (blocks of ``block``; Triton
    wants a power-of-two head size of at least 16)."""
    return t % block == 0 and s % block == 0 and h >= 16 and h & (h - 1) == 0


def bias_grad_pallas(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, do_BTNH: Array, lse_BNT: Array,
                     delta_BNT: Array, bias_1NTS: Array, mask_B1TS: Array, scale: float, *,
                     block: int = BLOCK, block_k: Optional[int] = None, num_warps: int = 4, num_stages: int = 2,
                     interpret: bool = False) -> Array:
    """``[N, T, S]`` float32, as ``bias_grad_reference``, by a Pallas (Triton) kernel: grid
    ``(T / block, S / block_k, N)``, each program looping over the batch (``block_k`` defaults to
    ``block``; ``num_warps`` / ``num_stages`` are Triton's, for tuning on a GPU:
    ``bench/attention.py --t5``). GQA: head n reads kv head ``n // G``. ``interpret``: Pallas'
    interpreter (any backend; the tests)."""
    from jax.experimental import pallas as pl

    b, t, n, h = q_BTNH.shape
    s, k = k_BSKH.shape[1], k_BSKH.shape[2]
    block_k = block_k or block
    if not (kernel_fits(t, s, h, block) and s % block_k == 0):
        raise ValueError(f"bias_grad_pallas: lengths {t} x {s} must be multiples of {block} x {block_k}, head "
                         f"size {h} a power of two >= 16")
    g = n // k
    q_spec = pl.BlockSpec((b, block, None, h), lambda i, j, m: (0, i, m, 0))
    kv_spec = pl.BlockSpec((b, block_k, None, h), lambda i, j, m: (0, j, m // g, 0))
    row_spec = pl.BlockSpec((b, None, block), lambda i, j, m: (0, m, i))
    tile_spec = pl.BlockSpec((None, block, block_k), lambda i, j, m: (m, i, j))
    mask_spec = pl.BlockSpec((b, block, block_k), lambda i, j, m: (0, i, j))
    kwargs = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(
        functools.partial(_bias_grad_kernel, scale=scale, batch=b),
        grid=(t // block, s // block_k, n),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, tile_spec, mask_spec],
        out_specs=tile_spec,
        out_shape=jax.ShapeDtypeStruct((n, t, s), jnp.float32),
        interpret=interpret,
        name="attention_bias_grad",
        **kwargs,
    )(q_BTNH, k_BSKH, v_BSKH, do_BTNH, lse_BNT.astype(jnp.float32), delta_BNT.astype(jnp.float32),
      bias_1NTS.reshape(n, t, s), mask_B1TS[:, 0].astype(jnp.int8))


def lengths_mask(lengths: tuple, t: int, s: int, causal: bool = False) -> Array:
    """``[B, 1, T, S]`` bool: what cuDNN's padding mask lets a query see, from ``(q_lengths [B],
    kv_lengths [B])`` (rows of one document from slot 0), causally if ``causal``."""
    q_len_B, kv_len_B = lengths
    mask = ((jnp.arange(t)[None, :, None] < q_len_B[:, None, None])
            & (jnp.arange(s)[None, None, :] < kv_len_B[:, None, None]))
    if causal:
        mask = mask & (jnp.arange(t)[:, None] >= jnp.arange(s)[None, :])[None]
    return mask[:, None]


def xla_core(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, bias_BNTS: Array, scale: float,
             lengths: Optional[tuple] = None, causal: bool = False) -> tuple[Array, Array]:
    """``cudnn_core``'s answer in XLA (scores materialised): the tests' and the CPU smoke's core."""
    if lengths is not None:
        bias_BNTS = combine_bias_and_mask(bias_BNTS, lengths_mask(lengths, q_BTNH.shape[1], k_BSKH.shape[1], causal),
                                          q_BTNH.dtype)
    s_BNTS, v_BSNH = _scores(q_BTNH, k_BSKH, v_BSKH, bias_BNTS, scale)
    lse_BNT = jax.nn.logsumexp(s_BNTS, axis=-1)
    p_BNTS = jnp.exp(s_BNTS - lse_BNT[..., None]).astype(v_BSNH.dtype)
    return jnp.einsum("bnts,bsnh->btnh", p_BNTS, v_BSNH), lse_BNT


def cudnn_core(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, bias_BNTS: Array, scale: float,
               lengths: Optional[tuple] = None, causal: bool = False) -> tuple[Array, Array]:
    """jax's cuDNN flash attention with ``bias_BNTS`` added to the scores and no bias gradient:
    ``(out [B, T, N, H], log-sum-exp [B, N, T] float32)``, differentiable in q, k, v; with
    ``lengths`` (``(q [B], kv [B])``), cuDNN's padding mask (causal if ``causal``) and the bias
    as it is (``[1, N, T, S]``). A private jax function (``jax._src.cudnn.fused_attention_stablehlo``,
    the same signature in jax 0.10 and 0.11); raises off a GPU."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    version = fa.check_cudnn_version()
    unused = jnp.zeros(0, q_BTNH.dtype)
    q_len, kv_len, mask_type = unused, unused, fa.MaskType.NO_MASK
    if lengths is not None:
        q_len, kv_len = lengths
        mask_type = fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
    out, lse = fa._dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, bias_BNTS, q_len, kv_len, unused, unused, unused, unused, scale, 42, 0.0,
        (True, False), mask_type, fa.AttentionLayout.BTNH.value, None, version, True)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 9))
def attention_own_bias_grad(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, bias_1NTS: Array, mask_B1TS: Array,
                            scale: float, core: Callable = cudnn_core, bias_grad: Callable = bias_grad_pallas,
                            lengths: Optional[tuple] = None, causal: bool = False) -> Array:
    """softmax(scale q k^T + bias, masked) v, the bias's gradient by ``bias_grad`` (module doc).
    ``core(q, k, v, combined bias [B, N, T, S], scale) -> (out, lse)``. With ``lengths`` (rows of
    one document from slot 0: ``(q [B], kv [B])``) the core gets the ``[1, N, T, S]`` bias and
    the lengths (its padding mask, causal if ``causal``) instead of the mask added into the bias,
    and the kernel the mask those lengths make."""
    return _fwd(q_BTNH, k_BSKH, v_BSKH, bias_1NTS, mask_B1TS, scale, core, bias_grad, lengths, causal)[0]


def _fwd(q_BTNH, k_BSKH, v_BSKH, bias_1NTS, mask_B1TS, scale, core, bias_grad, lengths, causal):
    if lengths is None:
        attend = functools.partial(core, bias_BNTS=combine_bias_and_mask(bias_1NTS, mask_B1TS, q_BTNH.dtype),
                                   scale=scale)
    else:  # the kernel's mask: what cuDNN's padding mask lets each query see
        mask_B1TS = lengths_mask(lengths, q_BTNH.shape[1], k_BSKH.shape[1], causal)
        attend = functools.partial(core, bias_BNTS=bias_1NTS.astype(q_BTNH.dtype), scale=scale, lengths=lengths,
                                   causal=causal)
    (out_BTNH, lse_BNT), core_vjp = jax.vjp(attend, q_BTNH, k_BSKH, v_BSKH)
    return out_BTNH, (core_vjp, q_BTNH, k_BSKH, v_BSKH, bias_1NTS, mask_B1TS, out_BTNH, lse_BNT)


def _bwd(scale, core, bias_grad, causal, res, do_BTNH):
    core_vjp, q_BTNH, k_BSKH, v_BSKH, bias_1NTS, mask_B1TS, out_BTNH, lse_BNT = res
    dq, dk, dv = core_vjp((do_BTNH, jnp.zeros_like(lse_BNT)))
    delta_BNT = jnp.einsum("btnh,btnh->bnt", do_BTNH.astype(jnp.float32), out_BTNH.astype(jnp.float32))
    # the probabilities again from the bias as the kernel read it (in the compute dtype), so that
    # they agree with its log-sum-exp; the gradient comes back in the bias's own dtype
    dbias_NTS = _over_mesh(bias_grad, scale)(q_BTNH, k_BSKH, v_BSKH, do_BTNH, lse_BNT, delta_BNT,
                                             bias_1NTS.astype(q_BTNH.dtype), mask_B1TS)
    return dq, dk, dv, dbias_NTS.reshape(bias_1NTS.shape).astype(bias_1NTS.dtype), None, None


attention_own_bias_grad.defvjp(_fwd, _bwd)


def _over_mesh(bias_grad: Callable, scale: float) -> Callable:
    """``bias_grad`` on each device's rows, summed over the batch's mesh axes (``shard_map`` under
    the mesh being traced with, its axes from the model's logical rules); as it is without one."""
    import flax.linen as nn

    mesh = jax.sharding.get_abstract_mesh()
    call = lambda *args: bias_grad(*args, scale)  # noqa: E731
    if mesh.empty or mesh.size == 1:
        return call

    def spec(*names):
        return P(*nn.logical_to_mesh_axes(names))

    act = spec("act_batch", "act_length", "act_heads", "act_kv")
    kv = spec("act_batch", "act_length", "act_kv_heads", "act_kv")
    rows = P(act[0], act[2], None)
    batch_axes = act[0] if isinstance(act[0], tuple) else (() if act[0] is None else (act[0],))
    heads = P(act[2], None, None)

    def local(*args):
        out = call(*args)
        return jax.lax.psum(out, batch_axes) if batch_axes else out

    return jax.shard_map(local, mesh=mesh, in_specs=(act, kv, kv, act, rows, rows, P(None, act[2], None, None),
                                                     P(act[0], None, None, None)),
                         out_specs=heads, check_vma=False)


def attention_bias_grad_applies(bias_1NTS: Optional[Array], t: int, s: int, h: int) -> bool:
    """Whether ``attention_own_bias_grad`` takes this call: a ``[1, N, T, S]`` bias and lengths and
    head size the kernel takes (else cuDNN computes the gradient: T5's 114-token decoder, whose
    ``[B, N, T, S]`` is small)."""
    return (bias_1NTS is not None and bias_1NTS.ndim == 4 and bias_1NTS.shape[0] == 1
            and bias_1NTS.shape[2:] == (t, s) and kernel_fits(t, s, h))
