"""The GPU benchmarks keep working: their CPU smoke modes run end to end and report sane figures."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **extra)
    env.pop("XLA_FLAGS", None)  # one CPU device per child, as a user's run
    return env


def _run(args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _run_json(args, out):
    """Run a bench script with ``--json out``; its process and the JSON it wrote."""
    proc = _run([*args, "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_train_vs_hf_smoke_all_workloads(tmp_path):
    proc, data = _run_json(["bench/train_vs_hf.py", "--smoke", "--impls", "ours,hf", "--steps", "1", "--warmup", "1",
                            "--jobs", "2"], tmp_path / "bench.json")
    rows = {(r["workload"], r["impl"]): r for r in data["results"]}
    assert set(rows) == {(w, i) for w in ("llama", "t5", "bert") for i in ("ours", "hf")}
    for (workload, impl), r in rows.items():
        assert math.isfinite(r["loss"]) and r["step_s"] > 0 and r["tokens_per_step"] > 0, r
        if impl.startswith("ours"):  # random tokens, 512 pieces: two steps in, still ~uniform predictions
            assert abs(r["loss"] - math.log(512)) < 0.6, r  # (HF's T5 v1.1 head init starts near 38)
    for w in ("llama", "t5", "bert"):  # the same counting for both sides
        assert rows[(w, "ours")]["flops_per_step"] == rows[(w, "hf")]["flops_per_step"]
    # t5_base's own Adafactor replaced by HF's AdamW, and the row says so
    assert rows[("t5", "ours")]["same_work"] == ["optim.name=adamw"]
    assert not any("same_work" in r for (w, i), r in rows.items() if i == "hf" or w != "t5")
    assert data["machine"]["jax"] and data["machine"]["transformers"]
    assert "| llama | ours |" in proc.stdout


def test_variant_environment_items(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_vs_hf", os.path.join(ROOT, "bench", "train_vs_hf.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("XLA_FLAGS", "--xla_a=1")
    env, config = bench.split_env(["model.remat=full", "XLA_FLAGS=--xla_gpu_enable_triton_gemm=false", "NCCL_X=2"])
    assert config == ["model.remat=full"]
    assert env == {"XLA_FLAGS": "--xla_a=1 --xla_gpu_enable_triton_gemm=false", "NCCL_X": "2"}


def test_train_vs_hf_rejects_a_bad_variant():
    proc = _run(["bench/train_vs_hf.py", "--smoke", "--variant", "no_overrides"])
    assert proc.returncode != 0 and "NAME:key=value" in proc.stderr


def test_decode_bench_smoke(tmp_path):
    proc, rows = _run_json(["bench/decode.py", "--smoke", "--batch-sizes", "2", "--prompt-len", "8", "--new-tokens", "8",
                            "--repeats", "1", "--variant", "unroll:model.scan_unroll=2", "--profile",
                            str(tmp_path / "prof")], tmp_path / "decode.json")
    assert [(r["variant"], r["batch"]) for r in rows] == [("default", 2), ("unroll", 2)]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    # --profile: per generated token, the traced generation's instruction time and runs (kernels)
    for r in rows:
        p = r["profile"]
        assert p["steps"] == 8 and p["busy_ms_per_step"] > 0 and p["launches_per_step"] > 1
        assert math.isclose(sum(o["ms"] for o in p["ops"]), p["busy_ms_per_step"], rel_tol=1e-6)
    assert "per generated token (graphs off)" in proc.stderr


def test_serve_bench_smoke(tmp_path):
    """bench/serve.py: the same load through a server batching across requests and one taking
    them one at a time; every request answered, the batched server ran fuller batches."""
    proc, data = _run_json(["bench/serve.py", "--smoke"], tmp_path / "serve.json")
    one, batched = data["rows"]
    assert (one["max_batch"], batched["max_batch"]) == (1, 4) and one["requests"] == batched["requests"] == 8
    assert one["batches"] == 8 and one["rows_per_batch"] == 1 and batched["batches"] < 8
    assert one["speedup"] == 1 and batched["tokens_per_s"] > 0 and "speedup" in proc.stderr


def test_pipeline_bench_smoke(tmp_path):
    _, data = _run_json(["bench/pipeline.py", "--smoke", "--workers", "0,1", "--workdir", str(tmp_path / "wd")],
                        tmp_path / "pipe.json")
    rows = data["rows"]
    assert [(r["objective"], r["workers"]) for r in rows] == [(o, w) for o in ("causal", "mlm", "span") for w in (0, 1)]
    for r in rows:  # the figures agree with each other
        assert 0 < r["batch_ms"] <= r["batch_ms_max"] and 0 < r["packing"] <= 1
        # (batch_ms is rounded to 0.01 ms: at a fraction of a millisecond that alone moves the ratio by ~1%)
        assert math.isclose(r["host_tokens_per_s"] * r["batch_ms"] / 1000, r["tokens_per_batch"],
                            rel_tol=0.01 + 0.005 / r["batch_ms"])


def test_attention_bench_segments_describe_the_documents(tmp_path):
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("attention_bench", os.path.join(ROOT, "bench", "attention.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
    from t5x_lite.models.layers import segment_lengths_and_starts

    lengths, starts = segment_lengths_and_starts(seg, 4)
    np.testing.assert_array_equal(lengths, [[3, 2, 1, -1], [8, -1, -1, -1]])
    np.testing.assert_array_equal(starts, [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1]])
    rows = bench.packed_rows(3, 40, 4)
    assert [len(set(r[r > 0])) for r in rows] == [4, 4, 4] and (rows[:, -1] == 0).all()

    _, rows = _run_json(["bench/attention.py", "--smoke"], tmp_path / "attention.json")
    rows = {r["variant"]: r for r in rows}
    assert rows["xla_packed"]["max_out_err"] < 1e-5 and rows["xla_packed"]["max_grad_err"] < 1e-4
    # jax's Pallas attention (in its interpreter): documents from segment ids, GQA by repeating k / v
    assert rows["pallas_segments"]["max_out_err"] < 1e-5 and rows["pallas_segments"]["max_grad_err"] < 1e-4

    # --t5: the bias's own gradient (XLA standing in for cuDNN and the kernel) against differentiating XLA's
    _, rows = _run_json(["bench/attention.py", "--smoke", "--t5"], tmp_path / "attention_t5.json")
    rows = {r["variant"]: r for r in rows}
    assert set(rows) == {"xla_bias", "xla_own_bias"}
    assert rows["xla_own_bias"]["bias_grad_rel_err"] < 1e-5 and rows["xla_own_bias"]["max_grad_err"] < 1e-4


def test_gpu_session_runs_several_parts_in_one_call_within_a_deadline(tmp_path):
    """Several parts, each its own run of the script under what is left of DEADLINE_S, and their
    results bundled in one file (a device call brings back few files)."""
    import tarfile

    out = tmp_path / "session"
    out.mkdir()
    (out / "decode.json").write_text(json.dumps([{"batch": 1, "tokens_per_s": 700.0, "decode_tokens_per_s": 750.0,
                                                  "ms_per_step": 1.3}]))
    run = lambda deadline, *parts: subprocess.run(  # noqa: E731
        ["bash", "bench/gpu_session.sh", *parts], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=_env(OUT=str(out), DEADLINE_S=str(deadline), BUNDLE=str(tmp_path / "b.tgz")))
    proc = run(600, "report", "report")
    assert proc.returncode == 0 and proc.stderr.count("gpu_session: report (") == 2, proc.stderr[-3000:]
    with tarfile.open(tmp_path / "b.tgz") as bundle:
        assert {"session/decode.json", "session/report.md", "session/report.log"} <= set(bundle.getnames())
    assert "decode batch 1 >= 600 tok/s | 700 tok/s" in (out / "report.md").read_text()
    proc = run(50, "report")  # 50 - 10 s of margin < 45: skipped, and said
    assert proc.returncode == 1 and "gpu_session: report skipped" in proc.stderr, proc.stderr[-3000:]


def test_the_next_gpu_session_plan_names_parts_the_script_has():
    """docs/PERFORMANCE.md's commands for the next GPU session run parts of gpu_session.sh: a
    misspelt part would cost a device call (its usage line lists them)."""
    import re

    usage = subprocess.run(["bash", "bench/gpu_session.sh"], cwd=ROOT, capture_output=True, text=True).stderr
    parts = set(re.search(r"with PART (\S+)", usage).group(1).split("|"))
    doc = open(os.path.join(ROOT, "docs", "PERFORMANCE.md")).read()
    plan = doc[doc.index("**Next GPU session"):doc.index("## First GPU figures")]
    commands = re.findall(r"bash bench/gpu_session\.sh ([\w ]+)`", plan)
    assert len(commands) >= 2, plan
    for named in commands:
        assert set(named.split()) <= parts, (named, sorted(parts))


def test_gpu_session_script_runs_its_parts_at_cpu_sizes(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu_session.sh"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "attention"], cwd=ROOT,
                          env=_env(OUT=str(tmp_path), SMOKE="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mlp = {r["variant"]: r for r in json.loads((tmp_path / "mlp_cublas.json").read_text())}
    assert set(mlp) == {"module", "fused", "gemms"} and mlp["fused"]["max_dx_err"] < 1e-4  # fused == module
    for name in ("seg1_m2", "seg4_m16"):  # SMOKE=1 runs two of the five shapes
        rows = {r["variant"]: r for r in json.loads((tmp_path / f"attention_{name}.json").read_text())}
        assert rows["xla_packed"]["max_out_err"] < 1e-5
    # llama_fit: the shipped llama_1b (fit_max_segments) built for the bench's one-document rows, m32 for its cap,
    # zero_fill without the config's XLA option
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "llama_fit"], cwd=ROOT,
                          env=_env(OUT=str(tmp_path), SMOKE="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["impl"]: r for r in json.loads((tmp_path / "llama.json").read_text())["results"]}
    assert (rows["ours"]["max_segments"], rows["ours:m32"]["max_segments"]) == (1, 32)
    # zero_fill: the shipped step without its XLA option, from the same batches and init (on a GPU the
    # option only changes how XLA builds the program: the loss must come out the same there too)
    assert rows["ours:zero_fill"]["overrides"] == ["train.xla_options="]
    assert rows["ours:zero_fill"]["loss"] == rows["ours"]["loss"]


def test_bench_command_times_a_config_and_its_variants(tmp_path):
    """``t5x-lite bench``: one row per variant, from the same random batch and init (the same loss)."""
    proc, data = _run_json(["-m", "t5x_lite", "bench", "--config", "configs/decoder_tiny.yaml", "--steps", "2",
                            "--warmup", "1", "--set", "model.num_layers=2", "--set", "train.batch_size=4",
                            "--variant", "unroll:model.scan_unroll=2", "--profile", str(tmp_path / "prof")],
                           tmp_path / "bench.json")
    rows = {r["variant"]: r for r in data["results"]}
    assert list(rows) == ["default", "unroll"] and rows["unroll"]["overrides"] == ["model.num_layers=2",
                                                                                   "train.batch_size=4",
                                                                                   "model.scan_unroll=2"]
    for r in rows.values():
        assert r["tokens_per_step"] == 4 * 128 and r["tokens_per_s"] > 0 and r["compiled_bytes"] > 0
        assert r["first_step_s"] >= r["compile_s"] > 0 and not r["attention_fallback"]
        assert r["init_s"] > 0 and r["first_run_s"] > 0  # the parts of the first step after the compile
        assert r["first_step_s"] >= r["compile_s"] + r["init_s"] + r["first_run_s"]
    assert math.isclose(rows["default"]["loss"], rows["unroll"]["loss"], rel_tol=1e-5)
    assert "| default |" in proc.stdout and "| unroll |" in proc.stdout
    # --profile: the traced steps' instructions, attributed to the parts of the model
    prof = rows["default"]["profile"]
    shares = {c["category"]: c["share"] for c in prof["categories"]}
    assert math.isclose(sum(shares.values()), 1.0, rel_tol=1e-6) and prof["busy_ms_per_step"] > 0
    assert {"mlp", "attention: projections", "attention: scores, softmax, kernel", "output layer + loss"} <= set(shares)
    # (a share of measured time: under a loaded machine, as with two test workers, it moves; 8.8% was seen)
    assert shares["mlp"] > 0.02 and prof["passes"]["backward"] > 0 and prof["passes"]["forward"] > 0
    assert any("/mlp/" in o["op_name"] and o["category"] == "mlp" for o in prof["top_ops"])
    # by kind of kernel too, and every instruction in the JSON (a scanned layer's: once per layer)
    assert math.isclose(sum(k["share"] for k in prof["kinds"]), 1.0, rel_tol=1e-6)
    assert math.isclose(sum(o["ms"] for o in prof["ops"]), prof["busy_ms_per_step"], rel_tol=1e-6)
    assert any(o["calls"] == 2 and "/stack/" in o["op_name"] for o in prof["ops"])  # num_layers=2, scanned
    assert "| kind of kernel |" in proc.stderr and (tmp_path / "prof" / "default.hlo.txt").read_text().startswith("HloModule")
    assert "| mlp |" in proc.stderr and "% of the timed" in proc.stderr and prof["step_ms"] > 0
    assert "--xla_gpu_enable_command_buffer=" in proc.stderr  # GPU: CUDA graphs off, so kernels show
    # bad variants: refused before anything compiles (in this process: the CLI prints the error, exit 2)
    from t5x_lite import benchmark, cli
    from t5x_lite.config import ConfigError

    for variants, message in [(["oops"], "variant 'oops'"), (["a:train.seed=1", "a:train.seed=2"], "names must differ")]:
        args = cli.build_parser().parse_args(["bench", "--config", "configs/decoder_tiny.yaml",
                                              *sum((["--variant", v] for v in variants), [])])
        with pytest.raises(ConfigError, match=message):
            benchmark.run_bench_cli(args)


@pytest.mark.parametrize("cap", [8, 0])
def test_bench_fits_max_segments_to_its_rows(cap):
    """The bench's random rows hold one document each: with model.fit_max_segments the model is
    built for one (a length a row), as training would fit it, from a cap or from none; without,
    for the config's cap."""
    from t5x_lite import benchmark

    from helpers import tiny_cfg

    cfg = tiny_cfg("decoder", "model.attention=auto", f"model.max_segments={cap}", "model.fit_max_segments=true")
    fitted = benchmark.measure_train(cfg, steps=1, warmup=1)
    cfg.model.fit_max_segments = False
    fixed = benchmark.measure_train(cfg, steps=1, warmup=1)
    assert (fitted["max_segments"], fixed["max_segments"]) == (1, cap)
    assert math.isclose(fitted["loss"], fixed["loss"], rel_tol=1e-6)  # one document a row either way


