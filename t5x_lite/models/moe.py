"""Mixture-of-experts feed-forward block (Mixtral, Qwen3-MoE; Qwen2-MoE with its shared
expert): a router picks ``k`` of ``E`` experts per token, the block's output is their outputs
weighted by the router (plus, with ``model.shared_expert_d_ff``, an MLP every token takes).

Dispatch is by einsum over one-hot tensors (GShard's formulation): tokens are routed in
groups (``model.expert_group_size`` tokens, or the row), each expert takes at most ``C`` tokens
of a group, and

    expert inputs  [E, G, C, D] = einsum(tokens [G, S, D], dispatch [G, S, E, C])
    expert outputs [E, G, C, D] = each expert's MLP (batched matmuls over E)
    block output   [G, S, D]    = einsum(expert outputs, combine [G, S, E, C])

so every shape is static and the SPMD partitioner shards it like any matmul (the groups keep
the batch sharding, the experts' hidden width splits over ``tensor``, ZeRO-3 gathers expert
weights per layer as it gathers the others). ``model.expert_capacity_factor`` sets
``C = ceil(k * S * factor / E)``: tokens past an expert's capacity lose that expert (first
choices of the whole group go before second choices; within a rank, earlier tokens first).
Factor 0 (the default) is dropless: ``C = S``, every choice kept, the exact model a Hugging
Face checkpoint defines, at ``E / k`` times the experts' FLOPs; 1.25-2 is the usual trade for
training speed; evaluation, decoding and ``logits`` use ``model.eval_capacity_factor`` instead
(0 by default: dropless). One token per group (decoding) never drops at any factor. A call with fewer
choices than experts (a decoding step of a small batch) instead gathers each token's own k
experts' weights: the same numbers, k experts read instead of E. With
``sharding.expert_parallel`` the experts' axis is split over ``fsdp`` (whole experts per
shard) and the partitioner moves the routed tokens to them and back.

The router's load-balancing loss (Switch Transformer's, with transformers' scale:
``E * sum_e (fraction of choices to e) * (mean router probability of e)``, ``k`` when
balanced) is taken per routing group over its real tokens, and summed with the choices made
and dropped into the ``intermediates`` collection, one value per layer. The trainer adds
``model.router_aux_loss`` times its mean over groups and layers to the loss (and
``model.router_z_loss`` times the router's z-loss, taken alike). Per group (not
over the whole batch, as transformers does) makes it a sum: micro-batches and devices give
the batch's value exactly. Each layer's per-expert choices (its load) are sown too: with
``model.router_bias_update`` (DeepSeek-V3's balancing without a loss) a per-expert bias added
to the probabilities chooses the experts (the weights stay the probabilities), and the train
step moves it after each update by the rate, up for experts below the layer's mean load, down
above it (``update_router_bias``); gradients never reach it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from t5x_lite.config import ModelConfig
from t5x_lite.models.layers import BLD, Mlp, constrain, dense, jnp_dtype, mlp_activation

Array = jax.Array

# names of the sown per-layer sums: groups' balance losses and z-losses, choices made, choices dropped
AUX_LOSS, Z_LOSS, CHOICES, DROPPED = "router_balance", "router_z", "router_choices", "router_dropped"
LOAD = "router_load"  # sown per layer too: choices per expert [E]
# What remat ``minimal`` keeps of the experts' MLP besides the weight matmuls it keeps anyway (the
# expert einsums carry the experts as a batch dimension, which jax's dot policies do not save):
# the tokens dispatched to each expert and the gate / up projections, else the backward pass runs
# them again (compiled for an H100, moe_1b: 8.3 TFLOP a step more, 85.6 against 77.3; bench/offline_gpu.py).
EXPERT_INPUTS, EXPERT_HIDDEN = "expert_inputs", "expert_hidden"
ROUTER_BIAS = "router_bias"  # the balancing bias parameter [E] of model.router_bias_update


class ExpertKernel(nn.Module):
    """One projection of every expert: ``kernel [E, *in, *out]`` (fan-in init per expert)."""

    shape: tuple
    axes: tuple
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self) -> Array:
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=2,
                                                batch_axis=(0,))
        return self.param("kernel", nn.with_logical_partitioning(init, self.axes), self.shape,
                          self.param_dtype).astype(self.dtype)


def expert_capacity(cfg: ModelConfig, group: int) -> int:
    """Slots per expert in a group of ``group`` tokens (``group``: dropless)."""
    if not cfg.expert_capacity_factor:
        return group
    return max(1, min(group, math.ceil(cfg.experts_per_token * group * cfg.expert_capacity_factor
                                       / cfg.num_experts)))


def group_size(cfg: ModelConfig, length: int) -> int:
    """Tokens routed together: ``model.expert_group_size`` where it divides the row, else the row."""
    size = cfg.expert_group_size
    return size if size and length % size == 0 else length


def route(cfg: ModelConfig, logits_GSE: Array, valid_GS: Array, capacity: int, bias_E: Optional[Array] = None) -> dict:
    """Top-k routing of each group's tokens under a capacity: ``dispatch [G, S, E, C]`` (1 where
    token s sits in slot c of expert e), ``combine`` (the same, times the router weight), the
    router probabilities and choices. Padding (``valid`` false) is routed nowhere."""
    e, k = cfg.num_experts, cfg.experts_per_token
    probs_GSE, weight_GSK, expert_GSK = top_k(cfg, logits_GSE, bias_E)
    g, s = valid_GS.shape
    # Choices ranked first by k (every first choice before any second one), then by position.
    chosen_GKSE = jax.nn.one_hot(jnp.swapaxes(expert_GSK, 1, 2), e, dtype=jnp.int32) * valid_GS[:, None, :, None]
    slot_GKSE = (jnp.cumsum(chosen_GKSE.reshape(g, k * s, e), axis=1) - 1).reshape(g, k, s, e)
    kept_GKSE = chosen_GKSE * (slot_GKSE < capacity)
    # A token picks k distinct experts: at most one rank holds each (token, expert).
    in_GSE = jnp.sum(kept_GKSE, axis=1)
    slot_GSE = jnp.sum(slot_GKSE * kept_GKSE, axis=1)
    gate_GSE = jnp.sum(jnp.swapaxes(weight_GSK, 1, 2)[..., None] * kept_GKSE, axis=1)
    dispatch_GSEC = jax.nn.one_hot(slot_GSE, capacity, dtype=jnp.float32) * in_GSE[..., None]
    return {"dispatch": dispatch_GSEC, "combine": dispatch_GSEC * gate_GSE[..., None], "probs": probs_GSE,
            "chosen": jnp.sum(chosen_GKSE, axis=1), "kept": in_GSE, "weights": weight_GSK, "experts": expert_GSK}


def top_k(cfg: ModelConfig, logits: Array, bias_E: Optional[Array] = None) -> tuple[Array, Array, Array]:
    """(router probabilities, the top-k weights, their experts), the weights renormalised to
    sum 1 with ``model.router_renormalize``. ``bias_E`` (``model.router_bias_update``) shifts
    which experts are chosen, not their weights."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    if bias_E is None:
        weight, expert = jax.lax.top_k(probs, cfg.experts_per_token)
    else:
        _, expert = jax.lax.top_k(probs + bias_E.astype(jnp.float32), cfg.experts_per_token)
        weight = jnp.take_along_axis(probs, expert, axis=-1)
    if cfg.router_renormalize:
        weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
    return probs, weight, expert


