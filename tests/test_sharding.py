"""Sharded training on 8 CPU devices: DP, ZeRO-1/2/3, hybrid and tensor parallel.

* Equivalence: for every ZeRO stage and mesh, 3 train steps from the same initial state give
  the same losses, gradient norms, parameters and Adam moments as one device (the moments are
  running averages of the gradients and of their squares: comparing them compares every
  gradient entry of every step).
* The shardings themselves: what each stage replicates and what it splits, read from the
  shardings and from the compiled program (gradient memory, per-layer gathers).
* Bad input: one clear error, before anything compiles.

Compiling dominates the run time, so train steps are compiled with LLVM's optimisations off
(``FAST_COMPILE``): XLA's SPMD partitioning, which is what these tests are about, runs the
same; only the CPU machine code is less tuned. Every case compiles once (``compiled_case``).

Tolerance: fp32 ``rtol=1e-5``, judged per array at the scale of its largest entry (so that
near-zero entries, e.g. Adam's second moments ~1e-9, are compared at their own scale). Adam's
step ``lr * m / (sqrt(v) + eps)`` turns a rounding difference d in a gradient entry near zero
into a parameter difference of up to ``lr / eps * d``: with the defaults (1e-2 / 1e-8) a sum
over the batch taken in another order (per device, then across) moves such parameters by far
more than 1e-5. The tiny configs use ``lr = eps = 1e-3`` (gain 1), so that the parameters
inherit the gradients' rounding, not a millionfold of it.
"""

from __future__ import annotations

import functools
import math
import os
import re
import subprocess
import sys
from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from t5x_lite import partitioning
from t5x_lite.config import ConfigError, load_config
from t5x_lite.trainer import batch_shapes, compiled_stats, make_setup, to_global

from helpers import random_batch, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 0}
TINY = ("model.d_model=16", "model.num_heads=2", "model.d_ff=32", "model.num_layers=2", "model.vocab_size=64",
        "data.seq_len=8", "data.target_len=8", "optim.eps=1e-3", "optim.learning_rate=1e-3")
MESHES = [(8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]
STEPS = 3
RTOL = 1e-5


class Case(NamedTuple):
    """One training setup: a family, a ZeRO stage, a ``(data, fsdp, tensor)`` mesh."""

    family: str
    stage: int = 0
    mesh: tuple = (1, 1, 1)
    micro: int = 1
    opt_over_data: bool = False
    fused: bool = False  # model.fused_qkv and fused_mlp (compute only: the reference stays unfused)
    extra: tuple = ()  # overrides the one-device reference shares (another optimizer)

    def config(self):
        data, fsdp, tensor = self.mesh
        fused = ("model.fused_qkv=true", "model.fused_mlp=true") if self.fused else ()
        return tiny_cfg(self.family, *TINY, f"sharding.zero_stage={self.stage}", f"mesh.data={data}",
                        f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}", f"train.micro_batches={self.micro}",
                        f"sharding.shard_opt_over_data={self.opt_over_data}", *fused, *self.extra)

    def reference(self) -> "Case":
        return Case(self.family, extra=self.extra)

    def __str__(self):
        return (f"{self.family}-zero{self.stage}-mesh{'x'.join(map(str, self.mesh))}"
                + (f"-micro{self.micro}" if self.micro > 1 else "") + ("-optoverdata" if self.opt_over_data else "")
                + ("-fused" if self.fused else "") + "".join(f"-{x}" for x in self.extra))


def abstract_batch(setup) -> dict:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding)
            for k, v in batch_shapes(setup.cfg).items()}


@functools.lru_cache(maxsize=None)
def compiled_case(case: Case):
    """``(setup, compiled train step)`` on the first prod(case.mesh) devices."""
    cfg = case.config()
    setup = make_setup(cfg, partitioning.make_mesh(cfg, jax.devices()[: math.prod(case.mesh)]))
    with setup.activation_context():
        step = setup.train_step.lower(setup.abstract_state, abstract_batch(setup)).compile(FAST_COMPILE)
    return setup, step


