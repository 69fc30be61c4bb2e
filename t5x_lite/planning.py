"""``t5x-lite plan``: will it fit, at which ZeRO stage, how many tokens, PF-days and hours, and
does the compiler agree, before any device time is spent.

Memory per device (ZeRO paper notation). With P, G, O the bytes of the whole model's
parameters, gradients and optimizer state, t = ``mesh.tensor``, N_p = ``mesh.fsdp`` (the axis
ZeRO shards over) and N_o = N_p, or ``mesh.data`` x ``mesh.fsdp`` with
``sharding.shard_opt_over_data`` (optimizer state and, from stage 2, gradients)::

    stage 0:  P/t          G/t          O/t
    stage 1:  P/t          G/t          O/(t N_o)
    stage 2:  P/t          G/(t N_o)    O/(t N_o)
    stage 3:  P/(t N_p)    G/(t N_o)    O/(t N_o)

``precision="config"`` takes P, G, O from this trainer's real state: parameters and gradients
in ``model.param_dtype``, the optimizer state from ``eval_shape`` of its init (AdamW: two
moments in the parameter dtype; Adafactor: factored statistics). ``precision="mixed"`` is the
ZeRO paper's mixed-precision Adam, 2 + 2 + 12 bytes per parameter (16-bit weights and
gradients; fp32 master weights, momentum and variance): 7.5B parameters on 64 devices need
120 / 31.4 / 16.6 / 1.9 GB per device at stages 0-3. Unsharded, fp32 AdamW takes 16 bytes per
parameter too (20 with a gradient accumulator), against 4 to merely hold fp32 weights.

Activations, per device and token: the residuals JAX keeps for the backward pass (as listed
by ``jax.ad_checkpoint.print_saved_residuals``) plus one layer's working set, in bytes.
a = size of ``model.dtype``; D = d_model; Q = heads x head_dim, K = kv_heads x head_dim,
F = d_ff and n = heads are per tensor shard; S = keys a query sees; L = layers::

    one layer, everything (E):   (2a + 16) D + a (2Q + 2K + cF) + n S (4 + a)
    one layer, matmul outputs (M):  a (2D + Q + 2K + 2F)      (plain MLP: F instead of 2F)
    remat none:      L E + (E - M) + 5 n S   (the attention mask broadcast to the scores)
    remat minimal / dots:   L M + (E - M) + S
    remat full:      L a D + E + S

(c = 6; 4 for a gated MLP, 3 for a plain GELU one, where the activation is computed again in the
backward pass: ``mlp_tensors``. E - M, E: the layer whose backward pass runs, recomputed under
remat. 16 D: float32 norm inputs; n S (4 + a): float32 scores and probabilities; cuDNN flash
attention on GPU keeps 4n instead, 4nP with its packed layout, P = ``model.packed_slots``; remat minimal adds that and
the kernel's output, aQ, to M: kept rather than rerun.) Cross-attention adds
(a + 8) D + 2a Q + n S_enc (4 + a) to E and a (D + Q) to M per decoder token, and 2aK per
encoder position and decoder layer (none, minimal). The output layer adds D(a + 8) per token
(the final norm) and V/t (a + 8) per position whose logits exist at once (logits, their float32
log-softmax and its gradient): every position, or the MLM's scored ones (~15%), or one
``train.loss_chunk`` of them. Weights beyond the stored params: without remat, compute-dtype
copies of every weight when ``dtype`` differs from ``param_dtype`` (sharded like the params:
XLA shards after JAX has chosen what to save); at stage 3, one layer gathered in full, and with
``train.loss_chunk`` the output layer's weight and gradient in full (2 V D / t: the chunk scan
keeps them across its iterations). ``train.micro_batches > 1`` holds a second gradient buffer
(the accumulator). Against XLA's memory analysis on 8 CPU
devices (float32, scanned layers, d_model 128, 512 tokens per device), compiled temp bytes /
(grads + activations) came out 0.86-1.11 over decoder, encoder and encoder-decoder stacks,
remat none / minimal / full, stages 1-3, GQA, tensor = 2, data x fsdp and micro-batches.
bfloat16 compute cannot be checked on CPU, whose compiler widens it to float32 (~2x temp).

Compute: FLOPs per token are ``metrics.train_flops_per_step / tokens_per_step``, the count the
training log uses (6 x the matmul weights a token passes through, plus attention scores and
values); compute-optimal tokens are 20 per parameter (Chinchilla, Hoffmann et al. 2022, all
parameters counted); PF-days = FLOPs / (1e15 x 86400).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Optional, Sequence

import jax
import numpy as np

from t5x_lite import partitioning
from t5x_lite.config import Config
from t5x_lite.metrics import target_length, tokens_per_step, train_flops_per_step
from t5x_lite.losses import max_scored_positions
from t5x_lite.models.layers import recomputes_activation

GB = 1e9
CHINCHILLA_TOKENS_PER_PARAM = 20
PF_DAY = 1e15 * 86400
STAGES = (0, 1, 2, 3)
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM
JAX_MEMORY_FRACTION = 0.75  # JAX preallocates (and then uses at most) 75% of a GPU's memory
EMBEDDING_LEAVES = ("embedding", "rel_embedding")  # lookup tables: no matmul FLOPs


# ----------------------------------------------------------------------- parameters


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


_COUNTS: dict = {}


def param_counts(cfg: Config) -> dict:
    """``total``, ``embedding`` (token / position / relative-bias tables) and ``non_embedding``
    parameters, and ``stack`` (those inside the layer stacks), from the model's abstract shapes
    (traced once per model config: a sweep asks again for every rung)."""
    key = repr(cfg.model)
    if key not in _COUNTS:
        _COUNTS[key] = _count_params(cfg)
    return dict(_COUNTS[key])


def active_params(cfg: Config, total: int) -> Optional[int]:
    """A mixture of experts' parameters one token uses: all but the experts it is not routed
    to (None for a dense model)."""
    m = cfg.model
    if not m.num_experts:
        return None
    return total - param_counts(cfg)["experts"] * (m.num_experts - m.experts_per_token) // m.num_experts


def _count_params(cfg: Config) -> dict:
    import flax.linen as nn

    from t5x_lite.models import abstract_params

    leaves = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract_params(cfg)))[0]
    sizes = [math.prod(x.shape) for _, x in leaves]
    total = sum(sizes)
    embedding = sum(s for (path, _), s in zip(leaves, sizes) if path[-1].key in EMBEDDING_LEAVES)
    stack = sum(s for (path, _), s in zip(leaves, sizes) if any(k.key == "stack" for k in path))
    # a mixture of experts' expert weights (not the router, not a shared expert)
    experts = sum(s for (path, _), s in zip(leaves, sizes)
                  if cfg.model.num_experts and len(path) >= 3 and path[-3].key == "mlp"
                  and path[-2].key in ("wi_0", "wi_1", "wi", "wo"))
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding, "stack": stack,
            "experts": experts}


@dataclasses.dataclass(frozen=True)
class StateBytes:
    """Bytes of the whole model's training state (summed over the model, not per device)."""

    params: float
    grads: float
    opt_state: float

    @classmethod
    def mixed_precision_adam(cls, num_params: float) -> "StateBytes":
        """The ZeRO paper's accounting: 2 (fp16 weights) + 2 (fp16 grads) + 12 (fp32 master
        weights, momentum, variance) bytes per parameter."""
        return cls(2.0 * num_params, 2.0 * num_params, 12.0 * num_params)

    @classmethod
    def of_config(cls, cfg: Config) -> "StateBytes":
        """What this trainer allocates: params and grads in ``param_dtype`` (with LoRA, grads of
        the adapters alone), the optimizer's real state (``eval_shape`` of its init)."""
        import flax.linen as nn

        from t5x_lite import lora
        from t5x_lite.models import abstract_params
        from t5x_lite.optim import make_optimizer

        params = nn.meta.unbox(abstract_params(cfg))
        opt_state = jax.eval_shape(make_optimizer(cfg)[0].init, params)
        p = _tree_bytes(params)
        g = _tree_bytes(lora.trained(cfg, params))
        return cls(float(p), float(g), float(_tree_bytes(opt_state)))


