"""Layer stacks and the three model families.

- ``EncoderModel``      (family ``encoder``): bidirectional stack + masked-LM head (BERT).
- ``DecoderModel``      (family ``decoder``): causal stack + LM head; prefix LM via ``prefix_mask``.
- ``EncoderDecoderModel`` (family ``encoder_decoder``): T5 encoder, decoder with cross-attention.

Inputs of every family are named like the keys of a training batch (``input_ids``,
``segment_ids``, ``positions``, ...): ``segment_ids`` 1..k mark packed documents and 0 padding;
``positions`` restart at 0 in every document. Decoding passes an explicit cache pytree (see
``init_cache``) and gets the updated one back.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_lite.config import ModelConfig
from t5x_lite.models.layers import (
    BLD,
    BLV,
    Attention,
    Embed,
    Mlp,
    RelativePositionBias,
    alibi_bias,
    attention_mask,
    constrain,
    cross_segments,
    dense,
    jnp_dtype,
    make_norm,
    row_lengths,
    segment_lengths_and_starts,
    activation,
)
from t5x_lite.models.moe import EXPERT_HIDDEN, EXPERT_INPUTS, MoeMlp

Array = jax.Array


_EXPERT_NAMES = jax.checkpoint_policies.save_only_these_names(EXPERT_INPUTS, EXPERT_HIDDEN)


def save_dots_and_attention(prim, *avals, **params) -> bool:
    """remat ``minimal``: keep the outputs of weight matmuls (dots without batch dimensions), of
    cuDNN's (or the Pallas) attention forward kernel (its output and softmax statistic; without them
    the backward pass of the output projection runs the attention forward again) and of the experts' input
    projections and dispatch (einsums batched over the experts, named in ``moe``). XLA's
    attention (einsums with batch dimensions) is recomputed as before."""
    return (prim.name.startswith("dot_product_attention_fwd")  # jax's cuDNN primitives (0.10, 0.11)
            # attention=pallas: jax's Pallas attention (a custom VJP whose forward rule calls it again for
            # its output and statistic: what is kept is that inner call's outputs)
            or prim.name == "custom_vjp_call"
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params)
            or _EXPERT_NAMES(prim, *avals, **params))


REMAT_POLICIES = {
    "minimal": save_dots_and_attention,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class Block(nn.Module):
    """One transformer layer: self-attention, optional cross-attention, MLP; pre- or post-norm.

    The carry is ``(x, cache)``: the residual stream and, when decoding, the whole stack's cache
    (``{"self": {"k", "v"}, "cross": ...}``, each ``[L, B, S, K, H]``), which this layer updates
    at index ``layer``. ``ctx`` holds what every layer shares (masks, bias, positions, encoder
    output, cache index) and is broadcast by ``nn.scan``.
    """

    cfg: ModelConfig
    cross: bool = False
    deterministic: bool = True
    causal: bool = False  # the self-attention mask type cuDNN's packed layout is told

    @nn.compact
    def __call__(self, carry: tuple, ctx: dict, layer):
        x_BLD, cache = carry
        cfg = self.cfg
        pre, sandwich = cfg.norm_position in ("pre", "sandwich"), cfg.norm_position == "sandwich"
        output = cfg.norm_position == "output"
        drop = lambda y: nn.Dropout(cfg.dropout, broadcast_dims=())(y, deterministic=self.deterministic)

        def sublayer(x, name, fn):
            norm = make_norm(cfg, f"{name}_norm")
            if output:  # the sublayer's output normed, then the residual add (OLMo 2)
                y, extra = fn(x)
                return x + drop(norm(y)), extra
            if pre:
                y, extra = fn(norm(x))
                if sandwich:  # the sublayer's output normed too, before the residual add
                    y = make_norm(cfg, f"{name}_post_norm")(y)
                return x + drop(y), extra
            y, extra = fn(x)
            return norm(x + drop(y)), extra

        def attend(name, cross, mask, **kw):
            layer_cache = None if cache is None else cache[name]
            return lambda h: Attention(cfg, cross=cross, causal=self.causal and not cross, deterministic=self.deterministic,
                                       name=f"{name}_attention")(
                h, mask_B1TS=mask, cache=layer_cache, layer=layer, cache_index=ctx["cache_index"], **kw)

        x_BLD, self_kv = sublayer(x_BLD, "self_attention", attend("self", False, ctx["mask"], bias_1NTS=ctx["bias"],
                                                                   positions_BT=ctx["positions"],
                                                                   segments=ctx.get("segments"),
                                                                   segment_ids_BT=ctx.get("segment_ids"),
                                                                   lengths=ctx.get("lengths"),
                                                                   local_mask_B1TS=ctx.get("local_mask")))
        new_cache = None if cache is None else dict(cache, self=self_kv)
        if self.cross:
            x_BLD, cross_kv = sublayer(x_BLD, "cross_attention",
                                       attend("cross", True, ctx["cross_mask"], kv_BSD=ctx["encoded"],
                                              segments=ctx.get("cross_segments"), lengths=ctx.get("cross_lengths")))
            if cache is not None:
                new_cache["cross"] = cross_kv
        if cfg.num_experts:
            mlp = lambda h: MoeMlp(cfg, name="mlp")(h, ctx["valid"])
        else:
            mlp = lambda h: Mlp(cfg, name="mlp")(h)
        x_BLD, _ = sublayer(x_BLD, "mlp", lambda h: (mlp(h), None))
        return (constrain(x_BLD, BLD), new_cache), None


class Stack(nn.Module):
    """``num_layers`` blocks, scanned (``nn.scan``, params stacked on a leading ``layers`` axis)
    or unrolled, each wrapped in ``nn.remat`` with the configured policy. The decode cache
    travels in the carry, so each layer updates its slice in place."""

    cfg: ModelConfig
    num_layers: int
    cross: bool = False
    deterministic: bool = True
    causal: bool = False

    @nn.compact
    def __call__(self, x_BLD: Array, ctx: dict, cache: Optional[dict] = None):
        cfg = self.cfg
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        carry = (x_BLD, cache)
        if cfg.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0, "intermediates": 0},  # intermediates: MoE's router statistics
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, 0),
                length=self.num_layers,
                unroll=min(cfg.scan_unroll, self.num_layers),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            carry, _ = scanned(cfg, self.cross, self.deterministic, self.causal, name="layers")(
                carry, ctx, jnp.arange(self.num_layers))
        else:  # layers as straight code; a decode cache then holds one entry a layer (``init_cache``)
            caches = []
            for i in range(self.num_layers):
                (x_BLD, layer_cache), _ = block(cfg, self.cross, self.deterministic, self.causal, name=f"layers_{i}")(
                    (x_BLD, None if cache is None else cache[i]), ctx, i)
                caches.append(layer_cache)
            carry = (x_BLD, None if cache is None else caches)
        return carry


def _default_ids(input_ids_BL: Array, segment_ids_BL: Optional[Array], positions_BL: Optional[Array]):
    b, length = input_ids_BL.shape
    if segment_ids_BL is None:
        segment_ids_BL = jnp.ones((b, length), jnp.int32)
    if positions_BL is None:
        positions_BL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    return segment_ids_BL, positions_BL


class TextStack(nn.Module):
    """Embeddings -> layers -> final norm, for one side of a model.

    ``causal=False``: bidirectional encoder. ``causal=True``: decoder, with a KV cache when
    ``cache`` is given and with cross-attention over ``encoded`` when ``cross``.
    """

    cfg: ModelConfig
    embed: Embed
    num_layers: int
    causal: bool
    cross: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, input_ids_BT: Array, segment_ids_BT: Optional[Array] = None,
                 positions_BT: Optional[Array] = None, *, prefix_mask_BT: Optional[Array] = None,
                 encoded_BSD: Optional[Array] = None, encoder_segment_ids_BS: Optional[Array] = None,
                 cache: Optional[dict] = None):
        cfg = self.cfg
        t = input_ids_BT.shape[1]
        segment_ids_BT, positions_BT = _default_ids(input_ids_BT, segment_ids_BT, positions_BT)

        # Token (+ learned position) embeddings.
        x_BTD = self.embed(input_ids_BT)
        if cfg.embed_scale:  # Gemma: the scale rounded to the compute dtype, as transformers does
            x_BTD = x_BTD * jnp.asarray(cfg.d_model ** 0.5, x_BTD.dtype)
        if cfg.position == "learned":
            if cache is None and t > cfg.max_length:
                raise ValueError(f"sequence length {t} exceeds model.max_length={cfg.max_length} "
                                 "(the learned position table)")
            pos_table = Embed(cfg.max_length, cfg.d_model, axes=("abspos", "embed"), dtype=jnp_dtype(cfg.dtype),
                              param_dtype=jnp_dtype(cfg.param_dtype), name="pos_embed")
            x_BTD = x_BTD + pos_table(positions_BT)
        if cfg.embed_norm:
            x_BTD = make_norm(cfg, "embed_norm")(x_BTD)
        x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=self.deterministic)
        x_BTD = constrain(x_BTD, BLD)

        # Masks and position bias, once for all layers. Row slots index keys and queries: in decode
        # mode the queries sit at cache["index"] + [0, T) of a cache of S slots.
        if cache is None:
            q_idx_T = k_idx_S = jnp.arange(t)
            k_seg_BS, q_prefix_BT, k_prefix_BS = segment_ids_BT, prefix_mask_BT, prefix_mask_BT
            cache_index = None
        else:
            cache_index = cache["index"]
            s = cache["segment_ids"].shape[1]
            q_idx_T, k_idx_S = cache_index + jnp.arange(t), jnp.arange(s)
            q_prefix_BT = prefix_mask_BT if prefix_mask_BT is not None else jnp.zeros_like(segment_ids_BT, bool)
            k_seg_BS = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids_BT, (0, cache_index))
            k_prefix_BS = jax.lax.dynamic_update_slice(cache["prefix"], q_prefix_BT, (0, cache_index))
        pattern = self.causal and cfg.sliding_window and cfg.sliding_window_pattern
        mask_B1TS = attention_mask(segment_ids_BT, k_seg_BS, causal=self.causal, q_idx_T=q_idx_T, k_idx_S=k_idx_S,
                                   q_prefix_BT=q_prefix_BT, k_prefix_BS=k_prefix_BS,
                                   window=0 if pattern else cfg.sliding_window)
        local_mask_B1TS = None
        if pattern:  # local and global layers: both masks, each layer picks its own
            local_mask_B1TS = attention_mask(segment_ids_BT, k_seg_BS, causal=True, q_idx_T=q_idx_T, k_idx_S=k_idx_S,
                                             q_prefix_BT=q_prefix_BT, k_prefix_BS=k_prefix_BS,
                                             window=cfg.sliding_window)
        bias_1NTS = None
        if cfg.position == "relative":
            bias_1NTS = RelativePositionBias(cfg.num_heads, cfg.relative_buckets, cfg.relative_max_distance,
                                             bidirectional=not self.causal, param_dtype=jnp_dtype(cfg.param_dtype),
                                             name="relpos")(q_idx_T, k_idx_S)
        elif cfg.position == "alibi":
            bias_1NTS = alibi_bias(cfg.num_heads, q_idx_T, k_idx_S)
        ctx = {"mask": mask_B1TS, "local_mask": local_mask_B1TS, "bias": bias_1NTS, "positions": positions_BT,
               "cache_index": cache_index,
               "encoded": encoded_BSD, "cross_mask": None, "valid": segment_ids_BT > 0}
        training_rows = cache is None and prefix_mask_BT is None
        slots = cfg.packed_slots if training_rows else 0
        one_document = cfg.one_document_rows and training_rows
        if one_document:  # a length a row for cuDNN (max_segments 1); unused where XLA attends
            lengths_B = row_lengths(segment_ids_BT)
            ctx["lengths"] = (lengths_B, lengths_B)
        if slots:
            # Documents as cuDNN's packed layout (lengths and starts), once for all layers; decoding
            # and prefix LM keep the mask. Rows hold at most max_segments documents (the packer's
            # cap). Where attention runs on XLA ("auto" off a GPU) these go unused and XLA drops them.
            lengths_BM, starts_BM1 = segment_lengths_and_starts(segment_ids_BT, slots)
            ctx["segments"] = (lengths_BM, starts_BM1, lengths_BM, starts_BM1)
        if cfg.attention == "pallas" and cache is None and prefix_mask_BT is None:
            ctx["segment_ids"] = segment_ids_BT  # documents inside the Pallas kernel (self-attention)
        if self.cross:
            enc_seg = encoder_segment_ids_BS if cache is None else cache["encoder_segment_ids"]
            ctx["cross_mask"] = attention_mask(segment_ids_BT, enc_seg, causal=False)
            if slots:  # the k-th decoder document reads the k-th encoder document
                ctx["cross_segments"] = cross_segments(
                    lengths_BM, starts_BM1, *segment_lengths_and_starts(enc_seg, slots))
            if one_document:  # the row's decoder document reads its encoder document
                ctx["cross_lengths"] = (lengths_B, row_lengths(enc_seg))

        stack = Stack(self.cfg, self.num_layers, self.cross, self.deterministic, self.causal, name="stack")
        x_BTD, layer_cache = stack(x_BTD, ctx, None if cache is None else cache["layers"])
        if cfg.norm_position != "post":
            x_BTD = make_norm(cfg, "final_norm")(x_BTD)
        x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=self.deterministic)
        if cache is None:
            return x_BTD, None
        new_cache = dict(cache, layers=layer_cache, index=cache_index + t, segment_ids=k_seg_BS, prefix=k_prefix_BS)
        return x_BTD, new_cache


class LMHead(nn.Module):
    """Hidden states -> vocabulary logits, tied to the token embedding or its own kernel."""

    cfg: ModelConfig
    embed: Embed

    @nn.compact
    def __call__(self, x_BLD: Array) -> Array:
        cfg = self.cfg
        if cfg.mlm_head_transform:
            x_BLD = activation(cfg)(dense(cfg, cfg.d_model, ("embed", "mlp"), "transform")(x_BLD))
            x_BLD = make_norm(cfg, "transform_norm")(x_BLD)
        if cfg.tie_embeddings:
            if cfg.family == "encoder_decoder":  # T5 v1.0 convention for a tied head
                x_BLD = x_BLD * cfg.d_model ** -0.5
            logits_BLV = self.embed.attend(x_BLD)
        else:
            head = dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head", use_bias=False)
            logits_BLV = head(x_BLD)
        if (cfg.use_bias if cfg.logits_bias is None else cfg.logits_bias):
            bias = self.param("logits_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
                              (cfg.vocab_size,), jnp_dtype(cfg.param_dtype))
            logits_BLV = logits_BLV + bias.astype(logits_BLV.dtype)
        if cfg.final_logit_softcap:  # Gemma 2
            cap = cfg.final_logit_softcap
            logits_BLV = (cap * jnp.tanh(logits_BLV.astype(jnp.float32) / cap)).astype(logits_BLV.dtype)
        return constrain(logits_BLV, BLV)


def _token_embed(cfg: ModelConfig) -> Embed:
    return Embed(cfg.vocab_size, cfg.d_model, dtype=jnp_dtype(cfg.dtype), param_dtype=jnp_dtype(cfg.param_dtype),
                 name="token_embed")


class EncoderModel(nn.Module):
    """BERT-style bidirectional encoder with a masked-LM head."""

    cfg: ModelConfig
    deterministic: bool = True

    def setup(self):
        self.token_embed = _token_embed(self.cfg)
        self.encoder = TextStack(self.cfg, self.token_embed, self.cfg.num_layers, causal=False,
                                 deterministic=self.deterministic)
        self.head = LMHead(self.cfg, self.token_embed)

    def encode(self, input_ids, segment_ids=None, positions=None) -> Array:
        """Final hidden states ``[B, L, D]``."""
        return self.encoder(input_ids, segment_ids, positions)[0]

    hidden = encode  # the states the LM head reads

    def logits_from_hidden(self, x_BLD: Array) -> Array:
        return self.head(x_BLD)

    def __call__(self, input_ids, segment_ids=None, positions=None) -> Array:
        return self.head(self.encode(input_ids, segment_ids, positions))


class DecoderModel(nn.Module):
    """GPT/LLaMA-style causal decoder; prefix LM when ``prefix_mask`` marks a bidirectional prefix."""

    cfg: ModelConfig
    deterministic: bool = True

    def setup(self):
        self.token_embed = _token_embed(self.cfg)
        self.decoder = TextStack(self.cfg, self.token_embed, self.cfg.num_layers, causal=True,
                                 deterministic=self.deterministic)
        self.head = LMHead(self.cfg, self.token_embed)

    def hidden(self, input_ids, segment_ids=None, positions=None, prefix_mask=None) -> Array:
        """Final hidden states ``[B, L, D]`` (what the LM head reads)."""
        return self.decoder(input_ids, segment_ids, positions, prefix_mask_BT=prefix_mask)[0]

    def logits_from_hidden(self, x_BLD: Array) -> Array:
        return self.head(x_BLD)

    def __call__(self, input_ids, segment_ids=None, positions=None, prefix_mask=None) -> Array:
        return self.head(self.hidden(input_ids, segment_ids, positions, prefix_mask))

    def decode(self, input_ids, segment_ids, positions, cache, prefix_mask=None):
        """Runs ``input_ids [B, T]`` at slots ``cache['index'] + [0, T)``: (logits, new cache)."""
        x, cache = self.decoder(input_ids, segment_ids, positions, prefix_mask_BT=prefix_mask, cache=cache)
        return self.head(x), cache


class EncoderDecoderModel(nn.Module):
    """T5-style encoder-decoder; input embedding shared by both sides."""

    cfg: ModelConfig
    deterministic: bool = True

    def setup(self):
        cfg = self.cfg
        self.token_embed = _token_embed(cfg)
        self.encoder = TextStack(cfg, self.token_embed, cfg.num_layers, causal=False,
                                 deterministic=self.deterministic)
        self.decoder = TextStack(cfg, self.token_embed, cfg.decoder_layers, causal=True, cross=True,
                                 deterministic=self.deterministic)
        self.head = LMHead(cfg, self.token_embed)

    def encode(self, encoder_input_ids, encoder_segment_ids=None, encoder_positions=None) -> Array:
        return self.encoder(encoder_input_ids, encoder_segment_ids, encoder_positions)[0]

    def hidden(self, encoder_input_ids, input_ids, encoder_segment_ids=None, segment_ids=None,
               encoder_positions=None, positions=None) -> Array:
        """The decoder's final hidden states ``[B, T, D]`` (what the LM head reads)."""
        encoder_segment_ids, encoder_positions = _default_ids(encoder_input_ids, encoder_segment_ids,
                                                              encoder_positions)
        encoded = self.encode(encoder_input_ids, encoder_segment_ids, encoder_positions)
        x, _ = self.decoder(input_ids, segment_ids, positions, encoded_BSD=encoded,
                            encoder_segment_ids_BS=encoder_segment_ids)
        return x

    def logits_from_hidden(self, x_BLD: Array) -> Array:
        return self.head(x_BLD)

    def __call__(self, encoder_input_ids, input_ids, encoder_segment_ids=None, segment_ids=None,
                 encoder_positions=None, positions=None) -> Array:
        return self.head(self.hidden(encoder_input_ids, input_ids, encoder_segment_ids, segment_ids,
                                     encoder_positions, positions))

    def decode(self, input_ids, segment_ids, positions, cache, encoded=None):
        """One decode call; ``encoded`` is needed on the first call only (it fills the cross cache)."""
        x, cache = self.decoder(input_ids, segment_ids, positions, encoded_BSD=encoded, cache=cache)
        return self.head(x), cache


