"""Configuration: YAML + overrides, one clear error per mistake, validation before any work."""

import glob

import pytest

from t5x_lite.config import Config, ConfigError, config_from_dict, load_config


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.yaml")))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.objective in ("causal", "prefix", "mlm", "span", "supervised")
    if cfg.train.xla_options:  # XLA takes them (CPU and GPU share one table of options)
        import jax
        import jax.numpy as jnp

        jax.jit(lambda x: x + 1).lower(jnp.zeros(2)).compile(compiler_options=cfg.train.compiler_options())


def test_overrides_are_typed():
    cfg = load_config("configs/decoder_tiny.yaml", [
        "optim.learning_rate=1e-4", "model.scan_layers=false", "model.num_kv_heads=null", "train.steps=7",
        "data.path=/tmp/some corpus.txt", "model.norm_eps=1e-5",
    ])
    assert cfg.optim.learning_rate == pytest.approx(1e-4) and isinstance(cfg.optim.learning_rate, float)
    assert cfg.model.scan_layers is False
    assert cfg.model.num_kv_heads is None and cfg.model.kv_heads == cfg.model.num_heads
    assert cfg.train.steps == 7
    assert cfg.data.path == "/tmp/some corpus.txt"
    assert cfg.model.norm_eps == pytest.approx(1e-5)


def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.num_layer=3"])
    msg = str(e.value)
    assert "model.num_layer" in msg and "num_layers" in msg and "did you mean" in msg
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        config_from_dict({"trian": {"steps": 3}})
    with pytest.raises(ConfigError, match="unknown config key 'model.widht'"):
        config_from_dict({"model": {"widht": 3}})


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  family: decoder\n  dropuot: 0.1\n")
    with pytest.raises(ConfigError, match="model.dropuot.*did you mean 'dropout'"):
        load_config(str(p))


@pytest.mark.parametrize("override,match", [
    ("train.steps=ten", "train.steps='ten' is not a valid int"),
    ("train.steps=1.5", "not a valid int"),
    ("model.scan_layers=maybe", "not a valid bool"),
    ("model.mlp=swigluu", r"not one of \['swiglu'.*did you mean 'swiglu'"),
    ("model.family=gpt", "model.family='gpt' is not one of"),
    ("model.d_model=null", "may not be null"),
    ("steps=3", "section.key"),
])
def test_bad_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize("overrides,match", [
    (["model.num_heads=8", "model.num_kv_heads=3"], r"num_kv_heads=3.*valid num_kv_heads: \[1, 2, 4, 8\]"),
    (["train.batch_size=10", "train.micro_batches=4"], r"batch_size=10 is not divisible by train.micro_batches=4"),
    (["model.family=encoder", "model.position=learned", "model.max_length=64", "data.seq_len=128"],
     "exceeds model.max_length=64"),
    (["model.family=encoder", "data.objective=causal"], "does not fit model.family=encoder"),
    (["sharding.zero_stage=4"], "zero_stage=4 must be one of 0, 1, 2, 3"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "at most one of mesh"),
    (["model.d_model=100", "model.num_heads=8"], "not divisible by model.num_heads"),
    (["model.attention=cudnn_packed"], r"cudnn_packed needs model.max_segments > 0.*e.g. 16"),
    (["model.max_segments=200", "data.seq_len=128"], r"max_segments=200 must be in \[0, data.seq_len=128\]"),
    (["data.objective=supervised", "data.path=x.jsonl", "data.packing=concat"], "supervised pairs stay whole"),
    (["model.family=encoder", "data.objective=supervised", "data.path=x.jsonl"], "does not fit model.family=encoder"),
    (["model.family=encoder", "model.sliding_window=4"], "sliding_window applies to causal self-attention"),
    (["model.attn_logit_softcap=50", "model.attention=cudnn"], "cuDNN's kernels do not cap scores"),
    (["model.sliding_window_pattern=2"], "describe windowed layers: set model.sliding_window"),
    (["train.xla_options=xla_gpu_dot_merger_threshold_mb"], "'xla_gpu_dot_merger_threshold_mb' is not NAME=VALUE"),
    (["train.xla_options=dot_merger=0"], r"train.xla_options: 'dot_merger=0' is not NAME=VALUE .*\(xla_...\)"),
])
def test_validation_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_all_errors_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.num_kv_heads=3", "train.batch_size=10", "train.micro_batches=4"])
    assert "num_kv_heads" in str(e.value) and "micro_batches" in str(e.value)