def _tree_bytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def zero_stage_bytes(state: StateBytes, stage: int, param_shards: int, opt_shards: Optional[int] = None,
                     tensor: int = 1) -> dict:
    """Per-device bytes of params / grads / optimizer state at ZeRO ``stage`` (table above)."""
    opt_shards = param_shards if opt_shards is None else opt_shards
    return {
        "params": state.params / (tensor * (param_shards if stage == 3 else 1)),
        "grads": state.grads / (tensor * (opt_shards if stage >= 2 else 1)),
        "opt_state": state.opt_state / (tensor * (opt_shards if stage >= 1 else 1)),
    }


# ---------------------------------------------------------------------- activations


def uses_flash_attention(cfg: Config, platform: str) -> bool:
    """Whether ``layers.dot_product_attention`` takes the cuDNN path (no score matrix kept; a
    relative-position or ALiBi bias goes to the kernel too). Training with attention dropout
    attends on XLA's path."""
    m = cfg.model
    return (platform == "gpu" and m.attention in ("cudnn", "auto", "cudnn_packed")
            and m.dtype in ("bfloat16", "float16") and m.attention_dropout == 0 and not m.attn_logit_softcap)


def _per_shard(size: int, tensor: int) -> float:
    """A dimension's share of one tensor shard (the rules split only dimensions ``tensor`` divides)."""
    return size / tensor if size % tensor == 0 else float(size)


