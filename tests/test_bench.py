"""The GPU benchmarks keep working: their CPU smoke modes run end to end and report sane figures."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device per child, as a user's run
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_train_vs_hf_smoke_all_workloads(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(["bench/train_vs_hf.py", "--smoke", "--impls", "ours,hf", "--steps", "1", "--warmup", "1",
                 "--variant", "remat:model.remat=full", "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {(r["workload"], r["impl"]): r for r in data["results"]}
    assert set(rows) == {(w, i) for w in ("llama", "t5", "bert") for i in ("ours", "hf", "ours:remat")}
    assert rows[("llama", "ours:remat")]["overrides"] == ["model.remat=full"]
    for (workload, impl), r in rows.items():
        assert math.isfinite(r["loss"]) and r["step_s"] > 0 and r["tokens_per_step"] > 0, r
        if impl.startswith("ours"):  # random tokens, 512 pieces: two steps in, still ~uniform predictions
            assert abs(r["loss"] - math.log(512)) < 0.6, r  # (HF's T5 v1.1 head init starts near 38)
    for w in ("llama", "t5", "bert"):  # the same counting for both sides
        assert rows[(w, "ours")]["flops_per_step"] == rows[(w, "hf")]["flops_per_step"]
    assert data["machine"]["jax"] and data["machine"]["transformers"]
    assert "| llama | ours:remat |" in proc.stdout


def test_train_vs_hf_rejects_a_bad_variant():
    proc = _run(["bench/train_vs_hf.py", "--smoke", "--variant", "no_overrides"])
    assert proc.returncode != 0 and "NAME:key=value" in proc.stderr


def test_decode_bench_smoke(tmp_path):
    out = tmp_path / "decode.json"
    proc = _run(["bench/decode.py", "--smoke", "--batch-sizes", "1,2", "--prompt-len", "8", "--new-tokens", "8",
                 "--repeats", "1", "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["tokens_per_s"] > 0 for r in rows)
