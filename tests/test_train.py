"""The compiled train step and the train command: accumulation, learning, resume, bad input."""

import json
import os
import time

import chex
import jax
import numpy as np
import pytest

import t5x_lite
from t5x_lite import cli, partitioning, trainer
from t5x_lite.config import ConfigError

from helpers import random_batch, tiny_cfg

ONE_DEVICE = jax.devices()[:1]


def run_steps(cfg, batch, steps=1, state=None):
    setup = trainer.make_setup(cfg, partitioning.make_mesh(cfg, ONE_DEVICE))
    with setup.activation_context():
        if state is None:
            state = setup.init(jax.random.key(cfg.train.seed))
        history = []
        for _ in range(steps):
            state, metrics = setup.train_step(state, trainer.to_global(batch, setup.batch_sharding))
            history.append(jax.device_get(metrics))
    return state, history


@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
def test_micro_batches_equal_one_big_batch(family):
    # A large Adam epsilon keeps the first update linear in the gradient (g / (|g| + eps)), so the
    # parameters compare the gradients themselves rather than their signs.
    opts = ("optim.eps=10.0", "optim.clip_norm=0")
    full = tiny_cfg(family, "train.micro_batches=1", *opts)
    micro = tiny_cfg(family, "train.micro_batches=4", *opts)
    batch = random_batch(full, seed=3)
    batch["weights"][1, :] = 0.0  # unequal token counts per micro-batch: the mean must still match
    state_full, (m_full,) = run_steps(full, batch)
    state_micro, (m_micro,) = run_steps(micro, batch)
    np.testing.assert_allclose(m_micro["loss"], m_full["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_micro["grad_norm"], m_full["grad_norm"], rtol=1e-5)
    chex.assert_trees_all_close(state_micro.params, state_full.params, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family,objective,optimizer", [
    ("encoder", "mlm", "adamw"), ("decoder", "causal", "adamw"), ("decoder", "prefix", "adamw"),
    ("encoder_decoder", "span", "adamw"), ("decoder", "causal", "muon"),
])
def test_tiny_model_overfits_one_batch(family, objective, optimizer):
    cfg = tiny_cfg(family, f"data.objective={objective}", "optim.learning_rate=3e-3", "optim.schedule=constant",
                   "optim.weight_decay=0", "train.steps=80", "model.num_layers=1", f"optim.name={optimizer}")
    batch = random_batch(cfg, seed=1)
    if objective == "mlm":  # predict 15% of positions, as MLM does
        batch["weights"] = (batch["weights"] * (np.random.default_rng(0).random(batch["weights"].shape) < 0.15))
    _, history = run_steps(cfg, batch, steps=80)
    first, last = float(history[0]["loss"]), float(history[-1]["loss"])
    assert first > 3.0  # random tokens over a 61-word vocabulary start near ln(61)
    assert last < 0.25 * first, (first, last)
    assert float(history[-1]["accuracy"]) > 0.8


SMALL = ["model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1", "model.d_ff=64", "model.num_layers=1",
         "model.vocab_size=512", "data.seq_len=32", "train.batch_size=8", "data.max_docs=300",
         "train.log_every=2", "train.eval_every=4", "train.eval_batches=1", "checkpoint.every_steps=4"]


def _sharded_steps(cfg, batch, steps=2):
    """Loss history of ``steps`` train steps on the config's own mesh (8 devices here)."""
    setup = trainer.make_setup(cfg, partitioning.make_mesh(cfg))
    with setup.activation_context():
        state = setup.init(jax.random.key(cfg.train.seed))
        losses = []
        for _ in range(steps):
            state, metrics = setup.train_step(state, trainer.to_global(batch, setup.batch_sharding))
            losses.append(float(metrics["loss"]))
    return losses


def test_dropout_masks_are_seeded_per_step_and_independent_of_the_mesh():
    """Dropout (BERT's 0.1; 0.3 here) draws new masks every step from train.seed; the default
    threefry masks are the same on one device and on an 8-device ZeRO-3 mesh. XLA's RngBitGenerator
    (train.dropout_rng=rbg, cheaper on GPUs) draws other masks, as reproducibly."""
    base = ("model.dropout=0.3", "optim.learning_rate=1e-9")  # ~no update: steps differ by their masks
    batch = random_batch(tiny_cfg("encoder"), seed=5)
    off = [float(m["loss"]) for m in run_steps(tiny_cfg("encoder"), batch, steps=1)[1]]
    one = [float(m["loss"]) for m in run_steps(tiny_cfg("encoder", *base), batch, steps=2)[1]]
    assert one[0] != pytest.approx(off[0], rel=1e-3) and one[1] != pytest.approx(one[0], rel=1e-4)
    np.testing.assert_allclose(_sharded_steps(tiny_cfg("encoder", *base), batch), one, rtol=2e-5)
    rbg = tiny_cfg("encoder", *base, "train.dropout_rng=rbg")
    first, again = (_sharded_steps(rbg, batch) for _ in range(2))
    assert first == again and np.isfinite(first).all() and first[0] != pytest.approx(one[0], rel=1e-4)


def test_auto_attention_falls_back_when_cudnn_does_not_compile(monkeypatch):
    """attention=auto: a cuDNN kernel XLA refuses at compile time (simulated) rebuilds the step
    with the mask through cuDNN (which this CPU refuses for real), then with XLA; logged. Other
    errors, or an explicit attention choice, are not swallowed."""
    real = trainer.compile_train_step

    def refuse(reason):
        def compile_step(setup):
            if setup.cfg.model.attention == "auto":
                raise RuntimeError(reason)
            return real(setup)
        return compile_step

    cfg = tiny_cfg("decoder", "model.attention=auto", "model.max_segments=2")
    mesh = partitioning.make_mesh(cfg, ONE_DEVICE)
    lines = []
    monkeypatch.setattr(trainer, "compile_train_step", refuse("INTERNAL: cuDNN graph not supported"))
    setup, compiled = trainer.compile_or_fall_back(trainer.make_setup(cfg, mesh), mesh, lines.append)
    assert setup.cfg.model.attention == "xla" and compiled is not None
    assert [line.split("retrying with ")[1] for line in lines] == ["model.attention=cudnn", "model.attention=xla"]
    monkeypatch.setattr(trainer, "compile_train_step", refuse("RESOURCE_EXHAUSTED: out of memory"))
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.compile_or_fall_back(trainer.make_setup(cfg, mesh), mesh, lines.append)
    explicit = tiny_cfg("decoder", "model.attention=xla")
    monkeypatch.setattr(trainer, "compile_train_step", lambda setup: (_ for _ in ()).throw(RuntimeError("cuDNN")))
    with pytest.raises(RuntimeError, match="cuDNN"):
        trainer.compile_or_fall_back(trainer.make_setup(explicit, mesh), mesh, lines.append)
    assert len(lines) == 2


def test_xla_options_reach_the_train_steps_compile():
    """train.xla_options go to XLA with the train step's compile: an option XLA knows compiles
    (GPU options, which CPU XLA takes too: the dot merger's threshold, and a bool spelt as in
    XLA_FLAGS), one it does not know is XLA's refusal, named as the config key's."""
    mesh = partitioning.make_mesh(tiny_cfg("decoder"), ONE_DEVICE)
    ok = tiny_cfg("decoder", "train.xla_options=--xla_gpu_dot_merger_threshold_mb=0 "
                             "xla_gpu_enable_dus_accumulator_zero_init_elimination=true")
    assert trainer.compile_train_step(trainer.make_setup(ok, mesh)) is not None
    bad = tiny_cfg("decoder", "train.xla_options=xla_gpu_dot_merger_threshold=0")
    with pytest.raises(ConfigError, match=r"train.xla_options='xla_gpu_dot_merger_threshold=0': .*"
                                          r"No such compile option: 'xla_gpu_dot_merger_threshold'"):
        trainer.compile_train_step(trainer.make_setup(bad, mesh))
    bad_value = tiny_cfg("decoder", "train.xla_options=xla_gpu_dot_merger_threshold_mb=lots")
    with pytest.raises(ConfigError, match="train.xla_options=.*xla_gpu_dot_merger_threshold_mb, 'lots' is not"):
        trainer.compile_train_step(trainer.make_setup(bad_value, mesh))
    with pytest.raises(Exception, match="No such compile option: 'xla_nothing'") as e:  # not the config's
        trainer.compile_train_step(trainer.make_setup(ok, mesh), compiler_options={"xla_nothing": "1"})
    assert not isinstance(e.value, ConfigError)


def cli_run(capsys, *args):
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_command_logs_plots_and_resumes(tmp_path, capsys):
    wd = str(tmp_path / "run")
    args = ["train", "--config", "configs/decoder_tiny.yaml", "--workdir", wd, *sum((["--set", s] for s in SMALL), [])]
    code, out, _ = cli_run(capsys, *args, "--set", "train.steps=6")
    assert code == 0
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 4, 6]
    for key in ("loss", "learning_rate", "tokens_per_sec", "accuracy", "grad_norm"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    assert all(0 <= r["data_time"] < r["step_time"] for r in train_rows)  # host time making batches
    assert any("eval_loss" in r and r["step"] == 4 for r in rows)
    assert os.listdir(os.path.join(wd, "tb"))  # TensorBoard event file
    for line in ("mesh data=1 x fsdp=8 x tensor=1", "zero_stage=3", "per device: params", "compiled train step"):
        assert line in out, line

    assert "XLA options" not in out
    # The same command continues (XLA options may change between runs); rows after the checkpoint
    # are not duplicated.
    code, out, _ = cli_run(capsys, *args, "--set", "train.steps=8",
                           "--set", "train.xla_options=xla_gpu_dot_merger_threshold_mb=0")
    assert code == 0
    assert "resumed from checkpoint at step 6" in out
    assert "XLA options 'xla_gpu_dot_merger_threshold_mb=0'" in out
    steps = [json.loads(line)["step"] for line in open(os.path.join(wd, "metrics.jsonl")) if '"loss"' in line]
    assert steps == [1, 2, 4, 6, 8]

    code, out, _ = cli_run(capsys, "plot", "--workdir", wd)
    assert code == 0 and os.path.getsize(out.strip()) > 10_000 and out.strip().endswith(".png")


def test_fit_max_segments_builds_the_model_for_its_rows_and_resumes(tmp_path, capsys, monkeypatch):
    """model.fit_max_segments: the model's packed layout is built for the cap the data needs, the
    work dir keeps the config as given, and a rerun finds the same cap and resumes."""
    import re

    built = []
    make_setup = trainer.make_setup
    monkeypatch.setattr(trainer, "make_setup", lambda cfg, mesh: built.append(cfg.model.max_segments)
                        or make_setup(cfg, mesh))
    wd = str(tmp_path / "run")
    args = ["train", "--config", "configs/decoder_tiny.yaml", "--workdir", wd, *sum((["--set", s] for s in SMALL), []),
            "--set", "model.attention=auto", "--set", "model.max_segments=16", "--set", "model.fit_max_segments=true"]
    code, out, _ = cli_run(capsys, *args, "--set", "train.steps=2")
    assert code == 0
    fitted = int(re.search(r"model\.max_segments 16 -> (\d+) \(model\.fit_max_segments\)", out).group(1))
    assert 1 < fitted < 16 and built == [fitted]
    assert "max_segments: 16" in open(os.path.join(wd, "config.yaml")).read()
    code, out, _ = cli_run(capsys, *args, "--set", "train.steps=4")
    assert code == 0 and "resumed from checkpoint at step 2" in out and built == [fitted, fitted]


def test_a_step_waiting_for_its_batch_is_named(tmp_path, capsys, monkeypatch):
    """metrics.jsonl's data_time is the host's time making a step's batch; when it is most of
    the step, the log says the device is waiting for data."""
    from t5x_lite.data.pipeline import Batches

    real = Batches.batches

    def slow(self, step, *args):
        time.sleep(0.25)
        return real(self, step, *args)

    monkeypatch.setattr(Batches, "__call__", slow)
    wd = str(tmp_path / "run")
    code, out, _ = cli_run(capsys, "train", "--config", "configs/decoder_tiny.yaml", "--workdir", wd,
                           *sum((["--set", s] for s in SMALL), []), "--set", "train.steps=6")
    assert code == 0
    assert out.count("making batches took") == 1
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl")) if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2, 4, 6]
    assert all(0 <= r["data_time"] <= r["step_time"] for r in rows)
    # step 1's time holds batches 1 and 2, step 2's batch 3; steps 4 (an eval follows) and 6 (the
    # last) finish with no batch made in their time
    assert rows[0]["data_time"] >= 0.5 and rows[1]["data_time"] >= 0.25
    assert rows[2]["data_time"] == rows[3]["data_time"] == 0


def test_rerun_with_other_model_refuses_to_start_over(tmp_path, capsys):
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "config.yaml").write_text(tiny_cfg("decoder").to_yaml())
    code, _, err = cli_run(capsys, "train", "--config", "configs/decoder_tiny.yaml", "--workdir", str(wd))
    assert code == 2 and "different model/data config" in err and "model.d_model" in err