def gathers_experts(cfg: ModelConfig, tokens: int, group: int, capacity: int) -> bool:
    """Whether a call of ``tokens`` tokens runs each token's own k experts, gathered (a decoding
    step of a small batch: fewer choices than experts, so gathering reads fewer expert weights
    than running every expert), rather than the dispatch einsums. Only where no choice can be
    dropped (capacity = group), so both give the same numbers."""
    return tokens * cfg.experts_per_token < cfg.num_experts and capacity == group


def balance_loss(cfg: ModelConfig, probs_GSE: Array, chosen_GSE: Array, valid_GS: Array) -> Array:
    """Each group's ``E * sum_e f_e * p_e`` over its real tokens (``[G]``; 0 for a group of
    padding): ``f_e`` the choices per token that went to expert e (summing to k), ``p_e`` its
    mean router probability."""
    valid = valid_GS.astype(jnp.float32)[..., None]
    tokens_G1 = jnp.maximum(jnp.sum(valid, axis=1), 1.0)
    frac_GE = jnp.sum(chosen_GSE * valid, axis=1) / tokens_G1
    prob_GE = jnp.sum(probs_GSE * valid, axis=1) / tokens_G1
    return cfg.num_experts * jnp.sum(frac_GE * prob_GE, axis=-1)


def z_loss(logits_GSE: Array, valid_GS: Array) -> Array:
    """Each group's mean over its real tokens of ``logsumexp(router logits)^2`` (``[G]``; ST-MoE's
    router z-loss: it keeps the logits small, the routing numerically stable)."""
    valid = valid_GS.astype(jnp.float32)
    lse_GS = jax.nn.logsumexp(logits_GSE.astype(jnp.float32), axis=-1)
    return jnp.sum(lse_GS ** 2 * valid, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1.0)