def _layer_bytes(cfg: Config, keys: int, tensor: int, flash: bool, cross_keys: int = 0) -> tuple[float, float]:
    """Bytes per token of one layer: (everything the backward pass reads, weight-matmul outputs)."""
    m = cfg.model
    a = _dtype_bytes(m.dtype)
    d = m.d_model
    n = _per_shard(m.num_heads, tensor)
    q = n * m.dim_per_head
    kv = _per_shard(m.kv_heads, tensor) * m.dim_per_head
    f = _per_shard(m.d_ff, tensor)

    def probs(s):  # flash: one float32 statistic per query, head and packed document slot
        return 4 * n * max(m.packed_slots, 1) if flash else n * s * (4 + a)

    kernel_kept = flash and m.remat == "minimal"  # cuDNN's output and statistic are kept too

    mlp_everything, mlp_dots = a * mlp_tensors(m) * f, a * (2 if m.gated_mlp else 1) * f
    if m.num_experts:
        mlp_everything, mlp_dots = _moe_bytes(cfg, keys, tensor)
    everything = (2 * a + 16) * d + a * (2 * q + 2 * kv) + mlp_everything + probs(keys)
    dots = a * (2 * d + q + 2 * kv) + mlp_dots
    dots += (a * q + probs(keys)) if kernel_kept else 0
    if cross_keys:
        everything += (a + 8) * d + 2 * a * q + probs(cross_keys)
        dots += a * (d + q) + ((a * q + probs(cross_keys)) if kernel_kept else 0)
    return everything, dots