def test_how_the_model_computes_may_change_between_runs(tmp_path):
    """Attention kernel, remat and scan unroll change the arithmetic, not the checkpoint or data."""
    from t5x_lite.trainer import check_workdir_config, write_workdir_config

    write_workdir_config(tiny_cfg("decoder"), str(tmp_path))
    check_workdir_config(tiny_cfg("decoder", "model.attention=auto", "model.remat=full", "model.scan_unroll=2",
                                  "model.fused_qkv=true", "model.fused_mlp=true"), str(tmp_path))
    with pytest.raises(ConfigError, match="model.max_segments: 0 -> 4"):  # changes the rows
        check_workdir_config(tiny_cfg("decoder", "model.max_segments=4"), str(tmp_path))


def _snapshot(path):
    return {p: open(os.path.join(path, p), "rb").read() for p in sorted(os.listdir(path))}


@pytest.mark.parametrize("overrides,match", [
    (["data.path={empty}"], "empty"),
    (["model.vocab_sizee=100"], "unknown config key 'model.vocab_sizee'"),
    (["model.vocab_size=40"], "vocab_size"),
    (["model.family=encoder", "model.position=learned", "model.max_length=16", "data.seq_len=32"], "max_length"),
    (["train.micro_batches=3"], "micro_batches"),
    (["mesh.tensor=3"], "mesh"),
])
def test_bad_input_fails_cleanly_before_touching_the_workdir(tmp_path, capsys, overrides, match):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "marker.txt").write_text("keep me")
    before = _snapshot(wd)
    sets = sum((["--set", s.format(empty=empty)] for s in SMALL + overrides), [])
    code, out, err = cli_run(capsys, "train", "--config", "configs/decoder_tiny.yaml", "--workdir", str(wd), *sets)
    assert code == 2
    assert err.startswith("error:") and match in err, err
    assert "Traceback" not in err
    assert _snapshot(wd) == before


