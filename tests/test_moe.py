"""Mixture of experts (model.num_experts): the block against a per-token reference, with and
without a capacity; one expert == the dense MLP; packed == unpacked; the load-balancing loss
against transformers' and in the gradient; the FLOP count. (Sharded == one device:
test_sharding; cached decoding == full forward: test_decoding; Mixtral and Qwen3-MoE against
transformers: test_hf.)"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import t5x_lite
from helpers import random_batch, tiny_cfg
from t5x_lite.config import ConfigError, ModelConfig
from t5x_lite.metrics import train_flops_per_step
from t5x_lite.models import moe
from test_models import _pack, apply, ids
from test_train import run_steps


def block(cfg: ModelConfig, x, valid=None, seed=1):
    module = moe.MoeMlp(cfg)
    params = nn.meta.unbox(module.init(jax.random.key(seed), x, valid))["params"]
    out, state = module.apply({"params": params}, x, valid, mutable=["intermediates"])
    return np.asarray(out), params, state["intermediates"]


def reference(cfg: ModelConfig, params, x, valid, group: int, capacity: int) -> np.ndarray:
    """Token by token, in numpy: the top-k experts' outputs weighted by the router, each expert
    taking a group's choices by rank (all first choices, then all second ones, ...) and then by
    position until ``capacity`` of them."""
    x = np.asarray(x, np.float64)
    p = {k: np.asarray(v["kernel"], np.float64) for k, v in params.items()}
    b, length, _ = x.shape
    out = np.zeros_like(x)
    for row in range(b):
        for start in range(0, length, group):
            choices = []  # (rank, position, expert, weight)
            for t in range(start, start + group):
                if not valid[row, t]:
                    continue
                logits = x[row, t] @ p["router"]
                probs = np.exp(logits - logits.max())
                probs /= probs.sum()
                top = np.argsort(-probs, kind="stable")[: cfg.experts_per_token]
                weights = probs[top] / (probs[top].sum() if cfg.router_renormalize else 1.0)
                choices += [(rank, t, e, w) for rank, (e, w) in enumerate(zip(top, weights))]
            taken = {e: 0 for e in range(cfg.num_experts)}
            for rank, t, e, w in sorted(choices):
                if taken[e] == capacity:
                    continue
                taken[e] += 1
                h = x[row, t] @ p["wi_0"][e]
                h = h / (1 + np.exp(-h)) * (x[row, t] @ p["wi_1"][e])
                out[row, t] += w * (h @ p["wo"][e])
    return out


@pytest.mark.parametrize("capacity_factor,group,renormalize", [(0.0, 0, True), (1.0, 4, True), (0.7, 0, False)])
def test_block_equals_per_token_reference(capacity_factor, group, renormalize):
    cfg = ModelConfig(d_model=16, d_ff=24, num_experts=4, experts_per_token=2, expert_capacity_factor=capacity_factor,
                      expert_group_size=group, router_renormalize=renormalize)
    x = jax.random.normal(jax.random.key(0), (2, 12, 16))
    valid = np.ones((2, 12), bool)
    valid[1, 9:] = False  # padding: routed nowhere, takes no expert's room
    out, params, inter = block(cfg, x, valid)
    size = moe.group_size(cfg, 12)
    capacity = moe.expert_capacity(cfg, size)
    assert (size, capacity) == {0.0: (12, 12), 1.0: (4, 2), 0.7: (12, 5)}[capacity_factor]
    np.testing.assert_allclose(out[valid], reference(cfg, params, x, valid, size, capacity)[valid], atol=1e-5)
    np.testing.assert_array_equal(out[~valid], 0.0)
    dropped = float(moe.sown_total(inter, moe.DROPPED))
    assert float(moe.sown_total(inter, moe.CHOICES)) == 2 * valid.sum()
    assert (dropped > 0) == (capacity_factor > 0)  # these capacities bind; dropless drops nothing


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_few_tokens_run_their_own_experts_gathered(mlp):
    """A decoding step of a small batch (fewer choices than experts) gathers each token's k
    experts instead of running all E: the same outputs as the reference."""
    cfg = ModelConfig(d_model=16, d_ff=24, num_experts=8, experts_per_token=2, expert_capacity_factor=1.25, mlp=mlp)
    x = jax.random.normal(jax.random.key(2), (3, 1, 16))
    valid = np.array([[True], [False], [True]])
    assert moe.gathers_experts(cfg, 3, 1, moe.expert_capacity(cfg, 1))
    assert not moe.gathers_experts(cfg, 4, 1, 1) and not moe.gathers_experts(cfg, 3, 3, 2)
    out, params, _ = block(cfg, x, valid)
    if mlp == "gelu":  # the reference is SwiGLU's: check this one against the dispatch einsums instead
        wide, _, _ = block(cfg, jnp.concatenate([x, jnp.zeros((3, 3, 16))], axis=1),
                           np.concatenate([valid, np.zeros((3, 3), bool)], axis=1))
        np.testing.assert_allclose(out[:, 0], wide[:, 0], atol=1e-5)
    else:
        np.testing.assert_allclose(out, reference(cfg, params, x, valid, 1, 1), atol=1e-5)
    np.testing.assert_array_equal(out[1], 0.0)


def test_one_expert_is_the_dense_mlp():
    dense = tiny_cfg("decoder")
    experts = tiny_cfg("decoder", "model.num_experts=1", "model.experts_per_token=1")
    params = t5x_lite.init_params(dense, 0)
    moe_params = flax.traverse_util.flatten_dict(jax.device_get(params), sep="/")
    for key in [k for k in moe_params if "/mlp/w" in k]:
        moe_params[key] = moe_params[key][:, None]  # [layers, 1 expert, in, out]
    n = dense.model.num_layers
    moe_params["decoder/stack/layers/mlp/router/kernel"] = np.zeros((n, dense.model.d_model, 1), np.float32)
    moe_params = flax.traverse_util.unflatten_dict(moe_params, sep="/")
    chex_shapes = jax.tree.map(np.shape, nn.meta.unbox(t5x_lite.models.abstract_params(experts)))
    assert jax.tree.map(np.shape, moe_params) == chex_shapes
    tokens = ids((2, 10), 3)
    np.testing.assert_allclose(apply(experts, moe_params, input_ids=tokens), apply(dense, params, input_ids=tokens),
                               atol=1e-5, rtol=1e-5)


def test_packed_equals_unpacked_with_experts():
    cfg = tiny_cfg("decoder", "model.num_experts=4", "model.experts_per_token=2", "model.expert_d_ff=24")
    params = t5x_lite.init_params(cfg, 0)
    a, b = ids((7,), 1), ids((6,), 2)
    row, seg, pos = _pack(a, b, 16)
    packed = np.asarray(apply(cfg, params, input_ids=row, segment_ids=seg, positions=pos))
    np.testing.assert_allclose(packed[0, :7], np.asarray(apply(cfg, params, input_ids=a[None]))[0], atol=2e-5)
    np.testing.assert_allclose(packed[0, 7:13], np.asarray(apply(cfg, params, input_ids=b[None]))[0], atol=2e-5)


def test_balance_loss_equals_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    cfg = ModelConfig(num_experts=8, experts_per_token=2)
    logits = jax.random.normal(jax.random.key(0), (1, 24, 8)) * 2
    r = moe.route(cfg, logits, jnp.ones((1, 24), bool), capacity=24)
    ours = moe.balance_loss(cfg, r["probs"], r["chosen"], jnp.ones((1, 24), bool))
    theirs = load_balancing_loss_func((torch.tensor(np.asarray(logits[0])),), 8, 2)
    np.testing.assert_allclose(float(ours[0]), float(theirs), rtol=1e-5)
    even = moe.balance_loss(cfg, jnp.full((1, 8, 8), 1 / 8), jax.nn.one_hot(
        jnp.arange(16).reshape(1, 8, 2) % 8, 8).sum(2), jnp.ones((1, 8), bool))
    np.testing.assert_allclose(float(even[0]), 2.0, rtol=1e-6)  # balanced: k


def test_router_losses_balance_the_experts_and_shrink_the_logits():
    opts = ("model.num_experts=4", "model.num_layers=1", "optim.schedule=constant", "optim.learning_rate=3e-2")
    batch = random_batch(tiny_cfg("decoder", *opts), seed=4)
    runs = {}
    for name, losses in {"none": (), "balance": ("model.router_aux_loss=1.0",), "z": ("model.router_z_loss=0.1",)}.items():
        _, runs[name] = run_steps(tiny_cfg("decoder", *opts, *losses), batch, steps=15)
    for name in ("balance", "z"):  # the cross-entropy is the same number at step 1; the update differs
        np.testing.assert_allclose(runs[name][0]["loss"], runs["none"][0]["loss"], rtol=1e-6)
        assert runs[name][0]["grad_norm"] != runs["none"][0]["grad_norm"]
    final = {name: {k: float(h[-1][k]) for k in (moe.AUX_LOSS, moe.Z_LOSS)} for name, h in runs.items()}
    assert 2.0 <= final["balance"][moe.AUX_LOSS] < min(2.1, final["none"][moe.AUX_LOSS])  # k = 2: perfect balance
    assert final["z"][moe.Z_LOSS] < 0.5 * final["none"][moe.Z_LOSS]


def test_flops_count_the_experts_a_token_visits():
    base = ("model.d_model=64", "model.d_ff=256", "model.num_layers=2")
    dense = train_flops_per_step(tiny_cfg("decoder", *base))
    k2 = train_flops_per_step(tiny_cfg("decoder", *base, "model.num_experts=8", "model.experts_per_token=2",
                                       "model.expert_d_ff=128"))
    tokens = 8 * 16
    # two experts of half the width: the dense MLP's FLOPs, plus the router's 6 x d x E per token per layer
    assert k2 - dense == pytest.approx(tokens * 2 * 6 * 64 * 8)


def test_moe_config_errors():
    for overrides, needle in [(("model.num_experts=2", "model.experts_per_token=3"), "experts_per_token"),
                              (("model.num_experts=4", "model.fused_mlp=true"), "fused_mlp"),
                              (("model.num_experts=4", "model.lora_rank=4", "model.lora_targets=query,wo"),
                               "LoRA does not adapt"),
                              (("model.num_experts=4", "model.expert_capacity_factor=-1"), "capacity")]:
        with pytest.raises(ConfigError, match=needle):
            tiny_cfg("decoder", *overrides)


def _gathered_shapes(cfg) -> set:
    """Shapes of every all-gather's output in the compiled train step of ``cfg`` on 8 devices."""
    import re

    from t5x_lite import partitioning
    from t5x_lite.trainer import make_setup
    from test_sharding import FAST_COMPILE, abstract_batch

    setup = make_setup(cfg, partitioning.make_mesh(cfg))
    with setup.activation_context():
        hlo = setup.train_step.lower(setup.abstract_state, abstract_batch(setup)).compile(FAST_COMPILE).as_text()
    return {tuple(int(d) for d in m.group(1).split(",")) for m in re.finditer(r"= f32\[([\d,]+)\]\S* all-gather\(", hlo)}


