"""Checkpoints: exact resume after kill -9, SIGTERM, a save killed half-way, restore onto other
meshes and ZeRO stages, damaged checkpoints, keep-best, export and eval.

One reference run (``straight``, in this process) trains 8 steps. ``interrupted`` trains the same
config in one work dir three times: a subprocess stopped by SIGTERM after step 3; a subprocess
that resumes, saves step 4 and is killed with SIGKILL while it sleeps in the middle of logging
step 7 and of committing step 6 (hooks patched in by the subprocess' wrapper, so the kill is not
a race); and a last run here that resumes from step 4, an async save that later steps ran past.
Everything else reads the reference run's checkpoints.
"""

import asyncio
import dataclasses
import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from t5x_lite import checkpoints, cli, partitioning, trainer
from t5x_lite.checkpoints import (
    CheckpointError,
    Checkpoints,
    check_resume,
    load_for_inference,
    read_config,
    run_meta,
)
from t5x_lite.config import load_config
from t5x_lite.data import DataError, Tokenizer, make_datasets

from test_data import synthetic_corpus

STEPS = 8
SETTINGS = [
    "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1", "model.d_ff=64", "model.num_layers=1",
    "model.vocab_size=512", "data.seq_len=32", "train.batch_size=8", f"train.steps={STEPS}", "train.log_every=1",
    "train.eval_every=4", "train.eval_batches=1", "train.progress=false", "checkpoint.every_steps=2",
    "checkpoint.keep=3",
]
TRAIN_KEYS = ("loss", "accuracy", "grad_norm", "learning_rate", "eval_loss", "eval_accuracy")

# Runs `t5x-lite` with test hooks: SIGTERM to itself right after logging row T5X_TEST_SIGTERM_AT,
# and sleeping (after writing a marker file) right after logging row T5X_TEST_HANG_AT and just
# before orbax commits (renames) the step directory T5X_TEST_HANG_SAVE.
WRAPPER = r"""
import asyncio, os, signal, sys, time
from orbax.checkpoint._src.path import atomicity
from t5x_lite import cli, metrics

env = os.environ.get
def mark(name):
    open(os.path.join(env("T5X_TEST_MARKERS"), name), "w").close()

write = metrics.MetricsWriter.write
def hooked_write(self, step, scalars):
    write(self, step, scalars)
    if "loss" in scalars and step == int(env("T5X_TEST_SIGTERM_AT", "0")):
        os.kill(os.getpid(), signal.SIGTERM)
    if "loss" in scalars and step == int(env("T5X_TEST_HANG_AT", "0")):
        mark("row")
        time.sleep(600)
metrics.MetricsWriter.write = hooked_write

finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def hooked_finalize(self):
    if self.get_final().name == env("T5X_TEST_HANG_SAVE"):
        mark("save")
        await asyncio.sleep(600)
    return await finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = hooked_finalize

sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small JSON-lines corpus and a tokenizer trained on it once, shared by every run."""
    root = tmp_path_factory.mktemp("data")
    docs = synthetic_corpus(300)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    Tokenizer.train(docs, str(root / "tok.model"), 512, 32, seed=0)
    return [f"data.path={corpus}", f"data.tokenizer={root / 'tok.model'}"]


def train_args(workdir, data, *extra):
    sets = SETTINGS + data + list(extra)
    return ["train", "--config", "configs/decoder_tiny.yaml", "--workdir", str(workdir),
            *[a for s in sets for a in ("--set", s)]]