def _moe_bytes(cfg: Config, length: int, tensor: int) -> tuple[float, float]:
    """A mixture-of-experts MLP's bytes per token (as ``_layer_bytes``): ``r = E x C / S``
    expert slots per token (``k x capacity factor``; ``E`` dropless) of hidden activations and
    expert inputs / outputs, the ``[S, E, C]`` dispatch and combine tensors (one float32 copy
    and two in the compute dtype) and the router's top-k bookkeeping. Only the router's matmul has no batch
    dimension: the remat policies keep its output and recompute the experts'."""
    from t5x_lite.models.moe import expert_capacity, group_size

    m = cfg.model
    a, e = _dtype_bytes(m.dtype), m.num_experts
    slots = e * expert_capacity(m, group_size(m, length))
    r = slots / group_size(m, length)
    f = _per_shard(m.expert_width, tensor)
    everything = (r * a * (mlp_tensors(m) * f + 2 * m.d_model) + slots * (4 + 2 * a)
                  + e * 4 * (6 * m.experts_per_token + 2))
    shared = _per_shard(m.shared_expert_d_ff, tensor)  # an always-on expert: a dense MLP's activations
    gated = 2 if m.gated_mlp else 1
    return everything + a * mlp_tensors(m) * shared, a * (e + gated * shared)


def mlp_tensors(m) -> int:
    """``[tokens, d_ff]`` tensors an MLP keeps for its backward pass, its temporaries included:
    6 as autodiff leaves them; where the activation is computed again in the backward pass
    (``layers.recomputes_activation``) it keeps only its inputs (a small decoder without remat,
    float32 on the CPU: 5.5 -> 4)."""
    return ((2 if m.gated_mlp else 1) + 2) if recomputes_activation(m) else 6


def activation_bytes_per_row(cfg: Config, tensor: int = 1, flash: bool = False) -> float:
    """Activation bytes one device keeps per sequence of its micro-batch (module docstring)."""
    m = cfg.model
    a = _dtype_bytes(m.dtype)

    def stack(tokens: int, layers: int, cross_keys: int = 0) -> float:
        everything, dots = _layer_bytes(cfg, tokens, tensor, flash, cross_keys)
        mask = (5 * _per_shard(m.num_heads, tensor) if m.remat == "none" and not flash else 1) * tokens
        kept = {"none": layers * everything + everything - dots,
                "minimal": layers * dots + everything - dots,
                "dots": layers * dots + everything - dots,
                "full": layers * a * m.d_model + everything}[m.remat]
        return tokens * (kept + mask)

    def head(tokens: int) -> float:
        """Final norm for every token; logits only where the loss is computed at once: the
        MLM's scored positions (``losses.max_scored_positions``), one ``train.loss_chunk``."""
        scored = max_scored_positions(tokens, cfg.data.mlm_rate) if cfg.objective == "mlm" else tokens
        if cfg.train.loss_chunk:
            scored = min(scored, cfg.train.loss_chunk)
        return (tokens * m.d_model + scored * _per_shard(m.vocab_size, tensor)) * (a + 8)

    if m.family != "encoder_decoder":
        return stack(cfg.data.seq_len, m.num_layers) + head(cfg.data.seq_len)
    t_enc, t_dec = cfg.data.seq_len, target_length(cfg)
    cross_kv = 0 if m.remat == "full" else m.decoder_layers * t_enc * 2 * _per_shard(m.kv_heads, tensor) \
        * m.dim_per_head * a
    return stack(t_enc, m.num_layers) + stack(t_dec, m.decoder_layers, t_enc) + cross_kv + head(t_dec)


def weight_copy_bytes(cfg: Config, counts: dict, stage: int, tensor: int, param_shards: int) -> float:
    """Weight buffers beyond the stored params: without remat, the compute-dtype copies of every
    weight (when ``dtype`` differs from ``param_dtype``; sharded like the params, since XLA
    shards after JAX has chosen what to save); at stage 3, one layer gathered in full, and with a
    chunked loss the output layer's weight and gradient in full."""
    m = cfg.model
    copies = 0.0
    if m.remat == "none" and m.dtype != m.param_dtype:
        copies += counts["total"] * _dtype_bytes(m.dtype) / (tensor * (param_shards if stage == 3 else 1))
    if stage == 3:
        layers = m.num_layers + (m.decoder_layers if m.family == "encoder_decoder" else 0)
        gathered = counts["stack"] - (counts["experts"] if cfg.sharding.expert_parallel else 0)  # experts stay put
        copies += gathered / layers * _dtype_bytes(m.param_dtype) / tensor
        if cfg.train.loss_chunk:
            # The chunked loss is a scan: the output layer's weight stays gathered in full across
            # its chunks, and its gradient accumulates in full in the scan's carry.
            copies += 2 * m.vocab_size * m.d_model * _dtype_bytes(m.param_dtype) / tensor
    return copies