def _grads(cfg, params, batch):
    from t5x_lite.models import build_model

    loss_sums = trainer.make_loss_fn(cfg, build_model(cfg))

    def loss(p):
        s = loss_sums(p, batch, jax.random.key(0))
        return s["loss"] / s["weight"], s

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("family,chunk", [("decoder", 6), ("encoder_decoder", 8), ("encoder", 5)])
def test_chunked_cross_entropy_equals_full_logits(family, chunk):
    import t5x_lite

    full = tiny_cfg(family, "train.z_loss=1e-3")
    chunked = tiny_cfg(family, "train.z_loss=1e-3", f"train.loss_chunk={chunk}")  # 16 positions: padded chunks
    params = t5x_lite.init_params(full, 0)
    batch = {k: jax.numpy.asarray(v) for k, v in random_batch(full, seed=2).items()}
    (loss_a, sums_a), grads_a = _grads(full, params, batch)
    (loss_b, sums_b), grads_b = _grads(chunked, params, batch)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    for key in ("weight", "correct", "z_loss"):
        np.testing.assert_allclose(sums_b[key], sums_a[key], rtol=1e-6)
    chex.assert_trees_all_close(grads_b, grads_a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [0, 2])
def test_mlm_head_at_scored_positions_equals_full_logits(chunk):
    """The MLM loss runs the vocabulary head only where the objective scores: the same loss,
    counts and gradients as the head over every position."""
    import t5x_lite
    from t5x_lite.losses import cross_entropy_sums, max_scored_positions
    from t5x_lite.models import build_model

    cfg = tiny_cfg("encoder", "train.z_loss=1e-3", "model.mlm_head_transform=true", f"train.loss_chunk={chunk}")
    params = t5x_lite.init_params(cfg, 0)
    batch = {k: jax.numpy.asarray(v) for k, v in random_batch(cfg, seed=3).items()}
    length = batch["weights"].shape[1]
    scored = np.asarray(batch["weights"]).sum(-1)
    assert 0 < scored.max() <= max_scored_positions(length, cfg.data.mlm_rate) < length
    model = build_model(cfg)

    def full(p):
        logits = model.apply({"params": p}, batch["input_ids"], batch["segment_ids"], batch["positions"])
        s = cross_entropy_sums(logits, batch["targets"], batch["weights"], z_loss=1e-3)
        return s["loss"] / s["weight"], s

    (loss_ref, sums_ref), grads_ref = jax.jit(jax.value_and_grad(full, has_aux=True))(params)
    (loss, sums), grads = _grads(cfg, params, batch)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    for key in ("weight", "correct", "z_loss"):
        np.testing.assert_allclose(sums[key], sums_ref[key], rtol=1e-6)
    chex.assert_trees_all_close(grads, grads_ref, rtol=1e-5, atol=1e-5)  # embedding grads reach ~5
    hlo = jax.jit(lambda p: trainer.make_loss_fn(cfg, model)(p, batch, jax.random.key(0))["loss"]).lower(
        params).as_text()
    rows = batch["weights"].shape[0]
    assert f"{rows}x{length}x{cfg.model.vocab_size}" not in hlo.replace(",", "x")  # no logits at every position