def test_yaml_round_trip():
    cfg = load_config("configs/t5_base.yaml")
    again = config_from_dict(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize("schedule,expected", [
    # steps 0, 9 (warmup: 10 steps from peak / 10), 10 (peak), 55, 99, 100 (end); peak 1, end ratio 0.1
    ("cosine", [0.1, 1.0, 1.0, 0.55, 0.1003, 0.1]),
    ("linear", [0.1, 1.0, 1.0, 0.55, 0.11, 0.1]),
    ("constant", [0.1, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("inverse_sqrt", [0.1, 1.0, 1.0, (10 / 55) ** 0.5, (10 / 99) ** 0.5, (10 / 100) ** 0.5]),
    ("wsd", [0.1, 1.0, 1.0, 1.0, 0.145, 0.1]),  # held to step 80, then linear over the last 20%
])
def test_learning_rate_schedules(schedule, expected):
    from t5x_lite.optim import make_schedule

    cfg = load_config(None, [f"optim.schedule={schedule}", "train.steps=100", "optim.warmup_steps=10",
                             "optim.learning_rate=1.0", "optim.end_lr_ratio=0.1"])
    f = make_schedule(cfg)
    got = [float(f(step)) for step in (0, 9, 10, 55, 99, 100)]
    expected[1] = 1.0 - 0.9 / 10  # the last warmup step: one step short of the peak
    assert got == pytest.approx(expected, abs=1e-4)
    if schedule == "wsd":
        assert float(f(80)) == pytest.approx(1.0) and float(f(81)) < 1.0
    with pytest.raises(ConfigError, match="decay_fraction"):
        load_config(None, ["optim.decay_fraction=0"])


def test_variant_values_may_hold_commas():
    from t5x_lite.config import parse_variant

    assert parse_variant("lora:model.lora_rank=8,model.lora_targets=query,value,wo") == (
        "lora", ["model.lora_rank=8", "model.lora_targets=query,value,wo"])
    assert parse_variant("b16:train.batch_size=16, train.micro_batches=2")[1] == ["train.batch_size=16",
                                                                                 "train.micro_batches=2"]
    with pytest.raises(ConfigError, match="expected NAME:key=value"):
        parse_variant("remat_full")


def test_xla_options_parse_like_xla_flags():
    cfg = load_config(None, ["train.xla_options=--xla_gpu_dot_merger_threshold_mb=0  xla_gpu_autotune_level=1"])
    assert cfg.train.compiler_options() == {"xla_gpu_dot_merger_threshold_mb": "0", "xla_gpu_autotune_level": "1"}
    assert load_config(None).train.compiler_options() == {}
    # XLA refuses a bool option given as the string "true": XLA_FLAGS' spelling becomes a bool
    flags = load_config(None, ["train.xla_options=xla_gpu_enable_dus_accumulator_zero_init_elimination=true "
                               "--xla_gpu_enable_latency_hiding_scheduler=FALSE"]).train.compiler_options()
    assert flags == {"xla_gpu_enable_dus_accumulator_zero_init_elimination": True,
                     "xla_gpu_enable_latency_hiding_scheduler": False}


def test_eval_of_a_mixture_run_takes_one_corpus_or_another_mixture(tmp_path):
    """`eval --set data.path=X` on a mixture run scores X alone (the mixture is dropped), and
    `--set data.mixture=...` on a one-corpus run drops its data.path: no both-set error."""
    from t5x_lite.trainer import eval_config, write_workdir_config

    write_workdir_config(load_config(None, ["data.mixture=a.jsonl=1, b.jsonl=3"]), str(tmp_path / "mix"))
    one = eval_config(str(tmp_path / "mix"), ["data.path=b.jsonl"]).data
    assert (one.path, one.mixture) == ("b.jsonl", None)
    assert eval_config(str(tmp_path / "mix"), []).data.mixture_sources() == [("a.jsonl", 0.25), ("b.jsonl", 0.75)]
    write_workdir_config(load_config(None, ["data.path=c.jsonl"]), str(tmp_path / "one"))
    mixed = eval_config(str(tmp_path / "one"), ["data.mixture=c.jsonl=1, d.jsonl=1"]).data
    assert (mixed.path, mixed.mixture) == (None, "c.jsonl=1, d.jsonl=1")