def test_expert_parallel_keeps_experts_whole_and_never_gathers_them():
    """ZeRO-3 splits every expert's weights over fsdp and gathers them per layer; expert
    parallelism gives each fsdp shard whole experts of its own (E / fsdp), which stay put while
    the tokens move. (Same numbers as one device: test_sharding.)"""
    opts = ("model.num_experts=4", "model.expert_capacity_factor=1.5", "mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1")
    expert = {(4, 32, 64), (4, 64, 32)}  # one layer's [E, D, F] and [E, F, D]
    assert expert & _gathered_shapes(tiny_cfg("decoder", *opts))
    ep = tiny_cfg("decoder", *opts, "sharding.expert_parallel=true")
    assert not expert & _gathered_shapes(ep)
    from t5x_lite import partitioning
    from t5x_lite.trainer import make_setup

    setup = make_setup(ep, partitioning.make_mesh(ep))
    mlp = setup.state_shardings.params["decoder"]["stack"]["layers"]["mlp"]
    for name in ("wi_0", "wi_1", "wo"):  # [layers, experts over fsdp, in, out (mlp over tensor)]
        assert tuple(mlp[name]["kernel"].spec)[:2] == (None, "fsdp"), name
    with pytest.raises(ConfigError, match="does not divide"):
        partitioning.make_mesh(tiny_cfg("decoder", *opts[:-3], "mesh.fsdp=8", "sharding.expert_parallel=true",
                                        "model.num_experts=4"))


