"""Multi-process launch (issue 7): how the environment describes a run, and two CPU processes
(4 fake devices each, gloo) started by launch/local.sh training exactly like one process
with the same 8 devices."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
from jax._src import clusters

from t5x_lite import distributed
from t5x_lite.checkpoints import load_for_inference
from t5x_lite.config import ConfigError, load_config
from t5x_lite.metrics import read_metrics
from t5x_lite.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_SH = os.path.join(ROOT, "launch", "local.sh")
CONFIG = os.path.join(ROOT, "configs", "decoder_tiny.yaml")
STEPS = 4
SMALL = ["model.d_model=32", "model.num_layers=1", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=64",
         "model.vocab_size=320", "data.num_sentinels=4", "data.seq_len=32", "data.max_docs=300",
         "data.eval_fraction=0", "train.batch_size=8", f"train.steps={STEPS}", "train.log_every=1",
         "train.eval_every=0", "optim.warmup_steps=1", "checkpoint.every_steps=2", "checkpoint.keep=3",
         "mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1", "sharding.zero_stage=3"]


# ------------------------------------------------------------------ environment


def env_of(**kv):
    return {k: str(v) for k, v in kv.items()}


EXPLICIT = env_of(T5X_LITE_COORDINATOR="10.0.0.1:12355", T5X_LITE_NUM_PROCESSES=4, T5X_LITE_PROCESS_ID=3)
SLURM_STEP = env_of(SLURM_JOB_ID=4242, SLURM_STEP_NODELIST="gpu[003-004]", SLURM_NTASKS=16,
                    SLURM_STEP_NUM_TASKS=16, SLURM_STEP_NUM_NODES=2, SLURM_PROCID=9, SLURM_LOCALID=1,
                    CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")


@pytest.mark.parametrize("env,want", [
    ({}, distributed.Launch("single")),
    (EXPLICIT, distributed.Launch("explicit", "10.0.0.1:12355", 4, 3)),
    (dict(EXPLICIT, T5X_LITE_LOCAL_DEVICE_IDS="4,5,6,7", T5X_LITE_INIT_TIMEOUT=60, T5X_LITE_CPU_DEVICES=2),
     distributed.Launch("explicit", "10.0.0.1:12355", 4, 3, (4, 5, 6, 7), cpu_devices=2, timeout_s=60)),
    # one task per GPU, every GPU visible: task 9 = local task 1 drives GPU 1
    (SLURM_STEP, distributed.Launch("slurm", None, 16, 9, (1,))),
    # one task per node: it drives all 8 GPUs (JAX's own default would pin it to GPU 0)
    (dict(SLURM_STEP, SLURM_NTASKS=2, SLURM_STEP_NUM_TASKS=2, SLURM_PROCID=1, SLURM_LOCALID=0),
     distributed.Launch("slurm", None, 2, 1, tuple(range(8)))),
    # GPUs bound per task (--gpus-per-task=1): the task's one visible GPU is index 0, not SLURM_LOCALID
    (dict(SLURM_STEP, CUDA_VISIBLE_DEVICES="5", SLURM_GPUS_PER_TASK=1), distributed.Launch("slurm", None, 16, 9, (0,))),
    (env_of(SLURM_JOB_ID=7, SLURM_NTASKS=1, SLURM_PROCID=0), distributed.Launch("single")),  # one-task job
    (env_of(OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://10.96.0.1:34911", OMPI_COMM_WORLD_SIZE=4,
            OMPI_COMM_WORLD_RANK=2, OMPI_COMM_WORLD_LOCAL_RANK=0, OMPI_COMM_WORLD_LOCAL_SIZE=1),
     distributed.Launch("ompi", None, 4, 2)),
])
def test_environment_describes_the_run(env, want):
    assert distributed.from_environment(env) == want


@pytest.mark.parametrize("env,match", [
    (env_of(T5X_LITE_COORDINATOR="10.0.0.1:12355"), "T5X_LITE_NUM_PROCESSES, T5X_LITE_PROCESS_ID are not"),
    (env_of(T5X_LITE_NUM_PROCESSES=2, T5X_LITE_PROCESS_ID=0), "T5X_LITE_COORDINATOR is not"),
    (dict(EXPLICIT, T5X_LITE_PROCESS_ID=4), "T5X_LITE_PROCESS_ID=4 must be below T5X_LITE_NUM_PROCESSES=4"),
    (dict(EXPLICIT, T5X_LITE_COORDINATOR="10.0.0.1"), "must be HOST:PORT"),
    (dict(EXPLICIT, T5X_LITE_NUM_PROCESSES="two"), "T5X_LITE_NUM_PROCESSES='two' must be an integer"),
    (dict(EXPLICIT, T5X_LITE_LOCAL_DEVICE_IDS="0,0"), "distinct device indices"),
    (env_of(T5X_LITE_LOCAL_DEVICE_IDS="0,1"), "no multi-process run is described"),
    (env_of(T5X_LITE_CPU_DEVICES=0), "T5X_LITE_CPU_DEVICES='0' must be an integer >= 1"),
    ({k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}, "SLURM_STEP_NODELIST is not set: start"),
    (dict(SLURM_STEP, CUDA_VISIBLE_DEVICES="0,1,2"), "3 GPUs are visible to 8 tasks"),
    (env_of(OMPI_COMM_WORLD_SIZE=4, OMPI_COMM_WORLD_RANK=0), "also export T5X_LITE_COORDINATOR"),
])
def test_half_described_run_is_an_error(env, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        distributed.from_environment(env)


def test_slurm_reading_agrees_with_jax(monkeypatch):
    """What we report for a SLURM step is what JAX's own detection will use."""
    for key in list(os.environ):
        if key.startswith(("SLURM_", "OMPI_")):
            monkeypatch.delenv(key)
    for key, value in SLURM_STEP.items():
        monkeypatch.setenv(key, value)
    ours = distributed.from_environment()
    coordinator, num, pid, local = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, "slurm", None)
    assert (ours.num_processes, ours.process_id, ours.local_device_ids) == (num, pid, tuple(local))
    assert coordinator.startswith("gpu003:")


