"""Transformer building blocks shared by the three families.

Shape suffixes name the axes of every array in hot code:
  B batch, T query length, S key/value length, D d_model, N query heads, K kv heads,
  G query heads per kv head (N = K * G), H head dim, F mlp hidden, V vocab, L layers.

Every parameter is created with logical axis names (see ``partitioning.py`` for the table that
maps them onto the mesh); large activations are constrained with the ``act_*`` names.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite.config import ConfigError, ModelConfig

Array = jax.Array
NEG_INF = -1e9  # finite "minus infinity": a fully masked row gives a uniform, not NaN, softmax

# Logical names of activations; the parameter names ("embed", "heads", ...) live in the inits.
BLD = ("act_batch", "act_length", "act_embed")
BLNH = ("act_batch", "act_length", "act_heads", "act_kv")
BLKH = ("act_batch", "act_length", "act_kv_heads", "act_kv")
BLF = ("act_batch", "act_length", "act_mlp")
BLV = ("act_batch", "act_length", "act_vocab")


def jnp_dtype(name: str) -> Any:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def constrain(x: Array, names: tuple) -> Array:
    """Logical sharding constraint; a no-op outside a mesh / rules context."""
    return nn.with_logical_constraint(x, names)


def zeros_init(names: tuple):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


class Dense(nn.Module):
    """``x`` contracted over its last ``num_in`` axes with a kernel ``[*in, *features]``.

    The kernel is created at its full rank with logical ``kernel_axes`` (inputs first), a
    fan-in scaled truncated-normal init, and cast to the compute ``dtype`` at use.
    ``weights(in_shape)`` returns the kernel and bias without applying them (``fused_dense``
    concatenates several projections' weights into one matmul)."""

    features: tuple
    kernel_axes: tuple
    num_in: int = 1
    use_bias: bool = False
    scale: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora_rank: int = 0  # > 0: + x A B * lora_scale (LoRA; A [*in, r], B [r, *features] from zero)
    lora_scale: float = 1.0

    @nn.compact
    def weights(self, in_shape: tuple, with_lora: bool = False) -> tuple:
        """``(kernel [*in_shape, *features], bias [*features] or None)`` in the compute dtype;
        ``with_lora``: also LoRA's ``(A, B)`` (None without LoRA)."""
        n_in, n_out = self.num_in, len(self.features)
        init = nn.initializers.variance_scaling(self.scale, "fan_in", "truncated_normal",
                                                in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                            tuple(in_shape) + tuple(self.features), self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", zeros_init(self.kernel_axes[n_in:]), tuple(self.features),
                              self.param_dtype).astype(self.dtype)
        if not with_lora:
            return kernel.astype(self.dtype), bias
        lora = None
        if self.lora_rank:
            r = self.lora_rank
            init_a = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)),
                                                      out_axis=n_in)
            a = self.param("lora_a", nn.with_logical_partitioning(init_a, self.kernel_axes[:n_in] + ("lora",)),
                           tuple(in_shape) + (r,), self.param_dtype)
            b = self.param("lora_b", zeros_init(("lora",) + self.kernel_axes[n_in:]), (r,) + tuple(self.features),
                           self.param_dtype)
            lora = (a.astype(self.dtype), b.astype(self.dtype))
        return kernel.astype(self.dtype), bias, lora

    def __call__(self, x: Array, add_bias: bool = True):
        """``x`` contracted with the kernel, LoRA's term and the bias added; ``add_bias=False``:
        ``(the rest, the bias or None)``, the bias left for the caller to add (``mlp_activation``
        adds it inside what it recomputes). (Not a second method: flax would name the ops'
        scopes after it, and the profiles' names would change.)"""
        x = x.astype(self.dtype)
        kernel, bias, lora = self.weights(tuple(x.shape[-self.num_in:]), with_lora=True)
        y = contract(x, kernel, self.num_in)
        if lora is not None:
            with jax.named_scope("lora"):
                y = y + contract(contract(x, lora[0], self.num_in), lora[1], 1) * self.lora_scale
        if not add_bias:
            return y, bias
        return y if bias is None else y + bias


def contract(x: Array, kernel: Array, num_in: int) -> Array:
    """``x``'s last ``num_in`` axes contracted with ``kernel``'s first ``num_in``."""
    dims = (tuple(range(x.ndim - num_in, x.ndim)), tuple(range(num_in)))
    return jax.lax.dot_general(x, kernel, (dims, ((), ())))


def fused_dense(x: Array, weights: list[tuple[Array, Optional[Array]]], axis: int, name: str) -> Array:
    """Several projections of one input as one matmul: the kernels (from ``Dense.weights``, one
    input axis) concatenated along their output axis ``axis``, biases alike. Each block of the
    result along ``axis`` equals its projection alone. The parameters stay as they are (the same
    checkpoints and Hugging Face tables); only the compute changes: a copy of the weights per
    layer and step, against a larger GEMM in the forward pass and both backward ones (the input
    gradient sums the projections inside one GEMM). ``name`` scopes the ops (profiles)."""
    with jax.named_scope(name):
        kernel = jnp.concatenate([k for k, _ in weights], axis=axis)
        y = contract(x.astype(kernel.dtype), kernel, 1)
        if weights[0][1] is not None:
            y = y + jnp.concatenate([b for _, b in weights], axis=axis - 1)
    return y