def test_active_parameters_leave_out_the_experts_a_token_skips():
    from t5x_lite import planning
    from t5x_lite.config import load_config

    cfg = load_config("configs/moe_1b.yaml")
    plan = planning.formula_plan(cfg, gpus=1)
    assert plan["num_params"] - plan["active_params"] == 16 * (8 - 2) * 3 * 2048 * 1408
    every = load_config("configs/moe_1b.yaml", ["model.experts_per_token=8"])
    assert planning.active_params(every, plan["num_params"]) == plan["num_params"]
    assert planning.formula_plan(load_config("configs/llama_1b.yaml"), gpus=1)["active_params"] is None


def test_routing_bias_balances_without_a_loss():
    """model.router_bias_update (DeepSeek-V3): after each step every layer's bias moves by the
    rate, up for experts below the mean load, down above it (the optimizer never moves it), and
    the load evens out with no loss term."""
    opts = ("model.num_experts=4", "model.num_layers=1", "optim.schedule=constant", "optim.learning_rate=3e-2")
    cfg = tiny_cfg("decoder", *opts, "model.router_bias_update=0.05")
    batch = random_batch(cfg, seed=4)
    start, _ = run_steps(cfg, batch, steps=0)
    start = jax.device_get(start)
    model = t5x_lite.models.build_model(cfg)
    inputs = {k: batch[k] for k in ("input_ids", "segment_ids", "positions")}
    _, state = model.apply({"params": start.params}, **inputs, mutable=["intermediates"])
    (path, load), = moe.sown_loads(state["intermediates"])
    assert float(load.sum()) == 2 * float((batch["segment_ids"] > 0).sum())  # k choices per real token
    after, _ = run_steps(cfg, batch, steps=1, state=start)
    bias = flax.traverse_util.flatten_dict(jax.device_get(after.params))[path + (moe.ROUTER_BIAS,)]
    np.testing.assert_allclose(bias, 0.05 * np.sign(load.mean(-1, keepdims=True) - load), atol=1e-7)

    # A bias that sends every token to expert 0 (load 2x the mean) stays at a negligible rate and
    # is pulled back at 0.05 per step, the loads then near even.
    flat = flax.traverse_util.flatten_dict(start.params)
    key = path + (moe.ROUTER_BIAS,)
    flat[key] = np.broadcast_to(np.array([0.6, 0.0, 0.0, 0.0], np.float32), flat[key].shape).copy()
    skewed = start.replace(params=flax.traverse_util.unflatten_dict(flat))
    imbalance = {}
    for rate in (1e-6, 0.05):
        _, history = run_steps(tiny_cfg("decoder", *opts, f"model.router_bias_update={rate}"), batch, steps=16,
                               state=jax.device_get(skewed))
        imbalance[rate] = [float(h["router_imbalance"]) for h in history]
    assert min(imbalance[1e-6]) > 1.9 and imbalance[0.05][0] > 1.9
    assert np.mean(imbalance[0.05][-4:]) < 1.5