# ------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(**extra) -> dict:
    env = dict(os.environ, T5X_LITE_CPU_DEVICES="4", JAX_DEFAULT_MATMUL_PRECISION="highest", GRACE_S="1")
    for key in ("T5X_LITE_COORDINATOR", "T5X_LITE_NUM_PROCESSES", "T5X_LITE_PROCESS_ID", "CUDA_VISIBLE_DEVICES"):
        env.pop(key, None)
    env.update(extra)
    return env


def start_local(num: int, command: list, logdir, **env) -> subprocess.Popen:
    """launch/local.sh NUM -- COMMAND; its own output goes to LOGDIR/launcher.out (no pipe to fill)."""
    os.makedirs(logdir, exist_ok=True)
    with open(os.path.join(logdir, "launcher.out"), "w") as out:
        return subprocess.Popen([LOCAL_SH, str(num), "--", *command], env=launcher_env(LOGDIR=str(logdir), **env),
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def finish(proc: subprocess.Popen, logdir, timeout: float = 240) -> str:
    """Wait for a launcher; its output."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return open(os.path.join(logdir, "launcher.out")).read()


def train_command(workdir, corpus) -> list:
    sets = sum((["--set", s] for s in SMALL + [f"data.path={corpus}"]), [])
    return [sys.executable, "-m", "t5x_lite", "train", "--config", CONFIG, "--workdir", str(workdir), *sets]


def write_corpus(path) -> str:
    rng = np.random.default_rng(0)
    words = ("the of a to in is that for it as with on be by this are from or an which data model train step "
             "loss batch shard mesh device host process gradient optimizer layer token").split()
    with open(path, "w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": " ".join(rng.choice(words, rng.integers(20, 120))) + "."}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-process run (local.sh) and, meanwhile, the same config in this process on 8 devices."""
    tmp = tmp_path_factory.mktemp("launch")
    corpus = write_corpus(tmp / "corpus.jsonl")
    two, one = tmp / "two", tmp / "one"
    proc = start_local(2, train_command(two, corpus), tmp / "logs")
    try:
        train(load_config(CONFIG, SMALL + [f"data.path={corpus}"]), str(one))
    finally:
        out = finish(proc, tmp / "logs")
    assert proc.returncode == 0, out[-4000:]
    return {"tmp": tmp, "corpus": corpus, "two": two, "one": one, "logs": tmp / "logs"}


def train_rows(workdir) -> list:
    return [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]


def assert_same_rows(got, want, rtol=1e-6):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for key in ("loss", "grad_norm", "accuracy", "learning_rate"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=rtol, err_msg=key)


def test_two_processes_train_like_one_process(runs):
    rows = train_rows(runs["two"])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # once each: process 1 wrote none
    assert len(os.listdir(runs["two"] / "tb")) == 1  # one TensorBoard writer
    assert_same_rows(rows, train_rows(runs["one"]))


def test_first_log_lines_name_processes_devices_mesh_and_stage(runs):
    log0 = open(runs["logs"] / "process_0.log").read()
    log1 = open(runs["logs"] / "process_1.log").read()
    assert "process 0 of 2 joined" in log0 and "process 1 of 2 joined" in log1
    head = log0[:log0.index(f"step 1/{STEPS}")]
    assert "processes=2 devices=8 (4 per process, cpu)" in head
    assert "mesh data=2 x fsdp=4 x tensor=1  zero_stage=3" in head
    assert "step 1/" not in log1 and "mesh data=" not in log1  # only process 0 reports


def test_every_process_writes_its_checkpoint_shards(runs):
    params_dir = runs["two"] / "checkpoints" / str(STEPS) / "params"
    written = sorted(p.name for p in params_dir.iterdir() if p.name.startswith("ocdbt.process_"))
    assert written == ["ocdbt.process_0", "ocdbt.process_1"]


def test_two_process_checkpoint_restores_in_one_process(runs):
    _, params_two, _ = load_for_inference(str(runs["two"]))
    _, params_one, _ = load_for_inference(str(runs["one"]))
    assert jax.process_count() == 1
    # the same up to float32 rounding: the gradient all-reduce spans two processes in one run and
    # not in the other (parameters ~0.1; one lm_head entry of 10,240 ends 2.4e-7 apart)
    chex.assert_trees_all_close(params_two, params_one, rtol=1e-6, atol=1e-6)


def test_two_processes_resume_from_their_checkpoint(runs):
    resumed = runs["tmp"] / "resumed"
    shutil.copytree(runs["two"], resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))  # back to the step-2 checkpoint
    logdir = runs["tmp"] / "logs_resumed"
    proc = start_local(2, train_command(resumed, runs["corpus"]), logdir)
    out = finish(proc, logdir)
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from checkpoint at step 2" in out
    assert_same_rows(train_rows(resumed), train_rows(runs["one"]))