@functools.lru_cache(maxsize=None)
def initial_state(family: str, extra: tuple = ()):
    """One initial state per family (and optimizer), on the host: weights N(0, 0.02) (GPT-2's
    init), norm scales 1, the optimizer's moments 0. Drawn with numpy: nothing to compile."""
    setup, _ = compiled_case(Case(family, extra=extra))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return np.ones(leaf.shape, leaf.dtype)
        return rng.normal(0.0, 0.02, leaf.shape).astype(leaf.dtype)

    params = jax.tree_util.tree_map_with_path(draw, setup.abstract_state.params)
    opt_state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), setup.abstract_state.opt_state)
    return setup.abstract_state.replace(step=np.zeros((), np.int32), params=params, opt_state=opt_state)


def assert_close(got, want, rtol: float = RTOL):
    """Every leaf: ``|got - want| <= rtol * max|want|`` (fp32 rounding, judged at the leaf's scale)."""
    for (path, w), g in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
        w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
        scale = np.abs(w).max() if w.size else 0.0
        err = np.abs(g - w).max() if w.size else 0.0
        assert err <= rtol * scale, f"{jax.tree_util.keystr(path)}: max |diff| {err:.3g} > {rtol} x {scale:.3g}"


@functools.lru_cache(maxsize=None)
def train_three_steps(case: Case):
    """Final state and per-step (loss, grad_norm), all on the host."""
    setup, step = compiled_case(case)
    state = jax.device_put(initial_state(case.family, case.extra), setup.state_shardings)
    metrics = []
    with setup.activation_context():
        for i in range(STEPS):
            state, m = step(state, to_global(random_batch(setup.cfg, seed=i), setup.batch_sharding))
            metrics.append({"loss": m["loss"], "grad_norm": m["grad_norm"]})
    return jax.device_get((state, metrics))


