"""Train state, the compiled train and eval steps, and the training loop.

One ``jax.jit``-compiled step does everything: a ``lax.scan`` over micro-batches accumulates
gradient *sums* (so accumulation equals one big batch), the gradients are constrained to their
ZeRO sharding, and the optimizer updates the donated state in place. It is compiled ahead of
time (``.lower().compile()``) so memory and FLOPs are known before the first step runs. The
loop fetches step n-1's metrics only after step n is dispatched: the device never waits on
Python.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t5x_lite import lora, partitioning
from t5x_lite.models import moe
from t5x_lite.checkpoints import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    Checkpoints,
    abstract_with_shardings,
    check_resume,
    read_config,
    read_params,
    run_meta,
)
from t5x_lite.config import COMPUTE_ONLY, Config, ConfigError, config_diff, config_from_dict, parse_override
from t5x_lite.losses import chunked_cross_entropy_sums, cross_entropy_sums, masked_cross_entropy_sums
from t5x_lite.metrics import (
    REPEAT_EPOCHS,
    peak_flops,
    METRICS_FILE,
    Logger,
    MetricsWriter,
    human_bytes,
    progress_bar,
    tokens_per_step,
    train_flops_per_step,
)
from t5x_lite.models import abstract_params, build_model, init_fn, jit_init, model_kwargs
from t5x_lite.models.layers import jnp_dtype
from t5x_lite.optim import loss_scale_of, make_optimizer
from t5x_lite.profiling import CAST_SCOPE



@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def split_micro_batches(x: jax.Array, num: int) -> jax.Array:
    """``[B, ...] -> [num, B/num, ...]``, micro-batch m taking rows m, m+num, m+2*num, ...

    Strided rather than contiguous: with the batch split over devices, every micro-batch then
    takes an equal share of each device's rows and no data moves between devices."""
    return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)


@dataclasses.dataclass
class TrainSetup:
    """Everything derived from (config, mesh): model, optimizer, shardings, jitted functions."""

    cfg: Config
    mesh: Mesh
    model: nn.Module
    eval_model: nn.Module
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    rules: tuple
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    state_shardings: TrainState
    grad_shardings: Any
    batch_sharding: NamedSharding
    init: Callable
    train_step: Callable
    eval_step: Callable

    @property
    def param_shardings(self):
        return self.state_shardings.params

    def bytes_per_device(self) -> dict:
        s = self.abstract_state
        trained = lambda tree: lora.trained(self.cfg, tree)  # LoRA: the adapters' gradients alone
        return {
            "params": partitioning.bytes_per_device(s.params, self.state_shardings.params),
            "grads": partitioning.bytes_per_device(trained(s.params), trained(self.grad_shardings)),
            "opt_state": partitioning.bytes_per_device(s.opt_state, self.state_shardings.opt_state),
        }

    def activation_context(self):
        """Mesh + logical rules needed while tracing the model (activation constraints)."""
        return partitioning.mesh_rules(self.mesh, self.rules)


MATMUL_LEAVES = ("kernel", "embedding")  # weights a layer only ever uses in its compute dtype


def cast_for_compute(cfg: Config) -> Callable:
    """``params -> params`` with every matmul weight and embedding table cast to the compute
    dtype once per step, before the layer scan (and, under ZeRO-3, before the all-gathers,
    which then move half the bytes). The layers cast these weights at use anyway, so the
    numbers are unchanged; norm scales and biases stay in ``param_dtype``."""
    if cfg.model.dtype == cfg.model.param_dtype:
        return lambda params: params
    dtype = jnp_dtype(cfg.model.dtype)

    def cast(path, x):
        return x.astype(dtype) if getattr(path[-1], "key", None) in MATMUL_LEAVES else x

    def cast_all(params):
        with jax.named_scope(CAST_SCOPE):  # what profiles and the offline pricing name these kernels by
            return jax.tree_util.tree_map_with_path(cast, params)

    return cast_all


ROUTER_SUMS = (moe.AUX_LOSS, moe.Z_LOSS, moe.CHOICES, moe.DROPPED)  # a mixture of experts' sown sums
IMBALANCE = "router_imbalance"  # the busiest expert's load over the mean (metrics)