def test_params_cast_once_per_step_change_nothing():
    import t5x_lite
    from t5x_lite.models import build_model

    cfg = tiny_cfg("decoder", "model.dtype=bfloat16")
    params = t5x_lite.init_params(cfg, 0)
    cast = trainer.cast_for_compute(cfg)(params)
    kinds = {str(x.dtype) for x in jax.tree.leaves(cast)}
    assert kinds == {"bfloat16", "float32"}  # kernels/embeddings bf16, norm scales stay fp32
    ids = np.random.default_rng(0).integers(5, 61, (2, 12)).astype(np.int32)
    model = build_model(cfg)
    a = model.apply({"params": params}, input_ids=ids)
    b = model.apply({"params": cast}, input_ids=ids)
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_cli_turns_on_the_persistent_compilation_cache(tmp_path, monkeypatch):
    from t5x_lite import cli

    before = jax.config.jax_compilation_cache_dir  # conftest's own cache
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("T5X_LITE_COMPILE_CACHE", "off")
        cli.enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir is None
        monkeypatch.setenv("T5X_LITE_COMPILE_CACHE", str(tmp_path / "xla"))
        cli.enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))  # JAX's own setting wins
        cli.enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    assert {"train", "eval", "decode", "sweep"} <= cli.COMPILING