FAMILIES = {"encoder": EncoderModel, "decoder": DecoderModel, "encoder_decoder": EncoderDecoderModel}


def build_model(cfg: ModelConfig, deterministic: bool = True) -> nn.Module:
    return FAMILIES[cfg.family](cfg, deterministic=deterministic)


def init_cache(cfg: ModelConfig, batch: int, length: int, encoder_segment_ids: Optional[Array] = None,
               dtype: Any = None) -> dict:
    """An empty decode cache of ``length`` slots: keys/values ``[L, B, S, K, H]`` for every
    decoder layer (with ``scan_layers: false``, a list of one ``[B, S, K, H]`` entry a layer),
    the segment id (0 = empty or padding) and prefix flag of every slot, and the next slot to
    write. Encoder-decoder caches also hold the encoder's segment ids and room for the
    cross-attention keys/values ``[L, B, S_enc, K, H]``."""
    num_layers = cfg.decoder_layers if cfg.family == "encoder_decoder" else cfg.num_layers
    dtype = dtype or jnp_dtype(cfg.dtype)
    kv = jnp.zeros((num_layers, batch, length, cfg.kv_heads, cfg.dim_per_head), dtype)
    cache = {
        "layers": {"self": {"k": kv, "v": kv}},
        "index": jnp.zeros((), jnp.int32),
        "segment_ids": jnp.zeros((batch, length), jnp.int32),
        "prefix": jnp.zeros((batch, length), bool),
    }
    if cfg.family == "encoder_decoder":
        if encoder_segment_ids is None:
            raise ValueError("an encoder_decoder cache needs the encoder's segment ids")
        cache["encoder_segment_ids"] = encoder_segment_ids
        cross = jnp.zeros((num_layers, batch, encoder_segment_ids.shape[1], cfg.kv_heads, cfg.dim_per_head), dtype)
        cache["layers"]["cross"] = {"k": cross, "v": cross}  # filled by the first decode call
    if not cfg.scan_layers:
        # layers as straight code: one entry a layer ([B, S, K, H] each), which a layer reads and
        # updates as it is; out of a stacked array, reading a layer's slice copies it every step
        # (compiled for an H100, llama_1b at batch 32: 0.8 GB of copies a token, ~30% of it)
        cache["layers"] = [jax.tree.map(lambda x, i=i: x[i], cache["layers"]) for i in range(num_layers)]
    return cache


CACHE_KV_AXES = ("layers", "act_batch", "act_length", "act_kv_heads", "act_kv")