def test_evaluation_and_decoding_run_dropless_unless_told():
    """Training's capacity drops choices; logits, evaluation and decoding use
    model.eval_capacity_factor (0: dropless, so an export's logits are transformers')."""
    opts = ("model.num_experts=4", "model.experts_per_token=2")
    dropless = tiny_cfg("decoder", *opts)
    capped = tiny_cfg("decoder", *opts, "model.expert_capacity_factor=0.5")
    capped_eval = tiny_cfg("decoder", *opts, "model.expert_capacity_factor=0.5", "model.eval_capacity_factor=0.5")
    params = t5x_lite.init_params(dropless, 0)
    tokens = ids((2, 12), 5)
    want = np.asarray(t5x_lite.logits(dropless, params, tokens))
    np.testing.assert_array_equal(np.asarray(t5x_lite.logits(capped, params, tokens)), want)
    assert np.abs(np.asarray(t5x_lite.logits(capped_eval, params, tokens)) - want).max() > 1e-3
    from t5x_lite.trainer import make_loss_fn

    batch = random_batch(capped, seed=2)
    train_loss = make_loss_fn(capped, t5x_lite.models.build_model(capped))(params, batch, jax.random.key(0))
    eval_loss = make_loss_fn(capped, t5x_lite.models.build_model(capped.model.for_inference()))(
        params, batch, jax.random.key(0))
    assert float(train_loss[moe.DROPPED]) > 0 and float(eval_loss[moe.DROPPED]) == 0