def test_profile_exclusive_times_and_categories():
    from t5x_lite.profiling import category, exclusive_times, op_names

    loop = {"ts": 0, "dur": 10, "pid": 1, "tid": 1, "name": "while.3"}
    body = [{"ts": 1, "dur": 3, "pid": 1, "tid": 1, "name": "dot.1"},
            {"ts": 5, "dur": 2, "pid": 1, "tid": 1, "name": "fusion.2"}]
    other_thread = {"ts": 2, "dur": 4, "pid": 1, "tid": 2, "name": "fusion.9"}
    got = {e["name"]: us for e, us in exclusive_times([loop, *body, other_thread])}
    assert got == {"while.3": 5, "dot.1": 3, "fusion.2": 2, "fusion.9": 4}
    # a GPU trace: instruction events on the device's process count, not the host's launches of them
    from t5x_lite.profiling import device_events

    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}}]
    launch_ev = {"ph": "X", "ts": 0, "dur": 1, "pid": 1, "tid": 1, "args": {"hlo_op": "fusion.1"}}
    kernel_ev = {"ph": "X", "ts": 1, "dur": 9, "pid": 7, "tid": 2, "args": {"hlo_op": "fusion.1"}}
    assert device_events([launch_ev, kernel_ev], meta + [launch_ev, kernel_ev]) == [kernel_ev]
    assert device_events([launch_ev], meta[:1] + [launch_ev]) == [launch_ev]  # CPU: the host runs them
    # an event that starts inside another and ends after it: only its inside part counts against it
    launch = {"ts": 0, "dur": 4, "pid": 1, "tid": 3, "name": "thunk.1"}
    kernel = {"ts": 3, "dur": 5, "pid": 1, "tid": 3, "name": "fusion.3"}
    got = {e["name"]: us for e, us in exclusive_times([launch, kernel])}
    assert got == {"thunk.1": 3, "fusion.3": 5}
    text = ('  %fusion.2 = bf16[8]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(train_step)/'
            'transpose(jvp(DecoderModel))/decoder/stack/layers/mlp/wo/dot_general" stack_frame_id=3}\n'
            '  ROOT %all-reduce.1 = f32[8]{0} all-reduce(%x), metadata={op_name="jit(train_step)/add"}')
    names = op_names(text)
    assert names == {"fusion.2": "jit(train_step)/transpose(jvp(DecoderModel))/decoder/stack/layers/mlp/wo/dot_general",
                     "all-reduce.1": "jit(train_step)/add"}
    assert category("fusion.2", names["fusion.2"]) == "mlp"
    assert category("all-reduce.1", names["all-reduce.1"]) == "collectives"
    assert category("fusion.7", "jit(train_step)/jvp()/exp") == "output layer + loss"
    assert category("fusion.8", "jit(train_step)/div") == "optimizer, clipping, other"
    # the weights cast to the compute dtype once a step, and their gradients converted back: not the loss's
    import jax
    import jax.numpy as jnp

    from t5x_lite import trainer
    from t5x_lite.config import load_config

    cast = trainer.cast_for_compute(load_config(None, ["model.dtype=bfloat16", "model.param_dtype=float32"]))
    params, x = {"dense": {"kernel": jnp.ones((8, 8)), "scale": jnp.ones(8)}}, jnp.ones((4, 8), jnp.bfloat16)
    step = jax.jit(jax.value_and_grad(lambda p, x: ((x @ cast(p)["dense"]["kernel"]).astype(jnp.float32) ** 2).sum()))
    names = op_names(step.lower(params, x).compile().as_text())
    casts = [op for name, op in names.items() if category(name, op) == "weight casts (once a step)"]
    assert casts and all(op.endswith("jvp(cast_for_compute)/convert_element_type") for op in casts), names
    # the gradients' conversion back, as an H100's compiled step names it (the CPU's XLA merges it elsewhere)
    assert category("fusion.3", "jit(train_step)/transpose(jvp(cast_for_compute))/convert_element_type") == \
        "weight casts (once a step)"
    assert category("fusion.9", "jit(train_step)/jvp()/convert_element_type") == "output layer + loss"
    # the kind of kernel, from the instruction itself and never from its op_name (``transpose(jvp(``)
    from t5x_lite.profiling import instruction_kinds

    gpu = ('  %fusion.2 = bf16[8]{0} fusion(%p), kind=kLoop, calls=%c, metadata={op_name="transpose(jvp(M))/x"}\n'
           '  %gemm_fusion.3 = bf16[8,8]{1,0} fusion(%a, %b), kind=kCustom, calls=%g, metadata={op_name="transpose(jvp(M))/'
           'mlp/wo/dot_general"}, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}\n'
           '  %input_reduce_fusion.4 = f32[8]{0} fusion(%x), kind=kCustom, calls=%r, metadata={op_name="jvp(M)/abs"}, '
           'backend_config={"fusion_backend_config":{"kind":"__triton"}}\n'
           '  %custom-call.4 = (bf16[8,8]{1,0}, s8[0]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm"\n'
           '  %custom-call.5 = (bf16[2,8]{1,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax"\n'
           '  %input_reduce_fusion = f32[] fusion(%g), kind=kInput, calls=%r\n'
           '  %copy.6 = bf16[8,8]{0,1} copy(%a), metadata={op_name="jvp(M)/transpose"}\n'
           '  %all-gather-start.1 = bf16[8]{0} all-gather-start(%a), replica_groups={}\n'
           '  %while.7 = (s32[], f32[8]{0}) while(%t), condition=%c, body=%b')
    assert instruction_kinds(gpu) == {
        "fusion.2": "elementwise (fusions)", "gemm_fusion.3": "matmul (Triton)",
        "input_reduce_fusion.4": "Triton fusions (norms, softmax, reductions)",
        "custom-call.4": "matmul (cuBLAS, library)", "custom-call.5": "attention kernel (cuDNN)",
        "input_reduce_fusion": "reductions (fusions)", "copy.6": "copies, transposes, slices",
        "all-gather-start.1": "collectives", "while.7": "while"}
    from t5x_lite.profiling import kind_of  # one the text lacks: from its name

    kinds = instruction_kinds(gpu)
    assert kind_of("copy.6", kinds) == "copies, transposes, slices"
    assert kind_of("loop_dynamic_update_slice_fusion.21", kinds) == "copies, transposes, slices"
    assert kind_of("input_add_reduce_fusion.9", kinds) == "reductions (fusions)"
    assert kind_of("custom-call.99", kinds) == "other"