def new_output_axis(weights: tuple[Array, Optional[Array]], axis: int) -> tuple[Array, Optional[Array]]:
    """``Dense.weights`` with a size-1 axis at the kernel's output axis ``axis`` (the bias's
    ``axis - 1``): the blocks ``fused_dense`` concatenates along it."""
    kernel, bias = weights
    return jnp.expand_dims(kernel, axis), None if bias is None else jnp.expand_dims(bias, axis - 1)


def dense(cfg: ModelConfig, features, kernel_axes: tuple, name: str, num_in: int = 1, scale: float = 1.0,
          use_bias: Optional[bool] = None) -> Dense:
    """A projection of the model's dtypes whose kernel axes are ``kernel_axes``."""
    features = features if isinstance(features, tuple) else (features,)
    lora = cfg.lora_rank if name in cfg.lora_names else 0
    return Dense(features, kernel_axes, num_in=num_in, use_bias=cfg.use_bias if use_bias is None else use_bias,
                 scale=scale, dtype=jnp_dtype(cfg.dtype), param_dtype=jnp_dtype(cfg.param_dtype), name=name,
                 lora_rank=lora, lora_scale=cfg.lora_alpha / max(cfg.lora_rank, 1))


# --------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32, over the last ``len(axes)`` axes (``axes``: the
    scale's logical names)."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axes: tuple = ("norm",)

    @nn.compact
    def __call__(self, x_BLD: Array) -> Array:
        n = len(self.axes)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), self.axes),
                           tuple(x_BLD.shape[-n:]), self.param_dtype)
        x = x_BLD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=tuple(range(-n, 0)), keepdims=True) + self.eps)
        return (x * scale.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    """(x - mean) / std * scale + bias, computed in float32."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: Array) -> Array:
        d = x_BLD.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (d,),
                           self.param_dtype)
        bias = self.param("bias", zeros_init(("norm",)), (d,), self.param_dtype)
        x = x_BLD.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (x * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    cls = RMSNorm if cfg.norm == "rmsnorm" else LayerNorm
    return cls(eps=cfg.norm_eps, dtype=jnp_dtype(cfg.dtype), param_dtype=jnp_dtype(cfg.param_dtype), name=name)


def head_norm(cfg: ModelConfig, x_BLNH: Array, name: str, heads: str = "heads") -> Array:
    """``model.qk_norm``: RMSNorm over each head's ``head_dim`` features, one scale shared by
    the heads (Qwen3, Gemma 3), or with ``qk_norm_scope=all_heads`` over all the token's heads, a
    scale ``[heads, head_dim]`` (OLMo 2, OLMoE; ``heads``: that axis's logical name); identity
    without it."""
    if not cfg.qk_norm:
        return x_BLNH
    axes = (heads, "kv") if cfg.qk_norm_scope == "all_heads" else ("norm",)
    return RMSNorm(eps=cfg.norm_eps, dtype=x_BLNH.dtype, param_dtype=jnp_dtype(cfg.param_dtype), axes=axes,
                   name=name)(x_BLNH)


# ---------------------------------------------------------------------- embeddings


class Embed(nn.Module):
    """Token (or learned position) table ``[num, D]``; ``attend`` gives tied output logits."""

    num_embeddings: int
    features: int
    axes: tuple = ("vocab", "embed")
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    stddev: float = 0.02

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.stddev), self.axes),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids_BL: Array) -> Array:
        # Gather from a replicated copy: a lookup into a vocab- or fsdp-sharded table would
        # otherwise make XLA replicate it anyway, only less predictably.
        table = constrain(self.embedding, (None, None))
        return jnp.take(table, ids_BL, axis=0).astype(self.dtype)

    def attend(self, x_BLD: Array) -> Array:
        return jnp.einsum("bld,vd->blv", x_BLD, self.embedding.astype(self.dtype))


# ------------------------------------------------------------ position encodings


def rope_frequencies(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """RoPE's angular frequencies, float32 ``[H / 2]``: ``theta ** (-2i / H)`` with the config's
    scaling. linear: all divided by ``rope_scaling``. llama3: a frequency whose wavelength
    ``2 pi / f`` fits ``rope_original_length`` more than ``rope_high_freq_factor`` times is kept,
    fewer than ``rope_low_freq_factor`` times is divided by ``rope_scaling``, and in between the
    two are mixed in proportion to where that count lies between the factors. ``local``: the
    windowed layers' with ``model.rope_local_theta`` (unscaled)."""
    h = cfg.dim_per_head
    if local and cfg.rope_local_theta:
        return (1.0 / cfg.rope_local_theta ** (np.arange(0, h, 2, dtype=np.float64) / h)).astype(np.float32)
    freq = 1.0 / cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h)
    if cfg.rope_scaling_type == "linear":
        return (freq / cfg.rope_scaling).astype(np.float32)
    fits = cfg.rope_original_length * freq / (2 * np.pi)  # wavelengths in the original context
    kept = np.clip((fits - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor), 0, 1)
    return (kept * freq + (1 - kept) * freq / cfg.rope_scaling).astype(np.float32)


def rope(x_BLNH: Array, positions_BL: Array, freq_H2: np.ndarray) -> Array:
    """Rotary embedding, "rotate half" layout (the first and second half of the head dim form
    the pairs, as in LLaMA/GPT-NeoX). Angles ``position x freq`` in float32 (``rope_frequencies``)."""
    h = x_BLNH.shape[-1]
    angles_BLH2 = positions_BL.astype(jnp.float32)[..., None] * jnp.asarray(freq_H2)
    sin, cos = jnp.sin(angles_BLH2)[:, :, None, :], jnp.cos(angles_BLH2)[:, :, None, :]
    x = x_BLNH.astype(jnp.float32)
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLNH.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi head slopes: a geometric sequence 2^(-8/n), ...; for a head count that is not a
    power of two, the slopes of the next power below plus every other slope of the one above."""

    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return np.asarray(power_of_two(num_heads), np.float32)
    below = 2 ** math.floor(math.log2(num_heads))
    extra = power_of_two(2 * below)[0::2][: num_heads - below]
    return np.asarray(power_of_two(below) + extra, np.float32)


def alibi_bias(num_heads: int, q_idx_T: Array, k_idx_S: Array) -> Array:
    """``[1, N, T, S]`` linear distance penalty -slope * |q - k|."""
    dist_TS = jnp.abs(q_idx_T[:, None] - k_idx_S[None, :]).astype(jnp.float32)
    return -jnp.asarray(alibi_slopes(num_heads))[None, :, None, None] * dist_TS[None, None]


def relative_bucket(relative_TS: Array, bidirectional: bool, num_buckets: int, max_distance: int) -> Array:
    """T5's bucketing of ``k - q``: exact buckets for small distances, logarithmic ones up to
    ``max_distance``; bidirectional splits the buckets between the two signs."""
    ret = jnp.zeros_like(relative_TS)
    n = -relative_TS
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    safe_n = jnp.maximum(n, 1).astype(jnp.float32)
    val_if_large = max_exact + (
        jnp.log(safe_n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(jnp.int32)
    val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
    return ret + jnp.where(is_small, n, val_if_large)


class RelativePositionBias(nn.Module):
    """T5 relative attention bias, computed once per stack and shared by its layers."""

    num_heads: int
    num_buckets: int
    max_distance: int
    bidirectional: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, q_idx_T: Array, k_idx_S: Array) -> Array:
        """Returns ``[1, N, T, S]``. Indices are slots in the row: within one document (the only
        pairs attention lets through) their difference equals the difference of positions."""
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.1), ("relpos_buckets", "heads")),
            (self.num_buckets, self.num_heads),
            self.param_dtype,
        )
        buckets_TS = relative_bucket(k_idx_S[None, :] - q_idx_T[:, None], self.bidirectional,
                                     self.num_buckets, self.max_distance)
        bias_TSN = jnp.take(table, buckets_TS, axis=0)
        return jnp.transpose(bias_TSN, (2, 0, 1))[None].astype(jnp.float32)


# --------------------------------------------------------------------------- masks


def attention_mask(q_seg_BT: Array, k_seg_BS: Array, *, causal: bool, q_idx_T: Optional[Array] = None,
                   k_idx_S: Optional[Array] = None, q_prefix_BT: Optional[Array] = None,
                   k_prefix_BS: Optional[Array] = None, window: int = 0) -> Array:
    """``[B, 1, T, S]`` bool: a query sees a key of the same segment (document masking; segment 0
    is padding) and, if causal, not from its future, except that prefix tokens see each other.
    ``window`` > 0 (causal): nor keys ``window`` or more slots back (a document's tokens are
    contiguous, so slots count positions within it)."""
    mask = q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
    if causal:
        back_TS = q_idx_T[:, None] - k_idx_S[None, :]
        allowed_TS = (back_TS >= 0) & (back_TS < window) if window else back_TS >= 0
        allowed_TS = allowed_TS[None]
        if q_prefix_BT is not None:
            allowed_TS = allowed_TS | (q_prefix_BT[:, :, None] & k_prefix_BS[:, None, :])
        mask = mask & allowed_TS
    return mask[:, None]


def segment_lengths_and_starts(segment_ids_BT: Array, max_segments: int) -> tuple[Array, Array]:
    """``([B, M] lengths, [B, M + 1] starts)`` of segments 1..M of each row (contiguous, padding
    0 last), -1 where a row has fewer: the packed layout of jax's cuDNN attention."""
    b, t = segment_ids_BT.shape
    rows = jnp.repeat(jnp.arange(b), t)
    ids = segment_ids_BT.reshape(-1).astype(jnp.int32)
    slot = ids - 1  # segment k -> slot k - 1; padding (0) -> -1, dropped below
    valid = (slot >= 0) & (slot < max_segments)
    where = (rows, jnp.where(valid, slot, max_segments))  # out-of-range writes land in a spare column
    lengths = jnp.zeros((b, max_segments + 1), jnp.int32).at[where].add(valid.astype(jnp.int32))[:, :-1]
    pos = jnp.tile(jnp.arange(t, dtype=jnp.int32), b)
    starts = jnp.full((b, max_segments + 1), t, jnp.int32).at[where].min(jnp.where(valid, pos, t))[:, :-1]
    starts = jnp.where(lengths > 0, starts, -1)
    lengths = jnp.where(lengths > 0, lengths, -1)
    return lengths, jnp.concatenate([starts, jnp.full((b, 1), -1, jnp.int32)], axis=1)


def row_lengths(segment_ids_BT: Array) -> Array:
    """int32 ``[B]``: the tokens of each row's document (rows of one document from position 0,
    padding after: ``model.max_segments`` 1), at least 1 so that an all-padding row still
    attends somewhere (to its first slot; its outputs are never scored)."""
    return jnp.maximum(jnp.sum(segment_ids_BT > 0, axis=1), 1).astype(jnp.int32)


def segments_from_lengths_and_starts(lengths_BM: Array, starts_BM1: Array, length: int) -> Array:
    """The inverse of ``segment_lengths_and_starts``: int32 ``[B, length]`` segment ids."""
    slot_1_1T = jnp.arange(length)[None, None, :]
    inside_BMT = (slot_1_1T >= starts_BM1[:, :-1, None]) & (slot_1_1T < starts_BM1[:, :-1, None] + lengths_BM[:, :, None])
    return jnp.sum(inside_BMT * jnp.arange(1, lengths_BM.shape[1] + 1)[None, :, None], axis=1).astype(jnp.int32)


def cross_segments(q_lengths_BM: Array, q_starts_BM1: Array, kv_lengths_BM: Array, kv_starts_BM1: Array) -> tuple:
    """Packed segments for attention from one row's documents (queries) to another's (keys), the
    k-th document of each side being the same one (T5's encoder and decoder rows). A slot empty on
    either side is dropped on both, so that cuDNN, which closes up the -1 gaps of each side
    separately, still pairs the k-th query segment with the k-th key segment."""
    both = (q_lengths_BM > 0) & (kv_lengths_BM > 0)
    keep = lambda a_BM: jnp.where(both, a_BM, -1)
    both_BM1 = jnp.concatenate([both, jnp.zeros_like(both[:, :1])], axis=1)
    return (keep(q_lengths_BM), jnp.where(both_BM1, q_starts_BM1, -1),
            keep(kv_lengths_BM), jnp.where(both_BM1, kv_starts_BM1, -1))


def _jax_version() -> tuple[int, int]:
    return tuple(int(part) for part in jax.__version__.split(".")[:2])


def cudnn_packed_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, bias_1NTS: Optional[Array],
                           segments: tuple, scale: float, causal: bool, window: int = 0) -> Array:
    """jax's cuDNN attention on packed rows: the k-th query segment attends only to the k-th key
    segment, causally when ``causal``, with no ``[B, 1, T, S]`` mask turned into a bias.
    ``segments``: ``(q_lengths [B, M], q_starts [B, M + 1], kv_lengths, kv_starts)`` as
    ``segment_lengths_and_starts`` makes them, M >= 2 (with M = 1 cuDNN ignores the starts);
    ``window`` > 0: causal sliding-window attention of that width, within each segment. A
    private jax function (``jax._src.cudnn.fused_attention_stablehlo``);
    GPU only."""
    q_lengths_BM, q_starts_BM1, kv_lengths_BM, kv_starts_BM1 = segments
    try:
        from jax._src.cudnn.fused_attention_stablehlo import MaskType
        from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

        n, k = q_BTNH.shape[2], k_BSKH.shape[2]
        if k != n and q_lengths_BM.shape[1] > 1 and _jax_version() < (0, 11):
            # jax < 0.11 scales packed key/value offsets by the query heads (fixed in 0.11): with
            # GQA it would read other rows' keys, so it gets as many key/value heads as queries.
            k_BSKH, v_BSKH = (jnp.repeat(a, n // k, axis=2) for a in (k_BSKH, v_BSKH))
        return cudnn_attention(q_BTNH, k_BSKH, v_BSKH, bias=bias_1NTS, q_seqlen=q_lengths_BM, kv_seqlen=kv_lengths_BM,
                               q_offsets=q_starts_BM1, kv_offsets=kv_starts_BM1, scale=scale,
                               mask_type=MaskType.PADDING_CAUSAL if causal else MaskType.PADDING,
                               sliding_window_length=window or None)
    except (ImportError, ValueError, NotImplementedError, RuntimeError) as e:
        raise ConfigError(f"model.attention=cudnn_packed needs jax's cuDNN attention on an NVIDIA GPU with bf16/fp16 "
                         f"compute ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); use "
                         "model.attention=auto, cudnn or xla") from e


PALLAS_INTERPRET = False  # the tests run the Pallas kernels in Pallas' interpreter on a CPU
# jax.nn.dot_product_attention's implementation where cuDNN runs, and the compute dtypes it takes:
# the tests put jax's XLA reference behind the same calls (and float32) to check what is passed
CUDNN_IMPL = "cudnn"
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def pallas_fits(t: int, s: int, h: int) -> bool:
    """Lengths and head size jax's Pallas attention takes: self-attention, a power-of-two head size
    of at least 16, rows in blocks of 128 (or one power-of-two block)."""
    block = min(128, t)
    return t == s and t % block == 0 and block & (block - 1) == 0 and h >= 16 and h & (h - 1) == 0


def pallas_segment_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, segment_ids_BT: Array,
                             scale: float, causal: bool, block_sizes=None, interpret: Optional[bool] = None) -> Array:
    """jax's Pallas (Triton) flash attention (``jax.experimental.pallas.ops.gpu.attention.mha``,
    forward and backward kernels): documents from ``segment_ids_BT`` inside the kernel, so nothing
    grows with the documents a row holds and there is no cuDNN graph to build per call. Padding
    (segment 0) becomes one segment a token, attending to itself only. GQA: k and v repeated to
    the query heads. ``block_sizes``: the library's ``BlockSizes`` (default its own);
    ``interpret``: Pallas' interpreter (default ``PALLAS_INTERPRET``)."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    g = q_BTNH.shape[2] // k_BSKH.shape[2]
    if g > 1:
        k_BSKH, v_BSKH = (jnp.repeat(a, g, axis=2) for a in (k_BSKH, v_BSKH))
    ids_BT = jnp.where(segment_ids_BT > 0, segment_ids_BT, -1 - jnp.arange(segment_ids_BT.shape[1])[None, :])
    return pallas_attention.mha(q_BTNH, k_BSKH, v_BSKH, ids_BT.astype(jnp.int32), sm_scale=scale, causal=causal,
                                block_sizes=block_sizes or pallas_attention.BlockSizes.get_default(),
                                interpret=PALLAS_INTERPRET if interpret is None else interpret)


# ----------------------------------------------------------------------- attention


def on_gpu() -> bool:
    """Whether arrays live on a GPU (where ``attention=auto`` picks cuDNN)."""
    return jax.default_backend() == "gpu"


def dot_product_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_B1TS: Array,
                          bias_1NTS: Optional[Array], scale: float, implementation: str,
                          segments: Optional[tuple] = None, causal: bool = False,
                          dropout: Optional[tuple[float, Array]] = None, window: int = 0,
                          softcap: float = 0.0, bias_grad: str = "cudnn",
                          segment_ids_BT: Optional[Array] = None, lengths: Optional[tuple] = None) -> Array:
    """Grouped-query attention. Scores and softmax in float32; GQA without repeating k/v.

    ``implementation``: ``xla`` (the einsums below), ``cudnn`` (flash attention through
    ``jax.nn.dot_product_attention``: bf16/fp16 on a GPU, mask and bias passed through),
    ``cudnn_packed`` (``cudnn_packed_attention`` when its ``segments`` are given, else as
    ``auto``) or ``auto`` (cuDNN where it applies and accepts the shapes, the packed layout when
    ``segments`` are given; else XLA). ``dropout``: ``(rate, key)`` drops attention
    probabilities (BERT's ``attention_probs_dropout_prob``), always on the XLA path: jax's cuDNN
    call takes a dropout rate only with one fixed seed, the same mask every step. ``window``
    (``model.sliding_window``) is already in the mask; the packed cuDNN kernel, which has no mask,
    is told it (and skips the blocks outside it). ``softcap`` > 0: scores become
    ``softcap * tanh(scores / softcap)`` (Gemma 2), on the XLA path. ``bias_grad``
    (``model.attention_bias_grad``): ``pallas`` gives a ``[1, N, T, S]`` bias on cuDNN's masked
    path its gradient from ``bias_grad.attention_own_bias_grad`` instead of cuDNN's.
    ``pallas``: ``pallas_segment_attention`` over ``segment_ids_BT`` (training's self-attention
    without a bias, window, dropout or soft cap, on a GPU or in Pallas' interpreter), else as
    ``auto``. ``lengths``: ``(q_lengths [B], kv_lengths [B])`` of rows holding one document from
    their first slot (``row_lengths``; ``model.max_segments`` 1): under ``auto`` or
    ``cudnn_packed`` cuDNN gets them as its padding mask instead of the mask (which then goes
    unused), and a ``[1, N, T, S]`` bias as it is, its gradient ``[1, N, T, S]`` from the kernel
    (with ``bias_grad`` ``pallas``: from ``bias_grad.attention_own_bias_grad``, cuDNN computing
    none)."""
    # a decoding step's single query: XLA's einsums read the cache once as cuDNN's flash kernel does
    # (H100, 2026-11-23, llama_1b at batch 1 / 32: 1.99 / 2.87 ms a token against 2.02 / 2.84 on
    # cuDNN) and compile in half the time (18-23 s against 42 with the 16 layers unrolled: each
    # cuDNN call is built on its own when the program first runs)
    cudnn_fits = (on_gpu() and q_BTNH.dtype in CUDNN_DTYPES and dropout is None and not softcap
                  and q_BTNH.shape[1] > 1)
    if implementation == "pallas":
        if ((on_gpu() or PALLAS_INTERPRET) and segment_ids_BT is not None and bias_1NTS is None and dropout is None
                and not softcap and not window and pallas_fits(q_BTNH.shape[1], k_BSKH.shape[1], q_BTNH.shape[3])):
            return pallas_segment_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, scale, causal)
        implementation = "auto"
    # cuDNN reads the bias in the compute dtype (a float32 one would be twice the traffic, and
    # with a mask jax would broadcast it to [B, N, T, S] in float32)
    cudnn_bias = None if bias_1NTS is None else bias_1NTS.astype(q_BTNH.dtype)
    packed_fits = implementation == "cudnn_packed" or (implementation == "auto" and cudnn_fits)
    if segments is not None and packed_fits:
        try:
            return cudnn_packed_attention(q_BTNH, k_BSKH, v_BSKH, cudnn_bias, segments, scale, causal, window)
        except ConfigError:
            if implementation == "cudnn_packed":
                raise
    lengths = lengths if packed_fits else None  # one document a row: cuDNN's padding mask, not the mask
    if implementation == "cudnn_packed" and lengths is None:
        implementation = "auto"  # decoding, prefix LM: the mask, on cuDNN where it runs
    use_cudnn = implementation in ("cudnn", "cudnn_packed") or (implementation == "auto" and cudnn_fits)
    if use_cudnn:
        try:
            from t5x_lite.models.bias_grad import attention_bias_grad_applies, attention_own_bias_grad

            if (bias_grad == "pallas" and not (lengths is not None and window)  # (a mask holds the window)
                    and attention_bias_grad_applies(bias_1NTS, q_BTNH.shape[1], k_BSKH.shape[1], q_BTNH.shape[3])):
                return attention_own_bias_grad(q_BTNH, k_BSKH, v_BSKH, bias_1NTS, mask_B1TS, scale,
                                               lengths=lengths, causal=causal)
            rows = dict(mask=mask_B1TS) if lengths is None else dict(
                query_seq_lengths=lengths[0], key_value_seq_lengths=lengths[1], is_causal=causal,
                local_window_size=(window - 1, 0) if window else None)
            return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, bias=cudnn_bias, scale=scale,
                                                implementation=CUDNN_IMPL, **rows)
        except (ValueError, NotImplementedError, RuntimeError) as e:
            if implementation == "cudnn_packed":
                raise ConfigError(f"model.attention=cudnn_packed with model.max_segments=1 needs jax's cuDNN "
                                  f"attention on an NVIDIA GPU with bf16/fp16 compute ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); use model.attention=auto") from e
            if implementation == "cudnn":
                raise
    b, t, n, h = q_BTNH.shape
    k = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h)
    scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
    if softcap:
        scores_BKGTS = softcap * jnp.tanh(scores_BKGTS / softcap)
    if bias_1NTS is not None:
        scores_BKGTS = scores_BKGTS + bias_1NTS.reshape(bias_1NTS.shape[0], k, n // k, *bias_1NTS.shape[2:])
    scores_BKGTS = jnp.where(mask_B1TS[:, :, None], scores_BKGTS, NEG_INF)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1)
    if dropout is not None:
        rate, key = dropout
        keep = jax.random.bernoulli(key, 1.0 - rate, probs_BKGTS.shape)
        probs_BKGTS = jnp.where(keep, probs_BKGTS / (1.0 - rate), 0.0)
    probs_BKGTS = probs_BKGTS.astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(b, t, n, h)


def is_local_layer(cfg: ModelConfig, layer):
    """Whether ``layer`` (an int or a traced index) is windowed under ``model.sliding_window_pattern``
    P: all but every P-th layer (those at P - 1, 2P - 1, ...)."""
    return (layer + 1) % cfg.sliding_window_pattern != 0


class Attention(nn.Module):
    """Self- or cross-attention with GQA/MQA, optional RoPE, additive bias, KV cache.

    Decoding passes ``cache``, the whole stack's ``{"k", "v"}: [L, B, S, K, H]``, and this
    layer's index ``layer``. Self-attention writes this call's keys/values into its layer at
    slots ``cache_index + [0, T)`` (an in-place update of the scan carry: each step moves only
    the new tokens' keys/values plus one read of the layer's cache) and attends over the layer's
    slots. Cross-attention projects ``kv_BSD`` into its layer when given (the first decode
    call) and otherwise reads the keys/values stored there. Returns ``(out, cache)``.
    """

    cfg: ModelConfig
    cross: bool = False
    causal: bool = False  # what the mask says, for kernels that take a mask type instead
    deterministic: bool = True  # False (training): model.attention_dropout applies

    @nn.compact
    def __call__(self, x_BTD: Array, *, mask_B1TS: Array, bias_1NTS: Optional[Array] = None,
                 positions_BT: Optional[Array] = None, kv_BSD: Optional[Array] = None,
                 cache: Optional[dict] = None, layer=None, cache_index: Optional[Array] = None,
                 segments: Optional[tuple] = None, local_mask_B1TS: Optional[Array] = None,
                 segment_ids_BT: Optional[Array] = None, lengths: Optional[tuple] = None):
        """``local_mask_B1TS``: with ``model.sliding_window_pattern``, the windowed layers' mask
        (``mask_B1TS`` then being the global layers'); ``layer`` (an int, or the scan's traced
        index) says which this layer is."""
        cfg = self.cfg
        n, k, h = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        # Without 1/sqrt(H) in the scores (T5), the same scale moves into the query init.
        q_scale = 1.0 if cfg.scale_attention else 1.0 / h
        bias = cfg.use_bias if cfg.qkv_bias is None else cfg.qkv_bias
        q_proj = dense(cfg, (n, h), ("embed", "heads", "kv"), "query", scale=q_scale, use_bias=bias)
        k_proj, v_proj = (dense(cfg, (k, h), ("embed", "kv_heads", "kv"), name, use_bias=bias)
                          for name in ("key", "value"))

        # a scanned stack's cache [L, B, S, K, H] holds every layer (read and written at ``layer``); a
        # layer's own cache [B, S, K, H] (layers as straight code, ``init_cache``) only this one
        stacked = cache is not None and cache["k"].ndim == 5
        layer_of = (lambda c: jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False)) if stacked else (lambda c: c)
        if self.cross and kv_BSD is None:  # decoding after the first call: the stored encoder k/v
            q_BTNH = head_norm(cfg, constrain(q_proj(x_BTD), BLNH), "query_norm")
            k_BSKH, v_BSKH = (layer_of(cache[name]).astype(q_BTNH.dtype) for name in ("k", "v"))
        else:
            if cfg.fused_qkv and not self.cross:
                q_BTNH, k_BSKH, v_BSKH = self._fused_qkv(x_BTD, q_proj, k_proj, v_proj)
            elif cfg.fused_qkv:  # cross-attention: q from the decoder, k and v of the encoder output fused
                q_BTNH = constrain(q_proj(x_BTD), BLNH)
                _, k_BSKH, v_BSKH = self._fused_kv(kv_BSD, [], k_proj, v_proj)
            else:
                src_BSD = kv_BSD if self.cross else x_BTD
                q_BTNH = constrain(q_proj(x_BTD), BLNH)
                k_BSKH, v_BSKH = (constrain(proj(src_BSD), BLKH) for proj in (k_proj, v_proj))
            q_BTNH, k_BSKH = head_norm(cfg, q_BTNH, "query_norm"), head_norm(cfg, k_BSKH, "key_norm", "kv_heads")
            if cfg.position == "rope" and not self.cross:
                freq_H2 = rope_frequencies(cfg)
                if local_mask_B1TS is not None and cfg.rope_local_theta:
                    freq_H2 = jnp.where(is_local_layer(cfg, layer), rope_frequencies(cfg, local=True), freq_H2)
                q_BTNH, k_BSKH = rope(q_BTNH, positions_BT, freq_H2), rope(k_BSKH, positions_BT, freq_H2)
            if cache is not None:
                start = (0, 0 if self.cross else cache_index, 0, 0)
                start = (layer, *start) if stacked else start
                cache = {name: jax.lax.dynamic_update_slice(
                    cache[name], (new[None] if stacked else new).astype(cache[name].dtype), start)
                    for name, new in (("k", k_BSKH), ("v", v_BSKH))}
                if not self.cross:  # attend over every filled slot of this layer
                    k_BSKH, v_BSKH = (layer_of(cache[name]).astype(q_BTNH.dtype) for name in ("k", "v"))

        scale = 1.0 / math.sqrt(cfg.attention_scale_dim or h) if cfg.scale_attention else 1.0
        dropout = None
        if cfg.attention_dropout > 0 and not self.deterministic:
            dropout = (cfg.attention_dropout, self.make_rng("dropout"))
        attend = functools.partial(dot_product_attention, q_BTNH, k_BSKH, v_BSKH, bias_1NTS=bias_1NTS, scale=scale,
                                   implementation=cfg.attention, segments=segments, causal=self.causal,
                                   dropout=dropout, softcap=cfg.attn_logit_softcap,
                                   bias_grad=cfg.attention_bias_grad, segment_ids_BT=segment_ids_BT, lengths=lengths)
        if local_mask_B1TS is None:
            out_BTNH = attend(mask_B1TS, window=cfg.sliding_window if self.causal else 0)
        else:  # one kernel or the other (cuDNN's packed one takes the window as a constant)
            local = lambda: attend(local_mask_B1TS, window=cfg.sliding_window)
            glob = lambda: attend(mask_B1TS, window=0)
            kind = is_local_layer(cfg, layer)
            out_BTNH = (local if kind else glob)() if isinstance(kind, bool) else jax.lax.cond(kind, local, glob)
        out_BTNH = constrain(out_BTNH, BLNH)
        out_BTD = dense(cfg, cfg.d_model, ("heads", "kv", "embed"), "out", num_in=2)(out_BTNH)
        return constrain(out_BTD, BLD), cache

    def _fused_qkv(self, x_BTD: Array, q_proj: Dense, k_proj: Dense, v_proj: Dense) -> tuple[Array, Array, Array]:
        """q, k, v of self-attention from one matmul (``model.fused_qkv``). The kernel is laid out
        per kv head, ``[D, K, G + 2, H]`` (its G query heads, then its key and value), so that
        splitting heads over ``tensor`` keeps each group's q, k and v on one device."""
        cfg = self.cfg
        b, t, d = x_BTD.shape
        k, h = cfg.kv_heads, cfg.dim_per_head
        g = cfg.num_heads // k
        wq, bq = q_proj.weights((d,))
        q_part = (wq.reshape(d, k, g, h), None if bq is None else bq.reshape(k, g, h))
        y_BTKCH, k_BSKH, v_BSKH = self._fused_kv(x_BTD, [q_part], k_proj, v_proj)  # C = G + 2
        return constrain(y_BTKCH[:, :, :, :g].reshape(b, t, k * g, h), BLNH), k_BSKH, v_BSKH

    @staticmethod
    def _fused_kv(src_BSD: Array, before: list, k_proj: Dense, v_proj: Dense):
        """``[*before, k, v]`` as one matmul over a ``[D, K, C, H]`` kernel (per kv head: the
        blocks of ``before``, its key, its value). Returns ``(the result [B, S, K, C, H], k, v)``."""
        d = src_BSD.shape[-1]
        parts = [*before, *(new_output_axis(proj.weights((d,)), 2) for proj in (k_proj, v_proj))]
        y_BSKCH = fused_dense(src_BSD, parts, axis=2, name="qkv" if before else "kv")
        y_BSKCH = constrain(y_BSKCH, ("act_batch", "act_length", "act_kv_heads", None, "act_kv"))
        return y_BSKCH, constrain(y_BSKCH[:, :, :, -2], BLKH), constrain(y_BSKCH[:, :, :, -1], BLKH)


# ----------------------------------------------------------------------------- MLP


def _activation(mlp: str, gelu_approximate: bool):
    if mlp == "swiglu":
        return nn.silu
    if mlp in ("geglu", "gelu"):
        return functools.partial(nn.gelu, approximate=gelu_approximate)
    return nn.relu


def activation(cfg: ModelConfig):
    return _activation(cfg.mlp, cfg.gelu_approximate)


def _biased(x: Array, bias: Optional[Array]) -> Array:
    return x if bias is None else x + bias


@functools.lru_cache(maxsize=None)
def _mlp_activation(mlp: str, gelu_approximate: bool, gated: bool, recompute: bool):
    act = _activation(mlp, gelu_approximate)
    if gated:
        def fn(gate, up, gate_bias=None, up_bias=None):
            return act(_biased(gate, gate_bias)) * _biased(up, up_bias)
    else:
        def fn(h, bias=None):
            return act(_biased(h, bias))
    # recompute: the backward pass keeps the inputs only and runs act again behind an optimization
    # barrier (which stops XLA from merging it with the forward pass's act, i.e. from keeping that)
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable) if recompute else fn


def mlp_activation(cfg: ModelConfig):
    """The MLP's activation: ``(gate, up[, gate_bias, up_bias]) -> act(gate + gate_bias) * (up +
    up_bias)`` for the gated MLPs (swiglu, geglu), ``(h[, bias]) -> act(h + bias)`` for the
    others. Where ``recomputes_activation`` says so, GELU and SiLU are differentiated by computing
    them again in the backward pass's kernel, which reads their input anyway: autodiff keeps a
    further ``[B, L, F]`` tensor for them (GELU's tanh, SiLU's sigmoid), written by the forward
    pass and read by the backward one, and a scanned stack keeps a stack of them (t5_base compiled
    for an H100: 3.2 GB a step less moved as straight code, 30 GB scanned). The biases are added
    inside too, so the biased input is not kept either (bert_base: 0.2 GB a layer less written).
    The values and gradients are autodiff's."""
    return _mlp_activation(cfg.mlp, cfg.gelu_approximate, cfg.gated_mlp, recomputes_activation(cfg))


def recomputes_activation(cfg: ModelConfig) -> bool:
    """Whether ``mlp_activation`` computes the activation again in the backward pass itself:
    without remat, and under a remat policy where the layers run as straight code
    (``scan_unroll``), whose recomputation XLA would merge with the forward pass's (the stack's
    remat lets it: a scan's loop keeps the two apart). Not in a scan's loop under a policy: its
    backward pass computes the activation again already, and the barrier would cost a copy of the
    loop's slices of its inputs (llama_1b compiled for an H100: +3.9 ms a step)."""
    straight = cfg.scan_layers and cfg.scan_unroll >= cfg.num_layers
    return cfg.mlp != "relu" and (cfg.remat == "none" or straight)


class Mlp(nn.Module):
    """Plain (act(x W_i) W_o) or gated (act(x W_0) * (x W_1) W_o) feed-forward block."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD: Array) -> Array:
        cfg = self.cfg
        if cfg.gated_mlp:
            gate, up = (dense(cfg, cfg.d_ff, ("embed", "mlp"), name) for name in ("wi_0", "wi_1"))
            if cfg.fused_mlp:  # [D, 2, F]: one matmul; splitting F over ``tensor`` keeps the pairs together
                parts = [new_output_axis(proj.weights(x_BLD.shape[-1:]), 1) for proj in (gate, up)]
                y_BL2F = fused_dense(x_BLD, parts, axis=1, name="wi_fused")
                y_BL2F = constrain(y_BL2F, ("act_batch", "act_length", None, "act_mlp"))
                inputs = (y_BL2F[:, :, 0], y_BL2F[:, :, 1])
            else:  # gate, up, their biases (if any): added inside the activation
                (gate_BLF, gate_b), (up_BLF, up_b) = gate(x_BLD, add_bias=False), up(x_BLD, add_bias=False)
                inputs = (gate_BLF, up_BLF, gate_b, up_b)
        else:
            inputs = dense(cfg, cfg.d_ff, ("embed", "mlp"), "wi")(x_BLD, add_bias=False)
        h_BLF = constrain(mlp_activation(cfg)(*inputs), BLF)
        return constrain(dense(cfg, cfg.d_model, ("mlp", "embed"), "wo")(h_BLF), BLD)