def make_loss_fn(cfg: Config, model: nn.Module) -> Callable:
    """``(params, batch, rng) -> sums`` of loss / weight / correct over the batch."""
    family, chunk = cfg.model.family, cfg.train.loss_chunk
    cast = cast_for_compute(cfg)
    loss_kwargs = dict(z_loss=cfg.train.z_loss, label_smoothing=cfg.train.label_smoothing)
    masked_lm = cfg.objective == "mlm"

    experts = bool(cfg.model.num_experts)

    def forward(variables, inputs, rng, method=None):
        """The model's output, and (mixture of experts) its router statistics: sums over the
        layers' routing groups of the load-balancing loss, of the choices made and dropped."""
        if not experts:
            return model.apply(variables, **inputs, rngs={"dropout": rng}, method=method), {}
        out, state = model.apply(variables, **inputs, rngs={"dropout": rng}, method=method, mutable=["intermediates"])
        inter = state.get("intermediates", {})
        loads = dict(moe.sown_loads(inter))  # each MoE layer's, by module path
        return out, {**{key: moe.sown_total(inter, key) for key in ROUTER_SUMS}, moe.LOAD: loads}

    def loss_sums(params, batch, rng):
        variables = {"params": cast(params)}
        inputs = model_kwargs(family, batch)
        if not chunk and not masked_lm:
            logits, router = forward(variables, inputs, rng)
            sums = cross_entropy_sums(logits, batch["targets"], batch["weights"], **loss_kwargs)
        else:
            hidden, router = forward(variables, inputs, rng, method="hidden")
            head = lambda h: model.apply(variables, h, method="logits_from_hidden")
            if masked_lm:  # the vocabulary head only where the objective scores (~15% of positions)
                sums = masked_cross_entropy_sums(hidden, head, batch["targets"], batch["weights"], cfg.data.mlm_rate,
                                                 chunk, **loss_kwargs)
            else:
                sums = chunked_cross_entropy_sums(hidden, head, batch["targets"], batch["weights"], chunk,
                                                  **loss_kwargs)
        return dict(sums, **router)  # router statistics: sums too, so micro-batches add up

    return loss_sums


def router_metrics(cfg: Config, sums: dict) -> dict:
    """Mixture of experts: the load-balancing loss (mean over routing groups and layers) and
    the share of router choices dropped for capacity, from a step's sums."""
    if not cfg.model.num_experts:
        return {}
    groups = moe.num_groups(cfg.model, batch_shapes(cfg))
    loads = jnp.concatenate([load.reshape(-1, load.shape[-1]) for load in sums[moe.LOAD].values()])
    # the busiest expert's load over the mean, averaged over the MoE layers (1: even)
    imbalance = jnp.mean(jnp.max(loads, axis=-1) / jnp.maximum(jnp.mean(loads, axis=-1), 1e-9))
    return {moe.AUX_LOSS: sums[moe.AUX_LOSS] / groups, moe.Z_LOSS: sums[moe.Z_LOSS] / groups,
            moe.DROPPED: sums[moe.DROPPED] / jnp.maximum(sums[moe.CHOICES], 1.0), IMBALANCE: imbalance}


def training_objective(cfg: Config, sums: dict, weight: jax.Array) -> jax.Array:
    """What the train step differentiates: the loss sum, plus (mixture of experts) the router's
    load-balancing and z-loss sums times ``model.router_aux_loss`` / ``router_z_loss`` x the
    batch's loss ``weight`` / its routing groups, so that after the division by ``weight`` each
    is its mean over groups, whatever the micro-batches."""
    m = cfg.model
    if not (m.num_experts and (m.router_aux_loss or m.router_z_loss)):
        return sums["loss"]
    per_group = weight / moe.num_groups(m, batch_shapes(cfg))
    return sums["loss"] + (m.router_aux_loss * sums[moe.AUX_LOSS] + m.router_z_loss * sums[moe.Z_LOSS]) * per_group