def rows_per_device(cfg: Config, data: int, fsdp: int) -> tuple[int, Optional[str]]:
    """Sequences of one micro-batch on one device, and a note when the batch does not split."""
    per_micro = cfg.train.batch_size // cfg.train.micro_batches
    shards = data * fsdp
    if per_micro % shards == 0:
        return per_micro // shards, None
    rows = max(1, math.ceil(per_micro / shards))
    return rows, (f"train.batch_size={cfg.train.batch_size} / micro_batches={cfg.train.micro_batches} does not "
                  f"split over data x fsdp = {shards} devices; the table assumes {rows} sequence(s) per device "
                  f"(global batch {rows * shards * cfg.train.micro_batches})")


# --------------------------------------------------------------------------- plans


def memory_plan(cfg: Config, num_devices: int, usable_bytes: float, precision: str = "config",
                platform: str = "gpu", counts: Optional[dict] = None) -> dict:
    """Per-device bytes by kind for every ZeRO stage at ``num_devices``, whether each fits in
    ``usable_bytes`` and the largest micro-batch (sequences per device) that does."""
    counts = counts or param_counts(cfg)
    data, fsdp, tensor = partitioning.resolve_mesh_shape(cfg, num_devices)
    opt_shards = data * fsdp if cfg.sharding.shard_opt_over_data else fsdp
    if precision == "mixed":
        state = StateBytes.mixed_precision_adam(counts["total"])
    elif precision == "config":
        state = StateBytes.of_config(cfg)
    else:
        raise ValueError(f"precision={precision!r}: expected 'config' or 'mixed'")
    rows, note = rows_per_device(cfg, data, fsdp)
    per_row = activation_bytes_per_row(cfg, tensor, uses_flash_attention(cfg, platform))
    stages = {}
    # sharding.expert_parallel: the experts' share of the state is split over fsdp at every stage
    ep_share = counts["experts"] / counts["total"] if cfg.sharding.expert_parallel else 0.0
    rest = StateBytes(*(x * (1 - ep_share) for x in dataclasses.astuple(state)))
    experts = StateBytes(*(x * ep_share for x in dataclasses.astuple(state)))
    for stage in STAGES:
        kinds = zero_stage_bytes(rest, stage, fsdp, opt_shards, tensor)
        if ep_share:
            kinds = {k: v + zero_stage_bytes(experts, 3, fsdp, fsdp, tensor)[k] for k, v in kinds.items()}
        if cfg.train.micro_batches > 1:
            kinds["grads"] *= 2
        copies = weight_copy_bytes(cfg, counts, stage, tensor, fsdp)
        kinds["activations"] = rows * per_row + copies
        kinds["total"] = sum(kinds.values())
        room = usable_bytes - (kinds["params"] + kinds["grads"] + kinds["opt_state"] + copies)
        stages[str(stage)] = dict(kinds, fits=kinds["total"] <= usable_bytes,
                                  max_micro_batch=max(0, int(room // per_row)) if math.isfinite(room) else None)
    return {"mesh": {"data": data, "fsdp": fsdp, "tensor": tensor}, "rows_per_device": rows,
            "activation_bytes_per_row": per_row, "batch_note": note, "stages": stages}


def compute_budget(flops_per_token: float, num_params: float, tokens: Optional[float], gpus: int,
                   peak_tflops: float, mfu: float) -> dict:
    """Tokens (Chinchilla's 20 per parameter unless given), total FLOPs, PF-days, wall-clock hours
    at ``mfu`` of ``gpus x peak_tflops``, and the compute-optimal size for that compute."""
    chinchilla = CHINCHILLA_TOKENS_PER_PARAM * num_params
    tokens = float(tokens) if tokens else float(chinchilla)
    total = flops_per_token * tokens
    return {"flops_per_token": flops_per_token, "chinchilla_tokens": chinchilla, "tokens": tokens,
            "total_flops": total, "pf_days": total / PF_DAY,
            "wall_clock_hours": total / (gpus * peak_tflops * 1e12 * mfu) / 3600, "gpus": gpus,
            "peak_tflops": peak_tflops, "mfu": mfu,
            "compute_optimal_params": math.sqrt(total / (6 * CHINCHILLA_TOKENS_PER_PARAM))}  # C = 6ND, D = 20N


def compute_plan(cfg: Config, num_params: int, gpus: int, peak_tflops: float, mfu: float,
                 tokens: Optional[float] = None) -> dict:
    """``compute_budget`` at the config's FLOPs per token (the training log's count), and steps."""
    per_step = tokens_per_step(cfg)
    out = compute_budget(train_flops_per_step(cfg) / per_step, num_params, tokens, gpus, peak_tflops, mfu)
    return dict(out, tokens_per_step=per_step, steps=math.ceil(out["tokens"] / per_step))


def sharded_state_bytes(cfg: Config, num_devices: int) -> dict:
    """Exact per-device params / grads / optimizer bytes of the config's ZeRO stage from the
    trainer's own shardings on an abstract mesh of ``num_devices`` (no devices needed)."""
    from jax.sharding import AbstractMesh

    from t5x_lite.trainer import make_setup

    mesh = AbstractMesh(partitioning.resolve_mesh_shape(cfg, num_devices), partitioning.MESH_AXES)
    return make_setup(cfg, mesh).bytes_per_device()


def formula_plan(cfg: Config, gpus: int, gpu_memory_gb: float = 80.0, peak_tflops: float = H100_BF16_TFLOPS,
                 mfu: float = 0.4, tokens: Optional[float] = None, precision: str = "config",
                 memory_fraction: float = JAX_MEMORY_FRACTION, platform: str = "gpu") -> dict:
    """Everything ``plan`` answers without compiling: parameters, FLOPs, memory by ZeRO stage
    and compute budget for ``gpus`` devices of ``gpu_memory_gb`` GB."""
    counts = param_counts(cfg)
    usable = gpu_memory_gb * GB * memory_fraction
    memory = memory_plan(cfg, gpus, usable, precision, platform, counts)
    sizes = sharded_state_bytes(cfg, gpus)
    plan = {
        "family": cfg.model.family,
        "zero_stage": cfg.sharding.zero_stage,
        "num_devices": gpus,
        "gpu_memory_gb": gpu_memory_gb,
        "memory_fraction": memory_fraction,
        "usable_bytes": usable,
        "precision": precision,
        "platform": platform,
        "remat": cfg.model.remat,
        "seq_len": cfg.data.seq_len,
        "num_params": counts["total"],
        "embedding_params": counts["embedding"],
        "non_embedding_params": counts["non_embedding"],
        "active_params": active_params(cfg, counts["total"]),
        "flops_per_token_6n": 6.0 * (counts["non_embedding"] if not cfg.model.num_experts
                                     else active_params(cfg, counts["total"]) - counts["embedding"]),
        "model_flops_per_step": train_flops_per_step(cfg),
        "params_bytes_per_device": sizes["params"],
        "grads_bytes_per_device": sizes["grads"],
        "opt_state_bytes_per_device": sizes["opt_state"],
        "state_bytes_per_device": sizes["params"] + sizes["opt_state"],
    }
    plan.update(memory)
    plan.update(compute_plan(cfg, counts["total"], gpus, peak_tflops, mfu, tokens))
    return plan


def compiled_plan(cfg: Config, devices: Optional[Sequence[jax.Device]] = None) -> dict:
    """Compile the train step ahead of time on ``devices`` (default: all) without allocating
    the model, and report per-device state bytes from the actual shardings next to the
    compiler's own memory analysis."""
    from t5x_lite.trainer import compile_train_step, compiled_stats, make_setup

    mesh = partitioning.make_mesh(cfg, devices)
    setup = make_setup(cfg, mesh)
    sizes = setup.bytes_per_device()
    t0 = time.perf_counter()
    stats = compiled_stats(compile_train_step(setup))
    num_params = sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))
    return {
        "mesh": dict(mesh.shape),
        "num_devices": int(mesh.size),
        "platform": mesh.devices.flat[0].platform,
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
        "compile_seconds": time.perf_counter() - t0,
        "model_flops_per_step": train_flops_per_step(cfg),
        "tokens_per_step": tokens_per_step(cfg),
    }


def compiler_check(cfg: Config, devices: Optional[Sequence[jax.Device]] = None) -> dict:
    """The compiled step on the local ``devices`` next to the formula for the same mesh and
    stage: state (params + optimizer state: the step's arguments less the batch shard and the
    step counter) and grads + activations (what lives in the compiler's temp buffers)."""
    from t5x_lite.trainer import batch_shapes

    compiled = compiled_plan(cfg, devices)
    memory = memory_plan(cfg, compiled["num_devices"], math.inf, platform=compiled["platform"])
    stage = memory["stages"][str(cfg.sharding.zero_stage)]
    batch_shard = _tree_bytes(batch_shapes(cfg)) // (compiled["mesh"]["data"] * compiled["mesh"]["fsdp"])
    step_counter = 4
    return dict(compiled, formula_state_bytes=stage["params"] + stage["opt_state"],
                formula_temp_bytes=stage["grads"] + stage["activations"],
                compiled_state_bytes=(compiled["compiled_argument_bytes"] or 0) - batch_shard - step_counter)


# ---------------------------------------------------------------------------- CLI


def run_plan_cli(args) -> int:
    """``t5x-lite plan``: the formula plan at ``--gpus`` (default: the local devices), then,
    unless ``--no-compile``, the train step compiled on the local devices beside the formula."""
    from t5x_lite.config import ConfigError, load_config

    for flag, value in (("--gpus", args.gpus), ("--gpu-memory-gb", args.gpu_memory_gb),
                        ("--peak-tflops", args.peak_tflops), ("--tokens", args.tokens)):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag}={value} must be positive")
    for flag, value in (("--mfu", args.mfu), ("--memory-fraction", args.memory_fraction)):
        if not 0 < value <= 1:
            raise ConfigError(f"{flag}={value} must be in (0, 1]")
    cfg = load_config(args.config, args.overrides)
    local = jax.devices()
    if args.gpus is None:
        partitioning.make_mesh(cfg, local)  # planning for these devices: the config must run on them
    gpus = args.gpus or len(local)
    platform = "gpu" if args.gpus else local[0].platform
    plan = formula_plan(cfg, gpus, args.gpu_memory_gb, args.peak_tflops, args.mfu, args.tokens, args.precision,
                        args.memory_fraction, platform)
    plan["compiled"] = None if args.no_compile else _try_compile(cfg, local)
    if plan["compiled"] is not None and "error" not in plan["compiled"]:
        plan.update({k: v for k, v in plan["compiled"].items() if k.startswith("compiled_")})
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def _try_compile(cfg: Config, devices) -> dict:
    """The compiler check, or why the local devices cannot run it (the formula still stands)."""
    from t5x_lite.config import ConfigError

    try:
        return compiler_check(cfg, devices)
    except ConfigError as e:
        return {"error": f"not compiled on the {len(devices)} local devices: {e}"}