# ------------------------------------------------------------------ float16 loss scaling


def assert_opt_state_round_trips(directory, setup, state):
    """Saved and restored through the trainer's checkpoints, the optimizer state is unchanged."""
    from t5x_lite.checkpoints import Checkpoints

    step = int(state.step)
    ckpt = Checkpoints(str(directory), setup.cfg)
    ckpt.save(step, state, {"step": step})
    ckpt.wait()
    restored, _ = ckpt.restore(step, setup.abstract_state)
    chex.assert_trees_all_equal(jax.device_get(restored.opt_state), jax.device_get(state.opt_state))
    ckpt.close()


def test_dynamic_loss_scale_skips_non_finite_steps_and_adapts():
    import jax.numpy as jnp
    import optax

    from t5x_lite.optim import dynamic_loss_scale, loss_scale_of

    tx = dynamic_loss_scale(optax.sgd(1.0), init_scale=8.0, period=2)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    finite, broken = {"w": jnp.full(3, 0.5)}, {"w": jnp.array([0.5, jnp.inf, 0.5])}
    history = []
    for grads in (finite, broken, broken, finite, finite, finite):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        s = loss_scale_of(state)
        history.append((float(s.scale), int(s.good_steps), int(s.inner.total_notfinite), float(params["w"][0])))
    assert history == [(8.0, 1, 0, 0.5),  # applied
                       (4.0, 0, 1, 0.5), (2.0, 0, 2, 0.5),  # skipped: params as they were, scale halved
                       (2.0, 1, 2, 0.0), (4.0, 0, 2, -0.5),  # 2 finite steps in a row: doubled
                       (4.0, 1, 2, -1.0)]
    assert loss_scale_of(optax.sgd(1.0).init(params)) is None