def num_groups(cfg: ModelConfig, shapes: dict) -> int:
    """Routing groups of a batch summed over the MoE layers (what the balance sums divide by),
    from the batch's shapes (``trainer.batch_shapes``)."""
    def stack(key: str, layers: int) -> int:
        b, length = shapes[key].shape
        return layers * b * length // group_size(cfg, length)

    if cfg.family == "encoder_decoder":
        return stack("encoder_input_ids", cfg.num_layers) + stack("input_ids", cfg.decoder_layers)
    return stack("input_ids", cfg.num_layers)


class MoeMlp(nn.Module):
    """``model.num_experts`` gated (or plain) MLPs of width ``model.expert_d_ff`` behind a router;
    with ``model.shared_expert_d_ff``, plus an MLP every token goes through (sigmoid-gated per
    token with ``model.shared_expert_gate``)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD: Array, valid_BL: Optional[Array] = None) -> Array:
        routed = self.routed(x_BLD, valid_BL)
        cfg = self.cfg
        if not cfg.shared_expert_d_ff:
            return routed
        shared_cfg = dataclasses.replace(cfg, d_ff=cfg.shared_expert_d_ff, num_experts=0, fused_mlp=False)
        shared = Mlp(shared_cfg, name="shared_expert")(x_BLD)
        if cfg.shared_expert_gate:
            gate = dense(cfg, 1, ("embed", None), "shared_expert_gate", use_bias=False)(x_BLD)
            shared = shared * jax.nn.sigmoid(gate.astype(jnp.float32)).astype(shared.dtype)
        return constrain(routed + shared, BLD)

    def routed(self, x_BLD: Array, valid_BL: Optional[Array]) -> Array:
        cfg = self.cfg
        b, length, d = x_BLD.shape
        e, f = cfg.num_experts, cfg.expert_width
        dtype, param_dtype = jnp_dtype(cfg.dtype), jnp_dtype(cfg.param_dtype)
        s = group_size(cfg, length)
        capacity = expert_capacity(cfg, s)
        x_GSD = x_BLD.astype(dtype).reshape(b * length // s, s, d)
        valid_GS = (jnp.ones((b, length), bool) if valid_BL is None else valid_BL).reshape(-1, s)

        logits_GSE = dense(cfg, e, ("embed", "experts"), "router", use_bias=False)(x_GSD)
        bias_E = None
        if cfg.router_bias_update:  # moved by the train step after each update, never by gradients
            bias_E = self.param(ROUTER_BIAS, nn.with_logical_partitioning(nn.initializers.zeros_init(), ("experts",)),
                                (e,), jnp.float32)
        r = route(cfg, logits_GSE, valid_GS, capacity, bias_E)
        # Sums (over the groups; choices), so micro-batches add up to the batch's.
        self.sow("intermediates", AUX_LOSS, jnp.sum(balance_loss(cfg, r["probs"], r["chosen"], valid_GS)))
        self.sow("intermediates", Z_LOSS, jnp.sum(z_loss(logits_GSE, valid_GS)))
        self.sow("intermediates", CHOICES, jnp.sum(r["chosen"]).astype(jnp.float32))
        self.sow("intermediates", DROPPED, jnp.sum(r["chosen"] - r["kept"]).astype(jnp.float32))
        # each expert's choices over the real tokens: its load (the bias update, the imbalance metric)
        self.sow("intermediates", LOAD, jnp.sum(r["chosen"], axis=(0, 1)).astype(jnp.float32))

        # every expert's kernels [E, in, out]: gate and up (or the one input projection), then down
        names = ("wi_0", "wi_1") if cfg.gated_mlp else ("wi",)
        kernels = {name: ExpertKernel((e, d, f), ("experts", "embed", "mlp"), dtype, param_dtype, name=name)()
                   for name in names}
        kernels["wo"] = ExpertKernel((e, f, d), ("experts", "mlp", "embed"), dtype, param_dtype, name="wo")()
        if gathers_experts(cfg, b * length, s, capacity):
            # Each token's k experts' weights gathered ([N, k, ...]): a decoding step reads those alone.
            ids_NK, x_ND = r["experts"].reshape(b * length, -1), x_GSD.reshape(b * length, d)
            weight_NK = (r["weights"].reshape(b * length, -1) * valid_GS.reshape(-1, 1)).astype(dtype)
            taken = {name: jnp.take(kernel, ids_NK, axis=0) for name, kernel in kernels.items()}
            out_NKD = self.experts_mlp(x_ND, taken, "nd,nkdf->nkf", "nkf,nkfd->nkd")
            return constrain(jnp.einsum("nkd,nk->nd", out_NKD, weight_NK).reshape(b, length, d), BLD)
        x_EGCD = checkpoint_name(jnp.einsum("gsd,gsec->egcd", x_GSD, r["dispatch"].astype(dtype)), EXPERT_INPUTS)
        expert_in = ("act_experts", "act_batch", None, "act_embed")  # sharding.expert_parallel: E over fsdp
        hidden = ("act_experts", "act_batch", None, "act_mlp")
        y_EGCD = self.experts_mlp(constrain(x_EGCD, expert_in), kernels, "egcd,edf->egcf", "egcf,efd->egcd",
                                  lambda h: constrain(h, hidden))
        y_GSD = jnp.einsum("egcd,gsec->gsd", constrain(y_EGCD, expert_in), r["combine"].astype(dtype))
        return constrain(y_GSD.reshape(b, length, d), BLD)

    def experts_mlp(self, x: Array, kernels: dict, into: str, out: str, hidden=lambda h: h) -> Array:
        """The experts' MLP of ``x`` through ``kernels`` (all experts', or each token's gathered):
        ``into`` / ``out`` the einsums into and out of the hidden width, ``hidden`` applied to each
        input projection (a sharding constraint)."""
        h = {name: checkpoint_name(hidden(jnp.einsum(into, x, kernel)), EXPERT_HIDDEN)
             for name, kernel in kernels.items() if name != "wo"}
        inputs = (h["wi_0"], h["wi_1"]) if "wi_0" in h else (h["wi"],)
        return jnp.einsum(out, mlp_activation(self.cfg)(*inputs), kernels["wo"])


def sown_loads(intermediates: dict) -> list[tuple[tuple, Array]]:
    """``[(module path, loads [..., E])]`` sown under ``LOAD`` (a scanned stack's ``[layers, E]``,
    an unrolled layer's ``[E]``): the module path is where that layer's ``ROUTER_BIAS`` sits."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
        keys = tuple(getattr(p, "key", None) for p in path)
        if LOAD in keys:
            out.append((keys[: keys.index(LOAD)], leaf))
    return out


def update_router_bias(cfg: ModelConfig, params: dict, loads) -> dict:
    """``params`` with each MoE layer's ``ROUTER_BIAS`` moved by ``model.router_bias_update``
    (``loads``: ``(module path, loads)`` pairs, as ``sown_loads``): up for experts whose load
    (choices) is below the layer's mean, down above it."""
    flat = flax.traverse_util.flatten_dict(params)
    for path, load in loads:
        step = cfg.router_bias_update * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
        bias = flat[path + (ROUTER_BIAS,)]
        flat[path + (ROUTER_BIAS,)] = bias + step.astype(bias.dtype)
    return flax.traverse_util.unflatten_dict(flat)


def sown_total(intermediates: dict, name: str) -> Array:
    """The sum of every value sown under ``name`` (each layer's, of every stack) in the
    ``intermediates`` collection of an apply; 0 when there are none."""
    total = jnp.zeros((), jnp.float32)
    for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
        if any(getattr(p, "key", None) == name for p in path):
            total = total + jnp.sum(leaf.astype(jnp.float32))
    return total