def _size(n: Optional[float]) -> str:
    """Decimal units, as GPU memory is sold (80 GB = 80e9 bytes)."""
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_plan(plan: dict) -> str:
    """The plan as the text ``t5x-lite plan`` prints."""
    mesh = " x ".join(f"{k}={v}" for k, v in plan["mesh"].items())
    hours = plan["wall_clock_hours"]
    lines = [
        f"plan: {plan['family']}, {plan['num_devices']} {plan['platform']} device(s) of {plan['gpu_memory_gb']:g} GB "
        f"({_size(plan['usable_bytes'])} usable at memory fraction {plan['memory_fraction']:g}), mesh {mesh}",
        "",
        "model",
        f"  parameters      {plan['num_params']:,} (embedding {plan['embedding_params']:,}, "
        f"non-embedding {plan['non_embedding_params']:,})"
        + (f"; {plan['active_params']:,} active per token (the experts it is routed to)"
           if plan.get("active_params") is not None else ""),
        f"  FLOPs / token   {plan['flops_per_token']:.4g} " + (
            "(per encoder or decoder position; each passes through one of the two stacks)"
            if plan["family"] == "encoder_decoder" else
            f"(6N = {plan['flops_per_token_6n']:.4g} for the non-embedding N"
            + (" active per token" if plan.get("active_params") is not None else "")
            + "; the rest is attention and the output layer)"),
        f"  tokens / step   {plan['tokens_per_step']:,}",
        "",
        f"memory per device ({plan['precision']} precision, remat {plan['remat']}, {plan['rows_per_device']} "
        f"sequence(s) of {plan['seq_len']} per device and micro-batch)",
    ]
    header = ("stage", "params", "grads", "opt state", "activations", "total", "fits", "max micro-batch")
    rows = [header] + [
        (key, _size(st["params"]), _size(st["grads"]), _size(st["opt_state"]), _size(st["activations"]),
         _size(st["total"]), "yes" if st["fits"] else "NO", str(st["max_micro_batch"]))
        for key, st in plan["stages"].items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  " + "  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    if plan["batch_note"]:
        lines.append(f"  note: {plan['batch_note']}")
    lines += [
        f"  stage {plan['zero_stage']} (configured) from the trainer's shardings: params "
        f"{_size(plan['params_bytes_per_device'])}, grads {_size(plan['grads_bytes_per_device'])}, "
        f"optimizer {_size(plan['opt_state_bytes_per_device'])}",
        "",
        "compute",
        f"  tokens          {plan['tokens']:.4g} (Chinchilla-optimal: {plan['chinchilla_tokens']:.4g}, "
        f"{CHINCHILLA_TOKENS_PER_PARAM} per parameter)",
        f"  total FLOPs     {plan['total_flops']:.4g} = {plan['pf_days']:.4g} PF-days in {plan['steps']:,} steps",
        f"  wall clock      {hours:.4g} h ({hours / 24:.3g} days) on {plan['gpus']} device(s) at {plan['mfu']:.0%} MFU "
        f"of {plan['peak_tflops']:g} TFLOP/s",
        f"  optimal size    {plan['compute_optimal_params']:.4g} parameters for this compute (Chinchilla)",
    ]
    return "\n".join(lines + _format_compiled(plan.get("compiled")))


def _format_compiled(c: Optional[dict]) -> list[str]:
    if c is None:
        return []
    if "error" in c:
        return ["", f"compiler check: {c['error']}"]
    mesh = " x ".join(f"{k}={v}" for k, v in c["mesh"].items())

    def row(name, formula, compiled):
        ratio = f"{compiled / formula:.2f}x" if formula and compiled is not None else "-"
        return f"  {name:<30}{_size(formula):>12}{_size(compiled):>12}{ratio:>8}"

    return ["", f"checked against the compiler: {c['num_devices']} local {c['platform']} device(s), mesh {mesh}, "
                f"stage {c['zero_stage']}, compiled in {c['compile_seconds']:.1f} s",
            f"  {'per device':<30}{'formula':>12}{'compiled':>12}{'ratio':>8}",
            row("params + optimizer state", c["formula_state_bytes"], c["compiled_state_bytes"]),
            row("grads + activations (temp)", c["formula_temp_bytes"], c["compiled_temp_bytes"])]