# ------------------------------------------------------------------ failures


def test_launcher_stops_everyone_when_one_process_dies(tmp_path):
    # Process 0 ignores SIGTERM, as a JAX process does once its preemption service has joined
    # (it turns SIGTERM into a notice), so the launcher must escalate to SIGKILL.
    script = ("import os, signal, time; k = os.environ['T5X_LITE_PROCESS_ID']; "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              f"os.chdir({str(tmp_path)!r}); open('pid' + k, 'w').write(str(os.getpid()))\n"
              "while k == '1' and not os.path.exists('pid0'): time.sleep(0.05)\n"
              "k == '1' and os.kill(os.getpid(), signal.SIGKILL); time.sleep(600)")
    t0 = time.time()
    proc = start_local(2, [sys.executable, "-c", script], tmp_path / "logs")
    out = finish(proc, tmp_path / "logs", timeout=60)
    assert proc.returncode == 128 + signal.SIGKILL, out
    assert time.time() - t0 < 60
    assert "process 1 (pid" in out and "exited with code 137; stopping the others" in out
    survivor = int(open(tmp_path / "pid0").read())
    with pytest.raises(ProcessLookupError):
        os.kill(survivor, 0)


def test_join_timeout_names_the_missing_process():
    env = launcher_env(T5X_LITE_COORDINATOR=f"127.0.0.1:{free_port()}", T5X_LITE_NUM_PROCESSES="2",
                       T5X_LITE_PROCESS_ID="0", T5X_LITE_INIT_TIMEOUT="1", T5X_LITE_CPU_DEVICES="1")
    proc = subprocess.run([sys.executable, "-c", "from t5x_lite import distributed; distributed.initialize()"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "process 0 of 2 has waited 1 s (T5X_LITE_INIT_TIMEOUT)" in proc.stderr
    assert re.search(r"# of tasks that reached the barrier: 1/2\.\s.*Some timed out task names:\s*1\s", proc.stderr,
                     re.S), proc.stderr[-3000:]


def test_launcher_rejects_bad_usage():
    for args in ([], ["two", "--", "true"], ["2", "--"]):
        proc = subprocess.run([LOCAL_SH, *args], capture_output=True, text=True, env=launcher_env())
        assert proc.returncode == 2 and "usage:" in proc.stderr


# ------------------------------------------------------------------ preemption


def test_preempted_two_process_run_saves_one_step_and_resumes(runs):
    """SIGTERM to the launcher mid-run (what a scheduler sends before it takes the hosts): both
    processes stop after the same step, commit its checkpoint and exit 0; the same command then
    resumes, and the finished run logs what an uninterrupted one does."""
    long = ["train.steps=80", "checkpoint.every_steps=1000"]
    workdir, logdir = runs["tmp"] / "preempted", runs["tmp"] / "logs_preempted"
    proc = start_local(2, train_command(workdir, runs["corpus"]) + sum((["--set", s] for s in long), []), logdir,
                       GRACE_S="120")
    log0 = logdir / "process_0.log"
    deadline = time.time() + 180
    while time.time() < deadline and not (log0.exists() and "step 10/80" in log0.read_text()):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc, logdir)
    assert proc.returncode == 0, out[-4000:]
    logs = [(logdir / f"process_{k}.log").read_text() for k in (0, 1)]
    stopped = re.search(r"preemption notice: stopped after step (\d+); checkpoint \S+ is committed", logs[0])
    assert stopped, logs[0][-3000:]
    step = int(stopped.group(1))
    assert 10 <= step < 80
    for log in logs:  # JAX's preemption sync point: the step every process agreed on (only process 0 reports)
        assert f"Reached preemption sync point, step={step}" in log, log[-3000:]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [step]

    proc = start_local(2, train_command(workdir, runs["corpus"]) + sum((["--set", s] for s in long), []),
                       runs["tmp"] / "logs_after_preemption")
    out = finish(proc, runs["tmp"] / "logs_after_preemption")
    assert proc.returncode == 0 and f"resumed from checkpoint at step {step}" in out, out[-4000:]
    reference = runs["tmp"] / "uninterrupted"
    train(load_config(CONFIG, SMALL + [f"data.path={runs['corpus']}"] + long), str(reference))
    # 80 steps of gloo all-reduces against one process's: float32 rounding drifts (~2e-6 at 200).
    assert_same_rows(train_rows(workdir), train_rows(reference), rtol=2e-5)


def _xla_starts_with(flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True,
                          text=True, timeout=120)


def test_launcher_xla_flags_exist_in_this_xla():
    """Every XLA flag the launchers set (t5x_lite/xla_flags.py, read by slurm.sbatch and local.sh)
    is one this jaxlib's XLA knows (it aborts on an unknown one at start-up, CPU or GPU: the flags
    share one table); the one measured slower on an H100 is not among them."""
    from t5x_lite.xla_flags import GPU_TRAINING_FLAGS, gpu_flags

    flags = gpu_flags().split()
    assert len(flags) == len(GPU_TRAINING_FLAGS) >= 8 and "--xla_gpu_enable_triton_gemm=false" not in flags
    proc = _xla_starts_with(" ".join(flags))
    assert proc.returncode == 0, proc.stderr[-2000:]
    bad = _xla_starts_with("--xla_gpu_no_such_flag=true")
    assert bad.returncode != 0 and "Unknown flag" in bad.stderr
    for launcher in ("slurm.sbatch", "local.sh"):
        assert "-m t5x_lite.xla_flags" in open(os.path.join(ROOT, "launch", launcher)).read()
    out = subprocess.run([sys.executable, "-m", "t5x_lite.xla_flags"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == flags


def test_local_launcher_puts_the_gpu_flags_before_the_users(tmp_path):
    """On a GPU host, local.sh's processes see the launchers' XLA flags first and the caller's
    XLA_FLAGS after them (XLA keeps the last setting: the caller's wins); T5X_LITE_XLA_GPU_FLAGS=0
    and a host without GPUs leave XLA_FLAGS as given."""
    from t5x_lite.xla_flags import gpu_flags

    mine = "--xla_gpu_enable_latency_hiding_scheduler=false"
    show = [sys.executable, "-c", "import os; print('FLAGS=' + os.environ.get('XLA_FLAGS', ''))"]

    def flags_seen(**env):
        proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "1", "--", *show],
                              env=dict(os.environ, XLA_FLAGS=mine, LOGDIR=str(tmp_path / "logs"), PYTHON=sys.executable,
                                       **env),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return next(line for line in proc.stdout.splitlines() if line.startswith("FLAGS="))[len("FLAGS="):]

    assert flags_seen(CUDA_VISIBLE_DEVICES="0") == f"{gpu_flags()} {mine}"  # a GPU host (one GPU named)
    assert flags_seen(CUDA_VISIBLE_DEVICES="0", T5X_LITE_XLA_GPU_FLAGS="0") == mine
    assert flags_seen(CUDA_VISIBLE_DEVICES="") == mine  # no GPU: CPU processes, flags untouched