def make_train_step(cfg: Config, model: nn.Module, tx: optax.GradientTransformation, schedule, grad_shardings,
                    mesh: Mesh) -> Callable:
    loss_sums = make_loss_fn(cfg, model)
    num_micro = cfg.train.micro_batches
    loss_positions = math.prod(batch_shapes(cfg)["targets"].shape)
    micro_sharding = NamedSharding(mesh, P(None, partitioning.BATCH_AXES))

    with_lora = bool(cfg.model.lora_rank)
    # LoRA: gradients of the adapters alone (None elsewhere), filled with zeros for the optimizer at the end
    acc_shardings = lora.trained(cfg, grad_shardings)

    def grad_sums(params, batch, rng, scale, weight):
        def loss_of(p):
            p = lora.with_frozen(p, params) if with_lora else p
            sums = loss_sums(p, batch, rng)
            return training_objective(cfg, sums, weight) * scale, sums  # float16: the backward pass runs scaled

        grads, sums = jax.grad(loss_of, has_aux=True)(lora.trained(cfg, params))
        return grads, sums

    def train_step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(jax.random.key(cfg.train.seed, impl=cfg.train.dropout_rng), state.step)
        scaling = loss_scale_of(state.opt_state)
        # Loss scaling / float16: the loss *sum* runs backward times loss_scale / (batch x target
        # length), so the float16 gradients are the mean loss's times loss_scale (1 without
        # scaling), not growing with the batch; float32 / bfloat16 without scaling: the sum as is.
        scale = jnp.float32(1.0)
        if scaling is not None or cfg.model.dtype == "float16":
            scale = (jnp.float32(1.0) if scaling is None else scaling.scale) / loss_positions
        weight = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)  # the denominator below
        if num_micro == 1:
            grads, sums = grad_sums(state.params, batch, rng, scale, weight)
        else:
            micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
                split_micro_batches(x, num_micro), micro_sharding), batch)

            def accumulate(carry, xs):
                index, mb = xs
                grads, sums = grad_sums(state.params, mb, jax.random.fold_in(rng, index), scale, weight)
                acc_grads = jax.tree.map(jnp.add, carry[0], grads)
                acc_grads = jax.lax.with_sharding_constraint(acc_grads, acc_shardings)
                return (acc_grads, jax.tree.map(jnp.add, carry[1], sums)), None

            zero_grads = jax.tree.map(jnp.zeros_like, lora.trained(cfg, state.params))
            # the sums (and a mixture of experts' router statistics) of the shapes the loss returns
            shapes = jax.eval_shape(loss_sums, state.params, jax.tree.map(lambda x: x[0], micro), rng)
            zero_sums = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
            (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums), (jnp.arange(num_micro), micro))
        denom = jnp.maximum(sums["weight"], 1.0)
        if with_lora:
            grads = lora.zeros_for_frozen(grads, state.params)
        grads = jax.tree.map(lambda g: g / (denom * scale), grads)
        # ZeRO-2/3: each device keeps only its shard of the gradient (reduce-scatter).
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if cfg.model.router_bias_update:  # loss-free balancing: the routing biases follow the step's loads
            params = moe.update_router_bias(cfg.model, params, sums[moe.LOAD].items())
        metrics = {
            "loss": sums["loss"] / denom,
            "z_loss": sums["z_loss"] / denom,
            "accuracy": sums["correct"] / denom,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step),
            "target_tokens": sums["weight"],
            **router_metrics(cfg, sums),
        }
        if scaling is not None:  # the scale this step ran with; steps skipped so far (overflow)
            metrics.update(loss_scale=scaling.scale, skipped_steps=loss_scale_of(opt_state).inner.total_notfinite)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(cfg: Config, model: nn.Module) -> Callable:
    loss_sums = make_loss_fn(cfg, model)
    return lambda params, batch: loss_sums(params, batch, jax.random.key(0))


def make_setup(cfg: Config, mesh: Mesh) -> TrainSetup:
    """Derive model, optimizer and all shardings, and jit the steps with explicit shardings."""
    model = build_model(cfg, deterministic=cfg.model.dropout == 0.0 and cfg.model.attention_dropout == 0.0)
    eval_model = build_model(cfg.model.for_inference(), deterministic=True)  # experts: eval_capacity_factor
    tx, schedule = make_optimizer(cfg)
    rules = partitioning.logical_rules(cfg, mesh)
    opt_rules = partitioning.logical_rules(cfg, mesh, optimizer=True)

    boxed = abstract_params(cfg)
    params_abstract = nn.meta.unbox(boxed)
    param_sh = partitioning.shardings_from_logical(boxed, mesh, rules)
    opt_abstract = jax.eval_shape(tx.init, params_abstract)
    opt_sh = partitioning.opt_state_shardings(opt_abstract, boxed, mesh, opt_rules)
    grad_sh = param_sh if cfg.sharding.zero_stage < 2 else partitioning.shardings_from_logical(boxed, mesh, opt_rules)
    replicated = NamedSharding(mesh, P())
    state_sh = TrainState(step=replicated, params=param_sh, opt_state=opt_sh)
    abstract_state = abstract_with_shardings(
        TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params_abstract, opt_state=opt_abstract),
        state_sh)
    batch_sh = partitioning.batch_sharding(mesh)

    make_params = init_fn(cfg)

    def init(rng):
        params = nn.meta.unbox(make_params(rng))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    step_fn = make_train_step(cfg, model, tx, schedule, grad_sh, mesh)
    eval_fn = make_eval_step(cfg, eval_model)
    return TrainSetup(
        cfg=cfg, mesh=mesh, model=model, eval_model=eval_model, tx=tx, schedule=schedule, rules=rules,
        abstract_state=abstract_state, state_shardings=state_sh, grad_shardings=grad_sh, batch_sharding=batch_sh,
        init=jit_init(init, out_shardings=state_sh),
        train_step=jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                           donate_argnums=0),
        eval_step=jax.jit(eval_fn, in_shardings=(param_sh, batch_sh), out_shardings=replicated),
    )