def start(args, markers, **hooks):
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest", T5X_TEST_MARKERS=str(markers),
               **{f"T5X_TEST_{k.upper()}": str(v) for k, v in hooks.items()})
    out = open(markers / "output.txt", "w")
    return subprocess.Popen([sys.executable, "-c", WRAPPER, *args], env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for(proc, markers, names, timeout=180):
    t0 = time.time()
    while not all((markers / n).exists() for n in names):
        assert proc.poll() is None, f"run ended early:\n{(markers / 'output.txt').read_text()}"
        assert time.time() - t0 < timeout, f"no {names} after {timeout}s:\n{(markers / 'output.txt').read_text()}"
        time.sleep(0.05)


def rows(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def train_log(workdir):
    with open(os.path.join(workdir, "train.log")) as f:
        return f.read()


def setup_for(cfg, devices=None):
    return trainer.make_setup(cfg, partitioning.make_mesh(cfg, devices))


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory, interrupted_runs_started):
    """8 uninterrupted steps, ZeRO-3 over 8 devices (checkpoints 4, 6, 8 are kept)."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    assert cli.main(train_args(workdir, data)) == 0
    return str(workdir)


@pytest.fixture(scope="module")
def interrupted_runs_started(data, tmp_path_factory):
    """The SIGTERM run, started before the reference run so that the two overlap."""
    workdir = tmp_path_factory.mktemp("interrupted") / "run"
    markers = tmp_path_factory.mktemp("markers1")
    proc = start(train_args(workdir, data), markers, sigterm_at=2)
    return workdir, markers, proc


@pytest.fixture(scope="module")
def interrupted(data, tmp_path_factory, interrupted_runs_started, straight):
    workdir, markers1, term = interrupted_runs_started
    term_code = term.wait(timeout=240)
    term_output = (markers1 / "output.txt").read_text()
    after_term = sorted(Checkpoints(workdir, load_config(None, SETTINGS + data), read_only=True).all_steps())

    markers2 = tmp_path_factory.mktemp("markers2")
    # this run's batches come from worker processes (data.workers): its step-4 checkpoint, which the
    # last run resumes from, must still equal the reference run's
    killed = start(train_args(workdir, data, "data.workers=2"), markers2, hang_at=7, hang_save=6)
    wait_for(killed, markers2, ["row", "save"])
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    killed_output = (markers2 / "output.txt").read_text()
    leftovers = sorted(os.listdir(os.path.join(workdir, "checkpoints")))

    assert cli.main(train_args(workdir, data)) == 0  # resumes here
    return dict(workdir=str(workdir), term_code=term_code, term_output=term_output, after_term=after_term,
                killed_output=killed_output, leftovers=leftovers)


# ------------------------------------------------------------------ interrupted runs


def test_sigterm_saves_the_step_reached_and_exits_0(interrupted):
    assert interrupted["term_code"] == 0, interrupted["term_output"]
    # SIGTERM arrived while step 3 ran (right after row 2 was logged): step 3 is finished and saved.
    assert "SIGTERM: stopped after step 3; checkpoint" in interrupted["term_output"]
    assert interrupted["after_term"] == [2, 3]
    assert "resumed from checkpoint at step 3" in interrupted["killed_output"]
    assert "2 worker processes make the batches" in interrupted["killed_output"]


def test_kill_during_async_save_resumes_from_previous_complete(interrupted):
    # The kill left step 6 half-committed: a temporary directory, never a step directory.
    assert interrupted["leftovers"] == ["2", "3", "4", "6.orbax-checkpoint-tmp"]
    log = train_log(interrupted["workdir"])
    assert "checkpoint at step 6 was never completed (its save was interrupted)" in log
    assert "using step 4, the latest complete checkpoint" in log
    assert "resumed from checkpoint at step 4" in log


def test_resumed_losses_bitwise_equal_uninterrupted(interrupted, straight):
    got, want = rows(interrupted["workdir"]), rows(straight)
    steps = [(r["step"], "loss" in r) for r in got]
    assert steps == [(r["step"], "loss" in r) for r in want]  # no duplicate row after the resumes
    assert len(set(steps)) == len(steps) and len(got) == STEPS + 2  # 8 train rows + 2 eval rows
    for g, w in zip(got, want):
        assert {k: g[k] for k in TRAIN_KEYS if k in w} == {k: w[k] for k in TRAIN_KEYS if k in w}, g["step"]
    cfg = read_config(straight)
    target = setup_for(cfg).abstract_state
    final = [Checkpoints(wd, cfg, read_only=True).restore(STEPS, target)[0] for wd in (straight, interrupted["workdir"])]
    chex.assert_trees_all_equal(jax.device_get(final[0]), jax.device_get(final[1]))


def test_resume_refuses_another_seed_or_corpus(straight, data, tmp_path):
    cfg = read_config(straight)
    _, saved = Checkpoints(straight, cfg, read_only=True).restore(STEPS, setup_for(cfg).abstract_state)

    def current(*overrides):
        c = load_config(None, SETTINGS + data + list(overrides))
        tokenizer, batches, _ = make_datasets(c, str(tmp_path), log=lambda line: None)
        return run_meta(c, batches, tokenizer)

    check_resume(saved, current(), "at step 8", log=pytest.fail)  # the run that wrote it: accepted
    with pytest.raises(DataError, match="the training token stream differs"):
        check_resume(saved, current("data.max_docs=299"), "at step 8", log=pytest.fail)
    with pytest.raises(DataError, match="train.seed=1, but the checkpoint was trained with seed 0"):
        check_resume(saved, current("train.seed=1"), "at step 8", log=pytest.fail)
    notes = []
    check_resume(saved, current("train.batch_size=16"), "at step 8", log=notes.append)
    assert notes and "train.batch_size changed from 8 to 16" in notes[0]


# ------------------------------------------------------------------ other meshes


@pytest.mark.parametrize("layout,num_devices", [({"sharding.zero_stage": 0}, 1),
                                                ({"mesh.fsdp": 4, "mesh.tensor": 2}, 8),
                                                ({"sharding.zero_stage": 1}, 4)])
def test_restore_onto_other_mesh_and_zero_stage(straight, layout, num_devices):
    saved_cfg = read_config(straight)  # ZeRO-3 over 8 devices
    reference, _ = Checkpoints(straight, saved_cfg, read_only=True).restore(STEPS, setup_for(saved_cfg).abstract_state)
    cfg = read_config(straight)
    for key, value in layout.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    setup = setup_for(cfg, jax.devices()[:num_devices])
    state, meta = Checkpoints(straight, cfg, read_only=True).restore(STEPS, setup.abstract_state)
    assert meta["step"] == STEPS and int(state.step) == STEPS
    # Restored straight into the new layout's shardings, values unchanged.
    same_sharding = jax.tree.map(lambda x, s: x.sharding == s, state, setup.state_shardings)
    assert all(jax.tree.leaves(same_sharding))
    chex.assert_trees_all_equal(jax.device_get(state), jax.device_get(reference))


# ------------------------------------------------------------------ damage, retention


def damage(workdir, how):
    if how == "truncated array file":
        # Every array data file of the params item, cut in half: which file holds which array
        # depends on how orbax batched the async writes, so one file alone is not always read.
        params = os.path.join(workdir, "checkpoints", str(STEPS), "params")
        data_files = [os.path.join(root, n) for root, _, names in os.walk(params)
                      if os.path.basename(root) == "d" for n in names]
        assert data_files
        for path in data_files:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    else:
        os.remove(os.path.join(workdir, "checkpoints", str(STEPS), "params", "manifest.ocdbt"))


@pytest.mark.parametrize("how", ["truncated array file", "deleted manifest"])
def test_damaged_checkpoint_is_named_and_fallback_uses_previous(straight, tmp_path, how):
    workdir = str(tmp_path / "run")
    shutil.copytree(straight, workdir)
    damage(workdir, how)
    cfg = read_config(workdir)
    target = setup_for(cfg).abstract_state
    lines = []
    ckpt = Checkpoints(workdir, cfg)
    with pytest.raises(CheckpointError) as e:
        ckpt.restore_latest(target, fallback=False, log=lines.append)
    ckpt.close()
    message = str(e.value)
    assert f"checkpoint at step {STEPS} ({os.path.join(workdir, 'checkpoints', str(STEPS))}) cannot be read" in message
    assert "params" in message and "checkpoint.fallback=true resumes from step 6" in message

    ckpt = Checkpoints(workdir, cfg)
    step, state, _ = ckpt.restore_latest(target, fallback=True, log=lines.append)
    ckpt.close()
    aside = os.path.join(workdir, "checkpoints.damaged", str(STEPS))
    assert step == 6 and "falling back to step 6" in lines[-2]
    assert lines[-1] == f"moved the damaged checkpoint at step {STEPS} to {aside}" and os.path.isdir(aside)
    previous, _ = Checkpoints(straight, cfg, read_only=True).restore(6, target)
    chex.assert_trees_all_equal(jax.device_get(state), jax.device_get(previous))


def test_fallback_log_holds_no_tracebacks_of_the_failed_reads(straight, data, tmp_path):
    """The shard reads still running when a restore fails finished afterwards against orbax's closed
    event loop: `t5x-lite train` resuming past a damaged checkpoint printed a `RuntimeError: Event
    loop is closed` traceback a shard (and, when collected, asyncio's "Future exception was never
    retrieved" with a TensorStore spec each) in the middle of a run that was fine."""
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    damage(str(workdir), "truncated array file")
    run = subprocess.run([sys.executable, "-m", "t5x_lite", *train_args(workdir, data, "checkpoint.fallback=true")],
                         env=dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest"), capture_output=True, text=True)
    log = run.stdout + run.stderr
    assert run.returncode == 0 and "falling back to step 6" in log, log
    for noise in ("Traceback", "Event loop is closed", "exception was never retrieved", "tensorstore_spec"):
        assert noise not in log, log


def test_late_read_filters_drop_nothing_else(monkeypatch, caplog):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpoints._quiet_late_reads()
    checkpoints._drop_failed_reads()

    class Other:
        def __del__(self):
            raise RuntimeError("Event loop is closed")  # the same error from Python code: not a late read

    Other()
    assert [str(u.exc_value) for u in seen] == ["Event loop is closed"]

    async def fail():
        raise ValueError("not a checkpoint read")

    loop = asyncio.new_event_loop()
    future = loop.create_task(fail())
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        del future
        gc.collect()
    assert "not a checkpoint read" in caplog.text


def test_failed_reads_are_collected_without_never_awaited_warnings():
    """The coroutines a failed restore leaves unawaited (orbax's metadata reads) are collected
    without a RuntimeWarning each; one left elsewhere, later, still warns."""
    import warnings

    async def _get_array_metadatas():
        pass

    def unawaited_in_a_cycle():  # collected by the garbage collector, as a failed restore's are
        holder = [_get_array_metadatas()]
        holder.append(holder)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        unawaited_in_a_cycle()
        checkpoints._drop_failed_reads()
        assert not [w for w in seen if "never awaited" in str(w.message)]
        unawaited_in_a_cycle()
        gc.collect()
        assert [w.category for w in seen if "never awaited" in str(w.message)] == [RuntimeWarning]


def test_keep_last_n_and_best_by_eval_loss(straight, tmp_path):
    cfg = load_config(None, ["checkpoint.keep=1", "checkpoint.keep_best=true", "checkpoint.async_save=false"])
    state, _ = Checkpoints(straight, read_config(straight), read_only=True).restore(
        STEPS, setup_for(read_config(straight)).abstract_state)
    ckpt = Checkpoints(str(tmp_path), cfg)
    for step, loss in zip(range(1, 5), (3.0, 1.0, 2.0, 4.0)):
        ckpt.save(step, state, {}, {"eval_loss": loss})
    ckpt.close()
    assert Checkpoints(str(tmp_path), cfg, read_only=True).all_steps() == [2, 4]  # best, latest


def test_training_holds_the_workdir_lock(tmp_path):
    def lock_elsewhere():  # another process trying the lock a second trainer would take
        code = "import fcntl, sys; fcntl.lockf(open(sys.argv[1], 'a+'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
        return subprocess.run([sys.executable, "-c", code, str(tmp_path / ".train.lock")]).returncode

    ckpt = Checkpoints(str(tmp_path), load_config(None, []))
    held = lock_elsewhere()
    ckpt.close()
    assert held != 0 and lock_elsewhere() == 0


# ------------------------------------------------------------------ export and eval


def test_export_loads_for_decoding(straight, tmp_path, capsys):
    cfg, params, tok = load_for_inference(straight)
    for dtype in ("float32", "bfloat16"):
        out = str(tmp_path / dtype)
        assert cli.main(["export", "--workdir", straight, "--output", out, "--dtype", dtype]) == 0
        assert sorted(os.listdir(out)) == ["config.yaml", "export.json", "params", "tokenizer.model"]
        cfg_x, params_x, tok_x = load_for_inference(out)
        assert cfg_x.model == dataclasses.replace(cfg.model, param_dtype=dtype) and tok_x.sha256 == tok.sha256
        chex.assert_trees_all_equal(jax.device_get(params_x),
                                    jax.device_get(jax.tree.map(lambda x: x.astype(dtype), params)))
    assert cli.main(["export", "--workdir", straight, "--output", out]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err


def test_readers_take_a_step_and_name_the_others(straight, tmp_path, capsys):
    """eval, decode, export and export-hf read the latest checkpoint or `--step N`; a step that is not
    there, or one that is damaged, is an error naming the steps there are."""
    cfg = read_config(straight)
    _, earlier, _ = load_for_inference(straight, step=6)
    saved, _ = Checkpoints(straight, cfg, read_only=True).restore(6, setup_for(cfg).abstract_state)
    chex.assert_trees_all_equal(jax.device_get(earlier), jax.device_get(saved.params))
    _, latest, _ = load_for_inference(straight)
    assert not np.array_equal(*(jax.device_get(p["token_embed"]["embedding"]) for p in (earlier, latest)))

    assert cli.main(["eval", "--workdir", straight, "--step", "7"]) == 2
    assert f"--step 7: no checkpoint at that step in {os.path.join(straight, 'checkpoints')} (steps: 4, 6, 8)" \
        in capsys.readouterr().err
    workdir = str(tmp_path / "run")
    shutil.copytree(straight, workdir)
    damage(workdir, "truncated array file")
    decode = ["decode", "--workdir", workdir, "--prompt", "the", "--max-new-tokens", "2"]
    assert cli.main(decode) == 2
    err = capsys.readouterr().err
    assert f"checkpoint at step {STEPS}" in err and "cannot be read" in err
    assert err.rstrip().endswith("the other steps here: 4, 6 (--step N reads one)")
    assert cli.main(decode + ["--step", "6"]) == 0 and ">>> the" in capsys.readouterr().out
    assert cli.main(["export", "--workdir", workdir, "--output", str(tmp_path / "x"), "--step", "6"]) == 0
    chex.assert_trees_all_equal(jax.device_get(load_for_inference(str(tmp_path / "x"))[1]), jax.device_get(earlier))


def test_eval_prints_and_appends(straight, data, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    shutil.copytree(straight, workdir)
    before = rows(workdir)
    assert cli.main(["eval", "--workdir", workdir]) == 0
    out = capsys.readouterr().out
    row = rows(workdir)[-1]
    # The latest checkpoint on the run's held-out split: what training measured at its last step.
    trained = [r for r in before if r["step"] == STEPS and "eval_loss" in r][0]
    assert row["step"] == STEPS and row["eval_loss"] == trained["eval_loss"]
    np.testing.assert_allclose(row["eval_perplexity"], np.exp(row["eval_loss"]), rtol=1e-6)
    assert f"step {STEPS}: eval_loss {row['eval_loss']:.4f}  eval_perplexity {row['eval_perplexity']:.3f}" in out

    other = str(tmp_path / "held_out.jsonl")
    with open(other, "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in synthetic_corpus(40, seed=1))
    assert cli.main(["eval", "--workdir", workdir, "--step", "6", "--set", f"data.path={other}",
                     "--set", "data.eval_fraction=0.9"]) == 0
    row = rows(workdir)[-1]
    assert row["step"] == 6 and row["eval_data"] == f"held-out 0.9 of {other}" and row["eval_loss"] > 0
    assert len(rows(workdir)) == len(before) + 2
    assert cli.main(["eval", "--workdir", workdir, "--set", "model.d_model=64"]) == 2
    assert "model.d_model" in capsys.readouterr().err