def test_gpu_report_sets_the_best_row_against_the_targets(tmp_path):
    """bench/gpu_report.py: ratios against the same run's HF rows, the best variant of ours, the
    first step of the shipped config, decoding by batch; missing results are named missing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_report", os.path.join(ROOT, "bench", "gpu_report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)

    def row(impl, step_s, first=10.0, workload="llama", tokens=16384, **extra):
        return {"workload": workload, "impl": impl, "tokens_per_step": tokens, "step_s": step_s,
                "flops_per_step": 1e14 * tokens / 16384, "first_step_s": first, **extra}

    (tmp_path / "llama.json").write_text(json.dumps({"date": "d", "machine": {"gpu": "H100"}, "peak_tflops": 989,
                                                     "results": [row("ours", 0.2, first=25.0, loss=3.14159), row("hf_compile", 0.22),
                                                                 {"workload": "llama", "impl": "hf", "error": "oom"}]}))
    (tmp_path / "llama_more.json").write_text(json.dumps({"results": [
        row("ours", 0.19, first=5.0, set=["model.max_segments=1"]),  # not the shipped config: not its first step
        row("ours:m1", 0.15, first=40.0, overrides=["model.max_segments=1"],
            attention_kernels="attention: 1 cuDNN forward call a step, mask PADDING_CAUSAL x1"),
        row("hf_compile", 0.21),  # this run's own baseline: ours:m1 is set against it, not against llama.json's
        row("ours:b16", 0.25, tokens=32768, overrides=["train.batch_size=16"])]}))  # faster, other work: not compared
    (tmp_path / "llama_alone.json").write_text(json.dumps({"results": [  # the fastest, in a run without HF:
        row("ours:x", 0.1, overrides=["model.remat=none"])]}))             # listed, never compared
    (tmp_path / "t5.json").write_text(json.dumps({"results": [  # ours stepping HF's AdamW, and saying so
        row("ours", 0.06, workload="t5", tokens=40064, same_work=["optim.name=adamw"]),
        row("hf_compile", 0.13, workload="t5", tokens=40064)]}))
    (tmp_path / "decode.json").write_text(json.dumps([
        {"batch": 1, "tokens_per_s": 700.0, "decode_tokens_per_s": 750.0, "ms_per_step": 1.3, "variant": "default"},
        {"batch": 32, "tokens_per_s": 9000.0, "decode_tokens_per_s": 9500.0, "ms_per_step": 3.4, "variant": "default"}]))
    (tmp_path / "decode_moe.json").write_text(json.dumps([  # another model: listed, not compared
        {"batch": 32, "tokens_per_s": 20000.0, "decode_tokens_per_s": 21000.0, "ms_per_step": 1.5,
         "config": "moe_1b.yaml"}]))
    by_workload, decode, meta = report.load(str(tmp_path))
    got = {t["target"]: (round(t["value"], 3), t["met"]) if "value" in t else None
           for t in report.targets(by_workload, decode)}
    assert got == {"llama train >= 1.35x hf_compile": (round(0.21 / 0.15, 3), True),  # ours:m1 vs its own run's HF
                   "t5 train >= 2.0x hf_compile": (round(0.13 / 0.06, 3), True), "bert train >= 1.5x hf": None,
                   "llama_1b first step <= 30 s": (25.0, True),  # the shipped config's row
                   "decode batch 1 >= 600 tok/s": (700.0, True), "decode batch 32 >= 10,000 tok/s": (9000.0, False)}
    text = report.markdown(by_workload, decode, meta)
    assert "| bert train >= 1.5x hf | missing |" in text and "H100" in text and "67.4%" in text  # MFU of ours:m1: 1e14 / 0.15 s / 989e12
    assert "| moe_1b.yaml | moe:default | 32 | 20,000 |" in text
    assert "- ours:m1 (llama_more.json): attention: 1 cuDNN forward call a step, mask PADDING_CAUSAL x1" in text
    assert "| 131,072 | 250.0 | 80.9% |" in text and "train.batch_size=16 (other work a step: not compared) |" in text
    assert "| ours | t5.json | 667,733 | 60.0 |" in text and "| optim.name=adamw |" in text  # beyond the shipped config
    assert "| 25.0 |  | 3.1416 |  |" in text  # the loss after the timed steps (no peak memory recorded)


def test_moe_workload_is_the_same_model_as_transformers_mixtral():
    """bench/train_vs_hf.py --workloads moe: HF's Mixtral built from moe_1b.yaml (on torch's meta
    device: no memory) has exactly our parameters, tensor by tensor through the import table."""
    import torch
    import jax

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import train_vs_hf

    from t5x_lite.interop import hf
    from t5x_lite.models import abstract_params

    cfg = train_vs_hf.load_cfg("moe", False, [])
    with torch.device("meta"):
        model = train_vs_hf.hf_model(cfg)
    theirs = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    ours = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))
    assert sum(map(math.prod, theirs.values())) == ours
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_experts_per_tok == 2
    assert model.config.output_router_logits and model.config.router_aux_loss_coef == cfg.model.router_aux_loss
    assert theirs["model.layers.0.mlp.experts.gate_up_proj"] == (8, 2 * 1408, 2048)
    assert hf.ARCHS["mixtral"].hf_config(cfg.model, {})["intermediate_size"] == model.config.intermediate_size


def test_attention_note_reads_what_the_compiled_step_attends_with():
    """The trainer's (and the bench's) line on what runs, read from the compiled step's cuDNN calls
    (lines as XLA prints them for an H100): mask types, the packed layout's M, biases and the
    shapes of their gradients; no call: None (XLA's einsums)."""
    from t5x_lite.trainer import attention_note

    def call(kernel, results, mask, m=1):
        return (f'  %x = ({results}, u8[0]{{0}}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmha{kernel}", '
                f'backend_config={{"cudnn_fmha_backend_config": {{"is_flash_attention": true, "mask_type": "{mask}", '
                f'"max_seg_per_batch": {m}, "sliding_window_length": 0}}}}\n')

    qkv, stat = "bf16[8,4,16,8]{3,1,2,0}", "f32[8,4,16]{2,1,0}"
    t5_lengths = (call("ScaleBiasSoftmax", f"{qkv}, {stat}", "PADDING")
                  + call("ScaleBiasSoftmaxBackward", f"{qkv}, {qkv}, {qkv}, bf16[1,4,16,16]{{3,2,1,0}}", "PADDING")
                  + call("ScaleBiasSoftmax", f"{qkv}, {stat}", "PADDING_CAUSAL")
                  + call("ScaleBiasSoftmaxBackward", f"{qkv}, {qkv}, {qkv}, bf16[1,4,16,16]{{3,2,1,0}}",
                         "PADDING_CAUSAL")
                  + call("Softmax", f"{qkv}, {stat}", "PADDING") + call("SoftmaxBackward", f"{qkv}, {qkv}, {qkv}", "PADDING"))
    assert attention_note(t5_lengths) == ("attention: 3 cuDNN forward calls a step, mask PADDING x2, PADDING_CAUSAL x1; "
                                          "2 with a bias, gradients [1, 4, 16, 16] x2")
    dense = call("ScaleBiasSoftmax", f"{qkv}, {stat}", "NO_MASK") + call(
        "ScaleBiasSoftmaxBackward", f"{qkv}, {qkv}, {qkv}, bf16[8,4,16,16]{{3,2,1,0}}", "NO_MASK")
    assert attention_note(dense) == ("attention: 1 cuDNN forward call a step, mask NO_MASK x1; 1 with a bias, "
                                     "gradients [8, 4, 16, 16] x1")
    packed = call("Softmax", f"{qkv}, f32[32,4,16]{{2,1,0}}", "PADDING_CAUSAL", m=4)
    assert attention_note(packed) == "attention: 1 cuDNN forward call a step, mask PADDING_CAUSAL (packed layout, M 4) x1"
    assert attention_note("%fusion.1 = f32[8] fusion(%a), kind=kLoop") is None


def test_first_run_note_counts_the_cudnn_attention_calls():
    """The trainer's note on a GPU: each cuDNN attention call in the compiled step is built when the
    step first runs (H100: ~1.5 s each); a scanned stack's two calls say nothing, 16 unrolled layers'
    forward and backward calls say how long the first step will wait."""
    from t5x_lite.trainer import cudnn_attention_calls, first_run_note

    call = ('  %dot_product_attention_{kind}.{i} = (bf16[8,16,2048,128]{{3,1,2,0}}, u8[0]{{0}}) custom-call(%q, %k, %v), '
            'custom_call_target="__cudnn$fmhaSoftmax{suffix}", metadata={{op_name="x"}}\n')
    text = lambda layers: "".join(call.format(kind=k, i=i, suffix=s) for i in range(layers)
                                  for k, s in (("fwd", ""), ("bwd", "Backward")))
    assert cudnn_attention_calls(text(1)) == 2 and first_run_note(text(1)) is None
    assert cudnn_attention_calls("%fusion.1 = f32[8] fusion(%a), kind=kLoop") == 0
    note = first_run_note(text(16))
    assert "32 cuDNN attention calls" in note and "~48 s" in note and "model.scan_unroll=1" in note


def test_train_vs_hf_runs_the_update_hf_runs():
    """HF's rows step torch's AdamW, so ours step AdamW on every workload, t5_base too (its config
    trains with Adafactor, which a variant still selects); HF's reads the same betas and decay."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import train_vs_hf

    from t5x_lite.config import load_config

    assert load_config(os.path.join(ROOT, train_vs_hf.WORKLOADS["t5"])).optim.name == "adafactor"
    for workload in train_vs_hf.WORKLOADS:
        assert train_vs_hf.load_cfg(workload, False, []).optim.name == "adamw", workload
        assert train_vs_hf.load_cfg(workload, True, []).optim.name == "adamw", workload
    assert train_vs_hf.load_cfg("t5", False, ["optim.name=adafactor"]).optim.name == "adafactor"
