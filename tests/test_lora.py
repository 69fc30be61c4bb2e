"""LoRA (model.lora_rank): only the adapters train, the rest stays bit for bit; the optimizer
keeps state for the adapters alone; merged adapters give the same model without them."""

import flax
import jax
import numpy as np
import pytest

import t5x_lite
from helpers import random_batch, tiny_cfg
from t5x_lite import lora
from t5x_lite.config import ConfigError
from test_train import run_steps

LORA = ("model.lora_rank=4", "model.lora_targets=query,value,out,wi_0,wo")


def flat(tree) -> dict:
    return flax.traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def test_only_the_adapters_train_and_merge_into_the_plain_model(family="decoder"):
    opts = ("optim.learning_rate=1e-2", "optim.schedule=constant", "model.num_layers=1", *LORA)
    cfg = tiny_cfg(family, *opts)
    batch = random_batch(cfg, seed=1)
    start, _ = run_steps(cfg, batch, steps=0)
    start = jax.device_get(start)  # (the steps donate their input state)
    state, history = run_steps(cfg, batch, steps=12, state=start)
    assert float(history[-1]["loss"]) < 0.8 * float(history[0]["loss"])  # the adapters alone fit the batch
    before, after = flat(start.params), flat(state.params)
    adapters = {k for k in before if k.rsplit("/", 1)[-1] in lora.LORA_LEAVES}
    # every targeted projection has A and B (cross-attention's too), and nothing else changed
    assert len(adapters) == 2 * {"decoder": 5, "encoder_decoder": 5 + 4 + 4}[family]
    for k in before:
        if k in adapters:
            assert not np.array_equal(before[k], after[k]), k  # B left zero, A moved (once B had)
        else:
            np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    # Adam's moments exist for the adapters alone
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert moments <= 2 * sum(before[k].size for k in adapters) + 16

    plain = tiny_cfg(family, *opts[:-2])
    merged = lora.merge(state.params, cfg.model.lora_alpha / cfg.model.lora_rank)
    assert set(flat(merged)) == set(before) - adapters
    ids = np.random.default_rng(2).integers(5, 60, (2, 10))
    dec = np.random.default_rng(3).integers(5, 60, (2, 6)) if family == "encoder_decoder" else None
    np.testing.assert_allclose(np.asarray(t5x_lite.logits(plain, merged, ids, dec)),
                               np.asarray(t5x_lite.logits(cfg, state.params, ids, dec)), atol=2e-5, rtol=1e-5)
    # at step 0 (B = 0) the adapted model is the plain one
    base = {k: v for k, v in before.items() if k not in adapters}
    np.testing.assert_array_equal(np.asarray(t5x_lite.logits(cfg, start.params, ids, dec)),
                                  np.asarray(t5x_lite.logits(plain, flax.traverse_util.unflatten_dict(base, sep="/"),
                                                             ids, dec)))


def test_cross_attention_gets_adapters_too():
    from t5x_lite.models import abstract_params

    names = flat(jax.tree.map(lambda x: 0, flax.linen.meta.unbox(abstract_params(tiny_cfg("encoder_decoder", *LORA)))))
    adapted = {"/".join(k.split("/")[-3:-1]) for k in names if k.endswith("lora_b")}
    assert {"cross_attention/query", "cross_attention/value", "cross_attention/out", "self_attention/query",
            "mlp/wi_0", "mlp/wo"} <= adapted and not any(k.endswith("key/lora_b") for k in names)


def test_lora_config_errors():
    with pytest.raises(ConfigError, match="unknown \\['attention'\\]"):
        tiny_cfg("decoder", "model.lora_rank=4", "model.lora_targets=attention")
    with pytest.raises(ConfigError, match="LoRA adapts the separate projections"):
        tiny_cfg("decoder", "model.lora_rank=4", "model.fused_qkv=true")


def test_adapters_train_under_adafactor_too():
    """Adafactor scales its steps by a parameter's RMS (at least 1e-3): B, starting at zero, did
    not move at all (the loss stayed at its first value for 12 steps). With LoRA its steps are
    unscaled."""
    cfg = tiny_cfg("decoder", "optim.learning_rate=1e-2", "optim.schedule=constant", "model.num_layers=1", *LORA,
                   "optim.name=adafactor")
    _, history = run_steps(cfg, random_batch(cfg, seed=1), steps=12)
    assert float(history[-1]["loss"]) < 0.8 * float(history[0]["loss"])