def test_float16_training_scales_its_loss(tmp_path):
    """float16 compute (loss_scale auto = dynamic): steps whose scaled backward pass overflows are
    skipped (the same loss again: nothing moved) and halve the scale; then training follows float32.
    The state round-trips a checkpoint."""
    def run(*sets, steps=12):
        cfg = tiny_cfg("decoder", *sets, "mesh.fsdp=1", "optim.warmup_steps=0", "optim.learning_rate=1e-2")
        setup = trainer.make_setup(cfg, partitioning.make_mesh(cfg, jax.devices()[:1]))
        with setup.activation_context():
            state = setup.init(jax.random.key(0))
            batch = trainer.to_global(random_batch(cfg), setup.batch_sharding)
            rows = []
            for _ in range(steps):
                state, m = setup.train_step(state, batch)
                rows.append({k: float(v) for k, v in m.items()})
        return cfg, setup, state, rows

    cfg, setup, state, fp16 = run("model.dtype=float16", "train.loss_scale_init=4194304", "train.loss_scale_period=3")
    *_, fp32 = run("model.dtype=float32")
    skipped = int(fp16[-1]["skipped_steps"])
    assert 2 <= skipped <= 8
    assert [r["loss_scale"] for r in fp16[:skipped]] == [4194304 / 2 ** i for i in range(skipped)]
    assert len({r["loss"] for r in fp16[:skipped + 1]}) == 1  # skipped steps changed nothing
    applied = [r["loss"] for r in fp16[skipped:]]
    np.testing.assert_allclose(applied, [r["loss"] for r in fp32[:len(applied)]], rtol=2e-2)
    assert applied[-1] < applied[0] - 1.0
    assert fp16[skipped + 3]["loss_scale"] == 2 * fp16[skipped]["loss_scale"]  # period 3: doubled

    assert_opt_state_round_trips(tmp_path, setup, state)


def test_float16_skips_are_one_decision_for_the_whole_mesh():
    """ZeRO-3 on 8 devices: each device sees a shard of the gradients, yet every step is skipped
    or applied everywhere at once (the finiteness check is global), as on one device."""
    def run(fsdp):
        cfg = tiny_cfg("decoder", "model.dtype=float16", "train.loss_scale_init=4194304", f"mesh.fsdp={fsdp}",
                       "sharding.zero_stage=3")
        setup = trainer.make_setup(cfg, partitioning.make_mesh(cfg, jax.devices()[:fsdp]))
        with setup.activation_context():
            state = setup.init(jax.random.key(0))
            rows = []
            for i in range(9):
                state, m = setup.train_step(state, trainer.to_global(random_batch(cfg, seed=i), setup.batch_sharding))
                rows.append((float(m["loss"]), float(m["loss_scale"]), int(m["skipped_steps"])))
        return rows

    one, eight = run(1), run(8)
    assert [r[1:] for r in eight] == [r[1:] for r in one] and one[-1][2] >= 2
    np.testing.assert_allclose([r[0] for r in eight], [r[0] for r in one], rtol=1e-2)


def test_the_loss_scale_keeps_float16_gradients_from_underflowing():
    """Why the scale: float16 gradients of the mean loss times 2^15 are float32's to float16
    precision; times 2^-12 (a loss far smaller than its scale) they lose their small values."""
    from t5x_lite.models import build_model

    base = tiny_cfg("decoder", "mesh.fsdp=1")
    params = t5x_lite.init_params(base, 0)
    batch = {k: jax.numpy.asarray(v) for k, v in random_batch(base).items()}
    n = batch["targets"].size

    def grads(dtype, scale):
        cfg = tiny_cfg("decoder", f"model.dtype={dtype}", "mesh.fsdp=1")
        loss_sums = trainer.make_loss_fn(cfg, build_model(cfg))
        g = jax.grad(lambda p: loss_sums(p, batch, jax.random.key(0))["loss"] * (scale / n))(params)
        return jax.tree.map(lambda x: x / (scale / n), g)

    ref = grads("float32", 1.0)

    def worst_error(g):
        return max(float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref)))

    scaled, tiny = worst_error(grads("float16", 2.0 ** 15)), worst_error(grads("float16", 2.0 ** -12))
    assert scaled < 1e-2 and tiny > 10 * scaled