def to_global(batch: dict, sharding: NamedSharding) -> dict:
    """This process's rows of the batch -> global arrays sharded over ``data`` x ``fsdp``."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def batch_shapes(cfg: Config) -> dict:
    """The global batch the train step takes: key -> ShapeDtypeStruct (the data pipeline's contract)."""
    b, length = cfg.train.batch_size, cfg.data.seq_len
    i32, f32 = np.int32, np.float32

    def spec(n, dtype=i32):
        return jax.ShapeDtypeStruct((b, n), dtype)

    if cfg.model.family == "encoder_decoder":
        from t5x_lite.metrics import target_length

        t = target_length(cfg)
        return {"encoder_input_ids": spec(length), "encoder_segment_ids": spec(length),
                "encoder_positions": spec(length), "input_ids": spec(t), "targets": spec(t),
                "weights": spec(t, f32), "segment_ids": spec(t), "positions": spec(t)}
    out = {"input_ids": spec(length), "targets": spec(length), "weights": spec(length, f32),
           "segment_ids": spec(length), "positions": spec(length)}
    if cfg.objective == "prefix":
        out["prefix_mask"] = spec(length, np.bool_)
    return out


def check_batch(cfg: Config, local_batch: dict) -> None:
    """The pipeline's batch must match ``batch_shapes`` (per-process rows, same keys and dtypes)."""
    want = batch_shapes(cfg)
    rows = cfg.train.batch_size // jax.process_count()
    got = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in local_batch.items()}
    expect = {k: ((rows,) + v.shape[1:], np.dtype(v.dtype)) for k, v in want.items()}
    if got != expect:
        raise ValueError(f"data pipeline batch {got} does not match the train step's {expect}")


def compile_train_step(setup: TrainSetup, compiler_options: Optional[dict] = None):
    """AOT-compile the train step for the global batch of ``batch_shapes``, with the config's
    ``train.xla_options`` and ``compiler_options`` (XLA options for this compile only, e.g.
    ``{"xla_gpu_enable_dynamic_slice_fusion": "true"}``; these win)."""
    with setup.activation_context():
        shapes = batch_shapes(setup.cfg)
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding)
                    for k, v in shapes.items()}
        lowered = setup.train_step.lower(setup.abstract_state, abstract)
    options = {**setup.cfg.train.compiler_options(), **(compiler_options or {})}
    try:
        return lowered.compile(compiler_options=options or None)
    except Exception as e:  # XLA's error type differs between jax versions
        message = str(e).splitlines()[0] if str(e) else ""
        if any(f"option {name}," in message or f"option: '{name}'" in message
               for name in setup.cfg.train.compiler_options()):  # XLA names the option it refuses
            raise ConfigError(f"train.xla_options={setup.cfg.train.xla_options!r}: {message}") from e
        raise


def _cudnn_failure(error: Exception) -> bool:
    text = str(error).lower()
    return any(word in text for word in ("cudnn", "fmha", "flash attention"))


def compile_or_fall_back(setup: TrainSetup, mesh: Mesh, log: Callable[[str], None] = print):
    """``(setup, compiled train step)``. With ``model.attention=auto`` ("cuDNN where it applies,
    else XLA"), a cuDNN attention kernel that XLA refuses when it compiles for the GPU (after
    the trace-time checks passed: a cuDNN too old for the packed layout, a bias it does not take
    with it) is not fatal: the step is rebuilt with the mask through cuDNN, then with XLA's
    attention, each fallback logged. Other errors, and any error under an explicit choice,
    propagate."""
    attempts = [setup.cfg.model.attention] + (["cudnn", "xla"] if setup.cfg.model.attention == "auto" else [])
    for i, attention in enumerate(attempts):
        try:
            if i:
                cfg = setup.cfg
                setup = make_setup(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=attention)),
                                   mesh)
            return setup, compile_train_step(setup)
        except Exception as e:  # XLA's error type differs between jax versions
            if i == len(attempts) - 1 or (i == 0 and not _cudnn_failure(e)):
                raise  # (a fallback that fails in any way goes on to the next one)
            log(f"warning: the train step with model.attention={attempts[i]} did not compile "
                f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); retrying with model.attention={attempts[i + 1]}")


def compiled_stats(compiled) -> dict:
    """Temp / argument / output bytes and FLOPs the compiler reports (per device)."""
    out = {}
    try:
        mem = compiled.memory_analysis()
        if mem is not None:
            out.update(temp_bytes=int(mem.temp_size_in_bytes), argument_bytes=int(mem.argument_size_in_bytes),
                       output_bytes=int(mem.output_size_in_bytes))
    except Exception:  # some backends don't implement it
        pass
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost and "flops" in cost:
            out["flops"] = float(cost["flops"])
    except Exception:
        pass
    return out


CUDNN_BUILD_S = 1.5  # H100, 2026-11-23: seconds a cuDNN attention call adds to the first step (1.4-1.7 measured)


def cudnn_attention_calls(hlo_text: str) -> int:
    """cuDNN attention calls (forward and backward kernels) in a compiled program's text. XLA builds
    each one's kernels the first time the program runs, not when it compiles: a scanned stack holds
    one of each, its layers unrolled one per layer (H100, 2026-11-23: llama_1b's first step 19 s
    scanned, 66 s with its 16 layers unrolled)."""
    return hlo_text.count('custom_call_target="__cudnn$fmha')