# The decoder sees the full stage x mesh matrix; the encoder and encoder-decoder a diagonal that
# still gives each of them every stage and every mesh. On (8, 1, 1) there is no fsdp axis, so
# stages 1-3 shard the optimizer state over `data` there (shard_opt_over_data), or they would
# all be stage 0. Micro-batches (in-step accumulation) on the meshes whose batch allows them.
CASES = [Case("decoder", stage, mesh, 2 if mesh in [(2, 2, 2), (1, 4, 2)] else 1, mesh == (8, 1, 1) and stage > 0)
         for stage in range(4) for mesh in MESHES] + [
    Case("encoder", 2, (8, 1, 1), 1, True), Case("encoder", 3, (1, 8, 1)), Case("encoder", 1, (2, 4, 1)),
    Case("encoder", 0, (2, 2, 2), 2), Case("encoder", 3, (1, 4, 2), 2),
    Case("encoder_decoder", 1, (8, 1, 1), 1, True), Case("encoder_decoder", 2, (1, 8, 1)),
    Case("encoder_decoder", 0, (2, 4, 1)), Case("encoder_decoder", 3, (2, 2, 2), 2),
    Case("encoder_decoder", 2, (1, 4, 2), 2),
    # fused q/k/v and gate/up projections, heads and MLP split over `tensor`, == unfused on one device
    Case("decoder", 3, (1, 4, 2), fused=True), Case("encoder_decoder", 2, (2, 2, 2), fused=True),
    # Muon: its orthogonalisation over ZeRO-3-sharded, tensor-split matrices == one device
    Case("decoder", 3, (1, 4, 2), extra=("optim.name=muon",)),
    # LoRA: adapters on ZeRO-3-sharded, tensor-split projections, gradients of the adapters alone
    # accumulated over 2 micro-batches; the rest frozen
    Case("decoder", 3, (1, 4, 2), micro=2,
         extra=("model.lora_rank=4", "model.lora_targets=query,key,value,out,wi_0,wi_1,wo")),
    # Gemma 3's layer: q / k norms, sandwich norms, scaled embeddings, local and global layers
    Case("decoder", 3, (1, 4, 2), extra=("model.qk_norm=true", "model.norm_position=sandwich", "model.embed_scale=true",
                                         "model.sliding_window=5", "model.sliding_window_pattern=2",
                                         "model.rope_local_theta=100")),
    # Mixture of experts: routed under a capacity (choices dropped) in groups of half a row, the
    # load-balancing loss in the gradient, experts' weights ZeRO-3-sharded and tensor-split, a gated shared expert
    Case("decoder", 3, (1, 4, 2), micro=2, extra=("model.num_experts=4", "model.expert_capacity_factor=1.5",
                                                   "model.expert_group_size=8", "model.router_aux_loss=0.1",
                                                   "model.shared_expert_d_ff=32", "model.shared_expert_gate=true")),
    # OLMo 2's layer: sublayer outputs normed, q / k normed over all heads (split over `tensor`)
    Case("decoder", 3, (1, 4, 2), extra=("model.norm_position=output", "model.qk_norm=true",
                                         "model.qk_norm_scope=all_heads", "model.num_kv_heads=2")),
    # expert parallelism: each fsdp shard holds one of the 4 experts whole, the tokens travel
    Case("decoder", 3, (2, 4, 1), extra=("model.num_experts=4", "model.expert_capacity_factor=1.5",
                                         "model.router_aux_loss=0.1", "sharding.expert_parallel=true",
                                         "model.router_bias_update=0.01")),  # and loss-free balancing
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sharded_training_equals_single_device(case):
    ref_state, ref_metrics = train_three_steps(case.reference())
    state, metrics = train_three_steps(case)
    assert tuple(compiled_case(case)[0].mesh.devices.shape) == case.mesh
    assert_close(metrics, ref_metrics)
    assert_close(state.params, ref_state.params)
    assert_close(state.opt_state, ref_state.opt_state)
    assert int(state.step) == STEPS


def test_every_family_sees_every_stage_and_mesh():
    for family in ("encoder", "decoder", "encoder_decoder"):
        mine = [c for c in CASES if c.family == family]
        assert {c.stage for c in mine} == {0, 1, 2, 3}, family
        assert {c.mesh for c in mine} == set(MESHES), family
        assert any(c.micro > 1 for c in mine), family


# ------------------------------------------------------------- the shardings themselves


def real_setup(path: str, stage: int, mesh_shape, *overrides: str):
    """``make_setup`` for a full-size config: abstract shapes only, nothing allocated or compiled."""
    data, fsdp, tensor = mesh_shape
    cfg = load_config(os.path.join(REPO, path), [f"sharding.zero_stage={stage}", f"mesh.data={data}",
                                                 f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}", *overrides])
    return make_setup(cfg, partitioning.make_mesh(cfg))


def leaves_with_names(tree, shardings):
    """``[(path string, abstract leaf, sharding)]``."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(path), leaf, sh) for (path, leaf), sh in zip(flat, jax.tree.leaves(shardings))]


def nbytes(leaf) -> int:
    return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


REAL_CONFIGS = [("configs/llama_1b.yaml", ()), ("configs/t5_base.yaml", ("train.batch_size=8",)),
                ("configs/bert_base.yaml", ("train.batch_size=8",))]


def divisible_yet_whole(tree, shardings, ways: int = 8, threshold: int = 16384) -> list:
    """Leaves over ``threshold`` bytes left whole on every device although a dimension of theirs
    would split ``ways`` ways (BERT's 30522-entry logits bias, say, cannot)."""
    return [(name, leaf.shape) for name, leaf, sh in leaves_with_names(tree, shardings)
            if sh.is_fully_replicated and nbytes(leaf) > threshold and any(d % ways == 0 for d in leaf.shape)]


@pytest.mark.parametrize("path,overrides", REAL_CONFIGS, ids=lambda x: os.path.basename(x) if isinstance(x, str) else "")
def test_stage3_replicates_no_large_array(path, overrides):
    """ZeRO-3 on 8 devices: params, grads and optimizer state (Adam or Adafactor) all split 8 ways."""
    setup = real_setup(path, 3, (1, 8, 1), *overrides)
    state, shardings = setup.abstract_state, setup.state_shardings
    assert not divisible_yet_whole(state.params, shardings.params)
    assert not divisible_yet_whole(state.params, setup.grad_shardings)
    assert not divisible_yet_whole(state.opt_state, shardings.opt_state)
    sizes = setup.bytes_per_device()
    for key, tree in (("params", state.params), ("grads", state.params), ("opt_state", state.opt_state)):
        total = sum(nbytes(leaf) for leaf in jax.tree.leaves(tree))
        assert sizes[key] < 1.01 * total / 8, key


def adam_moments(setup):
    """``[(name, leaf, sharding)]`` of Adam's mu and nu leaves."""
    out = leaves_with_names(setup.abstract_state.opt_state, setup.state_shardings.opt_state)
    return [x for x in out if re.search(r"\.(mu|nu)\[", x[0])]


def test_stage1_replicates_params_and_grads_and_shards_adam_moments():
    setup = real_setup("configs/llama_1b.yaml", 1, (1, 8, 1))
    for tree, shardings in ((setup.abstract_state.params, setup.state_shardings.params),
                            (setup.abstract_state.params, setup.grad_shardings)):
        for name, _, sh in leaves_with_names(tree, shardings):
            assert sh.is_fully_replicated, name
    moments = adam_moments(setup)
    assert len(moments) == 2 * len(jax.tree.leaves(setup.abstract_state.params))
    for name, leaf, sh in moments:
        if nbytes(leaf) > 16384:
            assert "fsdp" in jax.tree.leaves(tuple(sh.spec)), name
            assert math.prod(sh.shard_shape(leaf.shape)) * 8 == math.prod(leaf.shape), name
    sizes = setup.bytes_per_device()
    opt_total = sum(nbytes(leaf) for _, leaf, _ in leaves_with_names(setup.abstract_state.opt_state,
                                                                    setup.state_shardings.opt_state))
    assert sizes["opt_state"] < 1.01 * opt_total / 8


def test_stage1_over_data_shards_moments_over_both_axes():
    setup = real_setup("configs/llama_1b.yaml", 1, (2, 4, 1), "sharding.shard_opt_over_data=true")
    for name, leaf, sh in adam_moments(setup):
        if nbytes(leaf) > 16384:
            assert math.prod(sh.shard_shape(leaf.shape)) * 8 == math.prod(leaf.shape), name


def test_stage2_shards_gradients_and_keeps_only_their_shard():
    """The gradient handed to the optimizer is sharded like the optimizer state, and the compiled
    step holds only that shard: with in-step accumulation, stage 2's accumulator is the shard,
    so its temporary memory is smaller than stage 1's by (nearly) the gradient bytes saved.
    (On CPU XLA writes a reduce-scatter as all-reduce + slice, so counting collectives would not
    tell; GPU XLA turns the pair into a reduce-scatter.)"""
    mesh = (1, 4, 2)
    s1, c1 = compiled_case(Case("decoder", 1, mesh, 2))
    s2, c2 = compiled_case(Case("decoder", 2, mesh, 2))
    params = jax.tree.leaves(s2.abstract_state.params)
    for leaf, grad_sh, param_sh in zip(params, jax.tree.leaves(s2.grad_shardings),
                                       jax.tree.leaves(s2.param_shardings)):
        if leaf.ndim >= 2:
            assert "fsdp" in jax.tree.leaves(tuple(grad_sh.spec)), grad_sh
            assert "fsdp" not in jax.tree.leaves(tuple(param_sh.spec)), param_sh
    saved = s1.bytes_per_device()["grads"] - s2.bytes_per_device()["grads"]
    assert saved > 0.5 * s1.bytes_per_device()["grads"]
    temp1, temp2 = compiled_stats(c1)["temp_bytes"], compiled_stats(c2)["temp_bytes"]
    assert temp1 - temp2 >= 0.8 * saved, (temp1, temp2, saved)


def collective_shapes(hlo: str, op: str) -> list[tuple[str, tuple]]:
    """``[(computation, result shape)]`` of every ``op`` (e.g. all-gather) in compiled HLO text."""
    out, computation = [], None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            computation = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
        m = re.search(rf"= \w+\[([\d,]*)\]\S* {op}(?:-start)?\(", line)
        if m:
            out.append((computation, tuple(int(d) for d in m.group(1).split(",") if d)))
    return out


def loop_bodies(hlo: str) -> set:
    return set(re.findall(r"\bbody=(%[\w.\-]+)", hlo))


def test_stage3_gathers_weights_layer_by_layer():
    """FSDP: inside the layer scan each layer's kernels are all-gathered just before use; the
    stacked ``[layers, ...]`` tensors are never gathered whole (that would hold every layer)."""
    setup, compiled = compiled_case(Case("decoder", 3, (1, 8, 1)))
    hlo = compiled.as_text()
    gathers, bodies = collective_shapes(hlo, "all-gather"), loop_bodies(hlo)
    stacked = [leaf.shape for leaf in jax.tree.leaves(setup.abstract_state.params["decoder"]["stack"])
               if leaf.ndim >= 3]
    assert stacked and setup.cfg.model.num_layers == 2
    shapes = {shape for _, shape in gathers}
    assert not shapes & set(stacked), "a whole stack of layers is gathered at once"
    in_loops = {shape for comp, shape in gathers if comp in bodies}
    per_layer = {shape[1:] for shape in stacked}
    assert len(in_loops & per_layer) >= 3, (in_loops, per_layer)


def test_tensor_parallel_splits_heads_mlp_and_vocab():
    """Megatron: every kernel dimension named heads / kv_heads / mlp / vocab is split over
    ``tensor``, and no other dimension is."""
    from t5x_lite.models import abstract_params

    setup = real_setup("configs/llama_1b.yaml", 0, (1, 4, 2))
    logical = jax.tree.leaves(nn.get_partition_spec(abstract_params(setup.cfg)), is_leaf=lambda x: isinstance(x, P))
    params = leaves_with_names(setup.abstract_state.params, setup.param_shardings)
    split = []
    for names, (name, leaf, sh) in zip(logical, params):
        mesh_axes = tuple(sh.spec) + (None,) * (leaf.ndim - len(sh.spec))
        for logical_name, axes in zip(names, mesh_axes):
            assert (axes == "tensor") == (logical_name in ("heads", "kv_heads", "mlp", "vocab")), (name, names, sh.spec)
        if "tensor" in mesh_axes:
            split.append(re.findall(r"\['(\w+)'\]", name)[-2])
    assert sorted(split) == sorted(["query", "key", "value", "out", "wi_0", "wi_1", "wo", "token_embed", "lm_head"])
    total = sum(nbytes(leaf) for _, leaf, _ in params)
    assert setup.bytes_per_device()["params"] < 0.51 * total


# --------------------------------------------------------------------------- bad input


def test_mesh_that_does_not_multiply_to_the_devices():
    cfg = Case("decoder", 3, (2, 2, 1)).config()
    with pytest.raises(ConfigError, match=r"mesh\.data=2, mesh\.fsdp=2, mesh\.tensor=1 multiply to 4 .* 8 are"):
        partitioning.make_mesh(cfg)
    cfg = tiny_cfg("decoder", "mesh.data=3", "mesh.fsdp=-1")
    with pytest.raises(ConfigError, match=r"mesh\.data=3.*one of \[1, 2, 4, 8\]"):
        partitioning.make_mesh(cfg)


def test_batch_not_divisible_by_the_data_axes():
    cfg = tiny_cfg("decoder", *TINY, "mesh.data=2", "mesh.fsdp=4", "train.batch_size=12")
    with pytest.raises(ConfigError, match=r"train\.batch_size=12 .* mesh\.data x mesh\.fsdp = 2 x 4 = 8 .*\[8, 16"):
        partitioning.make_mesh(cfg)
    cfg = Case("decoder", 3, (1, 8, 1), micro=2).config()
    with pytest.raises(ConfigError, match=r"train\.micro_batches=2 .*\[16, 32.*train\.micro_batches in \[1\]"):
        partitioning.make_mesh(cfg)


def test_heads_not_divisible_by_tensor():
    cfg = Case("decoder", 0, (1, 2, 4)).config()
    with pytest.raises(ConfigError, match=r"model\.num_heads=2 is not divisible by mesh\.tensor=4.*fit: \[1, 2\]"):
        partitioning.make_mesh(cfg)


def test_stage_outside_0_to_3():
    with pytest.raises(ConfigError, match=r"sharding\.zero_stage=4 must be one of 0, 1, 2, 3"):
        tiny_cfg("decoder", "sharding.zero_stage=4")


def test_plan_rejects_a_bad_mesh_before_compiling():
    args = [sys.executable, "-m", "t5x_lite", "plan", "--config", "configs/decoder_tiny.yaml",
            "--set", "mesh.data=3", "--set", "mesh.fsdp=3"]
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error:") and "mesh.data=3, mesh.fsdp=3" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not out.stdout