def test_muon_orthogonalises_each_layers_matrices(tmp_path):
    """optim.name=muon: the projection kernels, read as matrices from their logical axes (one per
    stacked layer), get Muon's orthogonalised updates at AdamW's RMS; embeddings, the output
    layer and norms get AdamW's. The state round-trips a checkpoint."""
    from t5x_lite.optim import MUON_RMS, muon_dimensions

    cfg = tiny_cfg("decoder", "optim.name=muon", "mesh.fsdp=1", "model.tie_embeddings=false")
    dims = muon_dimensions(cfg)
    layer = "['decoder']['stack']['layers']"
    assert dims[f"{layer}['self_attention']['query']['kernel']"] == ((1,), (2, 3))  # [L, D, N, H]: D -> N x H
    assert dims[f"{layer}['self_attention']['out']['kernel']"] == ((1, 2), (3,))  # [L, N, H, D]: N x H -> D
    assert dims[f"{layer}['mlp']['wo']['kernel']"] == ((1,), (2,))
    assert not any("embed']" in k or "lm_head" in k or "scale" in k for k in dims)

    setup = trainer.make_setup(cfg, partitioning.make_mesh(cfg, jax.devices()[:1]))
    with setup.activation_context():
        state = setup.init(jax.random.key(0))
        before = jax.device_get(state.params)  # (the step donates the state)
        new, _ = setup.train_step(state, trainer.to_global(random_batch(cfg), setup.batch_sharding))
    lr = float(setup.schedule(0))
    update = np.asarray(new.params["decoder"]["stack"]["layers"]["mlp"]["wi_0"]["kernel"]
                        - before["decoder"]["stack"]["layers"]["mlp"]["wi_0"]["kernel"])  # [L, D, F]
    for matrix in update:  # each layer's own orthogonalisation: singular values near equal
        sv = np.linalg.svd(matrix / (lr * MUON_RMS * np.sqrt(max(matrix.shape))), compute_uv=False)
        assert 0.5 < sv.min() and sv.max() < 1.5, sv
    head = np.asarray(new.params["head"]["lm_head"]["kernel"] - before["head"]["lm_head"]["kernel"])
    sv = np.linalg.svd(head / (lr * MUON_RMS * np.sqrt(max(head.shape))), compute_uv=False)
    assert sv.max() / sv.min() > 3  # AdamW's (sign-like) update: not orthogonal

    assert_opt_state_round_trips(tmp_path, setup, new)


def test_a_mixture_trains_and_reports_an_eval_loss_a_corpus(tmp_path, capsys, monkeypatch):
    """data.mixture through the train command: the log says how often each corpus is read, and
    every eval gives the mixture's loss and one a corpus (metrics.jsonl: eval_loss/<name>), each
    equal to evaluating that corpus alone (`eval --set data.path=...`)."""
    from test_data import synthetic_corpus, write_corpus

    docs = synthetic_corpus(400)
    write_corpus(tmp_path / "web.jsonl", docs[:250])
    write_corpus(tmp_path / "code.jsonl", [d.upper() for d in docs[250:]])
    wd = str(tmp_path / "run")
    mixture = f"data.mixture={tmp_path / 'web.jsonl'}=3, {tmp_path / 'code.jsonl'}=1"
    args = ["train", "--config", "configs/decoder_tiny.yaml", "--workdir", wd,
            *sum((["--set", s] for s in SMALL if not s.startswith("data.max_docs")), []), "--set", mixture,
            "--set", "train.steps=4"]
    code, out, _ = cli_run(capsys, *args)
    assert code == 0
    assert f"{tmp_path / 'web.jsonl'}: the " in out and f"{tmp_path / 'code.jsonl'}: the " in out
    (row,) = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl")) if "eval_loss" in line]
    assert set(row) >= {"eval_loss", "eval_loss/web", "eval_loss/code"} and row["step"] == 4
    assert row["eval_loss/web"] != row["eval_loss/code"]
    code, out, _ = cli_run(capsys, "eval", "--workdir", wd, "--set", f"data.path={tmp_path / 'code.jsonl'}")
    alone = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))][-1]
    assert code == 0 and abs(alone["eval_loss"] - row["eval_loss/code"]) < 1e-5
    import matplotlib.axes

    from t5x_lite.metrics import plot_metrics

    seen, draw = [], matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda ax, *a, **k: seen.append(k.get("label")) or draw(ax, *a, **k))
    plot_metrics(wd, str(tmp_path / "m.png"))
    assert {"eval_loss/web", "eval_loss/code"} <= set(seen)  # a line a corpus beside the mixture's