_FMHA_CALL = re.compile(r"= \(([^)]*)\) custom-call\(.*?custom_call_target=\"__cudnn\$fmha(\w+)\"(.*)")


def attention_note(hlo_text: str) -> Optional[str]:
    """What the compiled step's attention runs, read from its cuDNN calls (None: none, XLA's einsums
    attend): forward calls by mask type (PADDING*: a length a row or cuDNN's packed layout of M
    documents; NO_MASK / CAUSAL: a mask, if any, added into a dense bias), how many take a bias,
    and the shapes of the bias gradients (``[1, N, T, S]``: cuDNN sums it over the batch;
    ``[B, ...]``: the mask added in, a gradient per row)."""
    masks, biased, grads = {}, 0, {}
    for results, kernel, rest in _FMHA_CALL.findall(hlo_text):
        if kernel.endswith("Backward"):
            shapes = re.findall(r"\[([\d,]*)\]", results)
            if "Bias" in kernel and len(shapes) >= 5:  # dq, dk, dv, the bias gradient, workspace
                grads[shapes[3]] = grads.get(shapes[3], 0) + 1
            continue
        mask = (re.search(r'"mask_type": ?"(\w+)"', rest) or [None, "?"])[1]
        m = int((re.search(r'"max_seg_per_batch": ?"?(\d+)', rest) or [None, "1"])[1])
        label = f"{mask} (packed layout, M {m})" if m > 1 else mask
        masks[label] = masks.get(label, 0) + 1
        biased += "Bias" in kernel
    if not masks:
        return None
    n = sum(masks.values())
    parts = [f"attention: {n} cuDNN forward call{'s' if n > 1 else ''} a step, mask "
             + ", ".join(f"{k} x{v}" for k, v in sorted(masks.items()))]
    if biased:
        parts.append(f"{biased} with a bias" + ("" if not grads else ", gradients " + ", ".join(
            f"[{shape.replace(',', ', ')}] x{count}" for shape, count in sorted(grads.items()))))
    return "; ".join(parts)


def first_run_note(hlo_text: str) -> Optional[str]:
    n = cudnn_attention_calls(hlo_text)
    if n < 8:  # a scanned model's few: a few seconds, nothing to say
        return None
    return (f"note: the train step holds {n} cuDNN attention calls (the layers as straight code, model.scan_unroll); "
            f"the GPU builds each one's kernels when the step first runs: ~{n * CUDNN_BUILD_S:.0f} s before the first "
            "step ends (model.scan_unroll=1 builds one per stack, for slower steps)")


# ------------------------------------------------------------------------ work dir


def check_workdir_config(cfg: Config, workdir: str) -> Optional[Config]:
    """The config a work dir was started with, after checking that ``cfg`` may continue it.

    Model and data settings must match (the checkpoint and token cache depend on them), except
    how the model computes (``config.COMPUTE_ONLY``: attention kernel, remat, scan unroll); train,
    optimizer, mesh and checkpoint settings may change between runs."""
    if not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
        return None
    saved = read_config(workdir)
    diffs = config_diff(saved, cfg, ignore=COMPUTE_ONLY)
    if diffs:
        raise ConfigError(
            f"work dir {workdir} holds a run with a different model/data config; it would not resume but "
            "start over. Use a new --workdir, or the saved settings. Differences:\n  - " + "\n  - ".join(diffs)
        )
    return saved


def write_workdir_config(cfg: Config, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(cfg.to_yaml())
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


# -------------------------------------------------------------------------- loop


def evaluate(setup: TrainSetup, params, eval_batches, num_batches: int) -> dict:
    """Mean loss / accuracy / perplexity over the held-out batches."""
    totals = None
    with setup.activation_context():
        for i in range(num_batches):
            batch = to_global(eval_batches(i, jax.process_index(), jax.process_count()), setup.batch_sharding)
            sums = setup.eval_step(params, batch)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    weight = max(float(totals["weight"]), 1.0)
    loss = float(totals["loss"]) / weight
    return {"eval_loss": loss, "eval_accuracy": float(totals["correct"]) / weight,
            "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": float(totals["weight"])}


class StopSignals:
    """SIGTERM (preemption) and SIGINT ask the training loop to stop after the current step; it
    then saves, waits for the commit and returns normally (exit code 0). A second SIGINT
    interrupts at once. With several processes, JAX's preemption service (it watches SIGTERM on
    every host) picks a step that all of them stop after; no handler is installed there."""

    def __init__(self):
        self.received: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def requested(self, step: int) -> bool:
        """Whether to stop after ``step``; every process calls it at every step."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.received = "preemption notice"
        return self.received is not None

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def train(cfg: Config, workdir: str, devices=None, stop_after: Optional[int] = None) -> dict:
    """Train (or resume) ``cfg`` in ``workdir``. ``stop_after``: leave the loop after that many
    steps of this call (tests); the final checkpoint is still written. SIGTERM / SIGINT: stop
    after the current step, save, wait for the commit and return. Returns the last metrics."""
    from t5x_lite.data import make_datasets

    is_main = jax.process_index() == 0
    mesh = partitioning.make_mesh(cfg, devices)  # mesh errors before touching the work dir
    check_workdir_config(cfg, workdir)
    log = Logger(None, enabled=is_main)
    # Several processes (issue 7): process 0 trains the tokenizer, fills the token cache and
    # writes config.yaml first; the others then read what it wrote instead of racing it.
    from t5x_lite.distributed import main_process_first

    with main_process_first("prepare work dir"):
        tokenizer, train_batches, eval_batches = make_datasets(cfg, workdir, log=log)
        if is_main:
            write_workdir_config(cfg, workdir)  # as given: a fitted max_segments is found again on resume
    cfg = cfg.with_max_segments(train_batches.max_segments)  # model.fit_max_segments: the kernel the rows need
    if is_main and not os.path.exists(os.path.join(workdir, TOKENIZER_FILE)):
        tokenizer.save(os.path.join(workdir, TOKENIZER_FILE))  # the work dir is self-contained
    log = Logger(workdir, enabled=is_main)
    meta = run_meta(cfg, train_batches, tokenizer)

    setup = make_setup(cfg, mesh)
    sizes = setup.bytes_per_device()
    log(f"processes={jax.process_count()} devices={jax.device_count()} "
        f"({jax.local_device_count()} per process, {jax.devices()[0].platform})")
    log(f"mesh {partitioning.describe_mesh(mesh)}  zero_stage={cfg.sharding.zero_stage}  "
        f"family={cfg.model.family}  params={_num_params(setup):,}" + (
            f" (LoRA rank {cfg.model.lora_rank}: {_num_params(setup, lora.is_lora):,} trainable)"
            if cfg.model.lora_rank else ""))
    log(f"per device: params {human_bytes(sizes['params'])}  grads {human_bytes(sizes['grads'])}  "
        f"optimizer state {human_bytes(sizes['opt_state'])}")
    m = cfg.model
    if m.num_experts and not m.expert_capacity_factor and m.num_experts >= 2 * m.experts_per_token:
        log(f"note: dropless routing (model.expert_capacity_factor=0, as imported) runs all {m.num_experts} experts "
            f"on every token of a routing group, {m.num_experts / m.experts_per_token:g}x the experts' FLOPs of "
            f"{m.experts_per_token} per token; a capacity factor of 1.25-2 costs 1.25-2x and drops the few choices "
            "over it (the log shows the share)")

    t0 = time.time()
    check_batch(cfg, train_batches(0, jax.process_index(), jax.process_count()))
    setup, compiled = compile_or_fall_back(setup, mesh, log)
    stats = compiled_stats(compiled)
    log(f"compiled train step in {time.time() - t0:.1f}s: temp {human_bytes(stats.get('temp_bytes', 0))}, "
        f"arguments {human_bytes(stats.get('argument_bytes', 0))}, "
        f"model TFLOP/step {train_flops_per_step(cfg) / 1e12:.4g}"
        + (f", XLA options {cfg.train.xla_options.strip()!r}" if cfg.train.xla_options.strip() else ""))
    if jax.default_backend() == "gpu":
        text = compiled.as_text()
        for note in (attention_note(text) or "attention: no cuDNN call in the step (XLA's einsums)",
                     first_run_note(text)):
            if note:
                log(note)

    ckpt = Checkpoints(workdir, cfg)
    restored = ckpt.restore_latest(setup.abstract_state, cfg.checkpoint.fallback, log)
    if restored is not None:
        start, state, saved_meta = restored
        check_resume(saved_meta, meta, f"at step {start} ({ckpt.step_path(start)})", log)
        log(f"resumed from checkpoint at step {start} ({ckpt.directory})")
    else:
        with setup.activation_context():
            state = setup.init(jax.random.key(cfg.train.seed))
        start = 0
    keep_best = cfg.checkpoint.keep_best and eval_batches is not None
    if cfg.checkpoint.keep_best and not keep_best:
        log("note: checkpoint.keep_best needs held-out data (data.eval_fraction > 0); keeping the latest only")
    writer = MetricsWriter(workdir, enabled=is_main, resume_step=start)

    steps = cfg.train.steps
    end = steps if stop_after is None else min(steps, start + stop_after)
    epochs_of = lambda n_steps: n_steps * cfg.train.batch_size / train_batches.rows_per_epoch  # (all corpora)
    read = train_batches.epochs_read(steps)  # a corpus (data.mixture: each corpus of the mixture)
    log(f"data: {steps} steps x {cfg.train.batch_size} rows read "
        + "; ".join(f"{name + ': ' if name else ''}the {rows} training rows {times:.2f} times"
                    for name, rows, times in read)
        + (f" (past ~{REPEAT_EPOCHS} epochs repeated tokens are worth less than new ones, and held-out loss drifts "
           "from train loss)" if max(times for _, _, times in read) > REPEAT_EPOCHS else ""))
    tokens = tokens_per_step(cfg)
    flops = train_flops_per_step(cfg)
    peak = peak_flops(jax.devices()[0].device_kind, cfg.train.peak_tflops)
    peak = peak * jax.device_count() if peak else None
    bar = progress_bar(steps, start, enabled=is_main and cfg.train.progress and sys.stdout.isatty())
    last = {}
    pending = None  # (step, metrics on device) of the step before
    warned_input, data_time = False, 0.0  # host seconds making batches since the last finished step
    last_saved = start if restored is not None else None
    t_prev = time.time()

    def finish(pending_item):
        nonlocal t_prev, last, warned_input, data_time
        step, metrics = pending_item
        data, data_time = data_time, 0.0
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        dt, t_prev = now - t_prev, now
        # step_time: from the step before finishing to this one finishing. data_time: the part of
        # it the host spent making and placing batches (the next step's, while the device ran
        # this one): near step_time, the device waits for data (input-bound). A step finished
        # before an eval or at the end has no next batch in its time (data_time 0).
        values.update(step_time=dt, tokens_per_sec=tokens / dt, data_time=data)
        if not warned_input and step > start + 2 and data > 0.5 * dt:
            warned_input = True
            log(f"note: step {step}: making batches took {1000 * data:.0f} ms of a {1000 * dt:.0f} ms step; "
                "once it takes the whole step the device waits for data: data.workers=N makes the coming steps' "
                "batches in N processes" + (f" (now {cfg.data.workers})" if cfg.data.workers else ""))
        if peak:
            values["mfu"] = flops / dt / peak
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_sec']:.0f}",
                        step_ms=f"{1000 * dt:.0f}", data_ms=f"{1000 * data:.0f}", refresh=False)
        if step % cfg.train.log_every == 0 or step == 1 or step == steps:
            writer.write(step, values)
            if bar.disable:  # no terminal (a log file, CI): one line per logged step instead
                log(f"step {step}/{steps}  loss {values['loss']:.4f}  acc {values['accuracy']:.3f}  "
                    f"lr {values['learning_rate']:.2e}  {values['tokens_per_sec']:.0f} tok/s  "
                    f"{1000 * dt:.0f} ms/step (data {1000 * data:.0f} ms)"
                    + (f"  MFU {100 * values['mfu']:.1f}%" if peak else "")
                    + (f"  loss scale {values['loss_scale']:g} ({values['skipped_steps']:.0f} steps skipped)"
                       if "loss_scale" in values else "")
                    + (f"  router balance {values[moe.AUX_LOSS]:.3f} (even: {cfg.model.experts_per_token}), "
                       f"busiest expert {values[IMBALANCE]:.2f}x the mean, "
                       f"{100 * values[moe.DROPPED]:.1f}% of choices dropped" if moe.AUX_LOSS in values else ""))
        last = dict(values, step=step)

    def run_eval(params, step: int) -> dict:
        ev = evaluate(setup, params, eval_batches, cfg.train.eval_batches)
        each = {f"eval_loss/{name}": evaluate(setup, params, batches, cfg.train.eval_batches)["eval_loss"]
                for name, batches in getattr(eval_batches, "corpora", ())}  # data.mixture: a loss a corpus too
        ev.update(each)
        writer.write(step, ev)
        log(f"step {step}: eval_loss {ev['eval_loss']:.4f}  eval_accuracy {ev['eval_accuracy']:.4f}"
            + (f"  ({', '.join(f'{k[10:]} {v:.4f}' for k, v in each.items())})" if each else ""))
        return ev

    def save(state, step: int, ev: Optional[dict]) -> None:
        """Start an async save; with keep_best every checkpoint carries an eval loss."""
        nonlocal last_saved
        if keep_best and ev is None:
            ev = run_eval(state.params, step)
        ckpt.save(step, state, meta, {"eval_loss": ev["eval_loss"]} if keep_best else None)
        last_saved = step

    with StopSignals() as stop, setup.activation_context(), contextlib.ExitStack() as closing:
        source = train_batches
        if cfg.data.workers:
            from t5x_lite.data.prefetch import Prefetcher

            source = closing.enter_context(Prefetcher(train_batches, cfg.data.workers, log))
            log(f"data: {source.workers} worker processes make the batches of the next {source.depth} steps")
        for step in range(start, end):
            t_data = time.perf_counter()
            batch = to_global(source(step, jax.process_index(), jax.process_count()), setup.batch_sharding)
            data_time += time.perf_counter() - t_data
            state, metrics = compiled(state, batch)
            if pending is not None:
                finish(pending)
            pending = (step + 1, metrics)
            done, ev = step + 1, None
            if eval_batches is not None and cfg.train.eval_every and done % cfg.train.eval_every == 0 \
                    and done != end:
                finish(pending)
                pending = None
                ev = run_eval(state.params, done)
                t_prev = time.time()
            if done % cfg.checkpoint.every_steps == 0 and done != end:
                save(state, done, ev)
            if stop.requested(done):
                break
        if pending is not None:
            finish(pending)
        bar.close()

        done, ev = int(jax.device_get(state.step)), None
        if eval_batches is not None and cfg.train.eval_every and done == steps and end > start \
                and stop.received is None:
            ev = run_eval(state.params, done)
            last.update(ev)
        if last:
            last["epochs"] = epochs_of(done)
        if last_saved != done:
            save(state, done, ev)
        ckpt.close()  # waits until the last save is committed
    writer.close()
    if stop.received is not None:
        log(f"{stop.received}: stopped after step {done}; checkpoint {ckpt.step_path(done)} is committed. "
            "Run the same command again to resume.")
    elif last:
        log(f"done at step {done}: loss {last.get('loss', float('nan')):.4f}")
    return last


# -------------------------------------------------------------------------- eval


EVAL_SETTINGS = ("data.", "train.eval_batches", "train.batch_size", "mesh.", "sharding.")


def eval_config(workdir: str, overrides) -> Config:
    """The work dir's config with ``overrides`` (``key=value``) applied. Only the data, the eval
    batches and the layout may change: the model and the tokenizer are the checkpoint's."""
    tree = read_config(workdir).to_dict()
    for item in overrides:
        key, value = parse_override(item)
        if not key.startswith(EVAL_SETTINGS) or key == "data.tokenizer":
            raise ConfigError(f"eval --set {key}: only data.* (not data.tokenizer), train.eval_batches, "
                              "train.batch_size, mesh.* and sharding.* may change; the model is the checkpoint's")
        section, name = key.split(".", 1)
        tree[section][name] = value
        if key in ("data.path", "data.mixture"):  # one corpus instead of a mixture, or the other way
            tree["data"]["mixture" if key == "data.path" else "path"] = None
    return config_from_dict(tree).validate()


def held_out_batches(cfg: Config, workdir: str, log: Callable[[str], None]):
    """``(batches, description)``: the held-out split (``data.eval_fraction``) of the corpus ``cfg`` names."""
    from t5x_lite.data import DataError, make_datasets

    _, _, batches = make_datasets(cfg, workdir, log=log)
    if batches is None:
        raise DataError(f"data.eval_fraction={cfg.data.eval_fraction} holds no document out; "
                        "pass --set data.eval_fraction=0.02 (or --set data.path=HELD_OUT --set data.eval_fraction=0.99)")
    corpus = f"the mixture {cfg.data.mixture}" if cfg.data.mixture else cfg.data.path or "the stdlib docstrings"
    return batches, f"held-out {cfg.data.eval_fraction:g} of {corpus}"


def evaluate_checkpoint(workdir: str, overrides=(), step: Optional[int] = None,
                        log: Callable[[str], None] = print) -> dict:
    """Loss, perplexity and token accuracy of checkpoint ``step`` (default: the latest) on held-out
    data, appended to ``metrics.jsonl`` as a row of that step. The params are restored straight
    into this mesh's shardings; no optimizer state is read."""
    cfg = eval_config(workdir, overrides)
    mesh = partitioning.make_mesh(cfg)
    batches, source = held_out_batches(cfg, workdir, log)
    cfg = cfg.with_max_segments(batches.max_segments)  # model.fit_max_segments: as training fitted it
    setup = make_setup(cfg, mesh)
    step, params = read_params(workdir, cfg, setup.abstract_state.params, step)
    result = dict(evaluate(setup, params, batches, cfg.train.eval_batches), eval_data=source)
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    writer.write(step, result)
    writer.close()
    return dict(result, step=step)


def run_eval_cli(args) -> int:
    """``t5x-lite eval --workdir DIR [--set data.path=...] [--step N]``."""
    log = Logger(None, enabled=jax.process_index() == 0)
    r = evaluate_checkpoint(args.workdir, args.overrides, args.step, log=log)
    log(f"step {r['step']}: eval_loss {r['eval_loss']:.4f}  eval_perplexity {r['eval_perplexity']:.3f}  "
        f"eval_accuracy {r['eval_accuracy']:.4f}  ({r['eval_tokens']:.0f} target tokens, {r['eval_data']}) "
        f"-> {os.path.join(args.workdir, METRICS_FILE)}")
    return 0


def _num_params(setup: TrainSetup, which: Callable = lambda path: True) -> int:
    leaves = jax.tree_util.tree_leaves_with_path(setup.abstract_state.params)
    return sum(math.prod(x.shape) for path, x in leaves if which(path))
