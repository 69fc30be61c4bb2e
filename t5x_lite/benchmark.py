"""``t5x-lite bench``: how fast one config trains on this machine, measured.

``plan`` estimates memory and time from formulas; this runs the real compiled train step on
random tokens and times it: compile, first step (init + compile + one step), then warm-up steps
and timed steps with one device sync at the end. Variants (``--variant NAME:key=value,...``)
run in the same process, one after another, each with its own compiled step, so that figures
side by side come from the same machine at the same time. The persistent compilation cache is
not used: compile times are cold ones.

Figures per variant: tokens/s, step time, MFU (``metrics.train_flops_per_step`` over the
device's dense bf16 peak, when known or given), compile seconds, first-step seconds, the
compiler's bytes per device (arguments + temporaries) and the loss (finite, near ln V on
random tokens). ``--profile DIR`` also traces two more steps of each variant and prints where
their time goes (``profiling.py``: by model part, forward / backward, costliest instructions).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from typing import Optional

import jax
import numpy as np

from t5x_lite.config import Config, ConfigError, load_config, parse_variant
from t5x_lite.data.shards import write_json


def random_batch(cfg: Config, seed: int = 0) -> dict:
    """One unpacked batch in the train step's format: random tokens, one document per row, all
    weights 1 (MLM: ``round(data.mlm_rate x length)`` scored positions per row)."""
    from t5x_lite.trainer import batch_shapes

    rng = np.random.default_rng(seed)
    out = {}
    for key, spec in batch_shapes(cfg).items():
        b, n = spec.shape
        if key.endswith("segment_ids"):
            out[key] = np.ones((b, n), np.int32)
        elif key.endswith("positions"):
            out[key] = np.broadcast_to(np.arange(n, dtype=np.int32), (b, n)).copy()
        elif key == "weights":
            w = np.ones((b, n), np.float32)
            if cfg.objective == "mlm":
                rank = np.argsort(np.argsort(rng.random((b, n)), -1), -1)
                w = (rank < round(cfg.data.mlm_rate * n)).astype(np.float32)
            out[key] = w
        elif key == "prefix_mask":
            out[key] = np.zeros((b, n), bool)
        else:
            out[key] = rng.integers(10, cfg.model.vocab_size, (b, n)).astype(np.int32)
    return out


PROFILE_STEPS = 2


def time_calls(step, args: tuple, repeats: int) -> tuple[float, float, object]:
    """``(compile + first call s, median s of ``repeats`` more, first output)`` of ``step(*args)``,
    each call waited for: the kernel benches (``bench/attention.py``, ``bench/mlp.py``)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(step(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times) if times else first, out


def measure_train(cfg: Config, steps: int, warmup: int, profile_dir: Optional[str] = None) -> dict:
    """Time ``cfg``'s train step on the local devices (``steps`` timed after ``warmup``). With
    ``profile_dir``, ``PROFILE_STEPS`` more steps run under the profiler afterwards (the timing
    stays unprofiled) and ``profile`` holds ``profiling.summarize`` of them. ``model.fit_max_segments``
    builds the packed layout for the one document each random row holds, as training fits its rows."""
    from t5x_lite import partitioning, trainer

    if cfg.model.fits_segments:  # random_batch's rows hold one document each: as training would fit them
        cfg = cfg.with_max_segments(1)
    t0 = time.perf_counter()
    mesh = partitioning.make_mesh(cfg)
    warn = lambda line: print(line, file=sys.stderr, flush=True)
    setup, compiled = trainer.compile_or_fall_back(trainer.make_setup(cfg, mesh), mesh, warn)
    compile_s = time.perf_counter() - t0
    with setup.activation_context():
        t_init = time.perf_counter()
        state = jax.block_until_ready(setup.init(jax.random.key(0)))
        init_s = time.perf_counter() - t_init
        batch = trainer.to_global(random_batch(cfg), setup.batch_sharding)  # bench/train_vs_hf: HF's too
        t_run = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        # the compiled step's first run: on a GPU it also builds each cuDNN attention call's kernels
        # (one per call in the program: a scanned stack has one, 16 unrolled layers 16)
        first_run_s = time.perf_counter() - t_run
        first_step_s = time.perf_counter() - t0
        for _ in range(max(warmup - 1, 0)):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        t1 = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, batch)
        loss = float(jax.device_get(metrics["loss"]))  # the one sync: every step has run
        step_s = (time.perf_counter() - t1) / steps
        profile = None
        hlo_text = compiled.as_text()
        if profile_dir:
            from t5x_lite import profiling

            with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
                for _ in range(PROFILE_STEPS):
                    state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics)
            with open(profile_dir.rstrip("/") + ".hlo.txt", "w") as f:  # beside the trace: what each op_name is
                f.write(hlo_text)
            try:
                profile = profiling.summarize(profile_dir, hlo_text, PROFILE_STEPS)
                # what the trace's instructions account for of the timed step (far under 1: events
                # missing from the trace, e.g. kernels inside CUDA graphs; over 1: overlapping streams)
                profile["step_ms"] = 1000 * step_s
            except (ValueError, FileNotFoundError) as e:  # the trace stays in profile_dir to read by hand
                profile = {"error": str(e)}
    device = jax.devices()[0]
    stats = trainer.compiled_stats(compiled)
    return {"profile": profile, "step_s": step_s, "first_step_s": first_step_s, "compile_s": compile_s,
            "init_s": init_s, "first_run_s": first_run_s, "loss": loss,
            "compiled_bytes": stats.get("argument_bytes", 0) + stats.get("temp_bytes", 0) or None,
            "peak_bytes": (device.memory_stats() or {}).get("peak_bytes_in_use"),
            "attention": setup.cfg.model.attention,  # what ran: the config's unless a fallback was taken
            "max_segments": cfg.model.max_segments,  # what the packed layout was built for (fit_max_segments: 1)
            "attention_fallback": setup.cfg.model.attention != cfg.model.attention,
            # the compiled step's cuDNN calls: mask types, biases and their gradients' shapes (None: XLA attends)
            "attention_kernels": trainer.attention_note(hlo_text),
            "device": device.device_kind, "num_devices": jax.device_count(), "jax": jax.__version__}


def _figures(cfg: Config, result: dict, peak_tflops: Optional[float]) -> dict:
    """tokens/s and MFU of one measurement (the training log's FLOP count)."""
    from t5x_lite.metrics import peak_flops, tokens_per_step, train_flops_per_step

    tokens, flops = tokens_per_step(cfg), train_flops_per_step(cfg)
    peak = peak_flops(result["device"], peak_tflops)
    out = {"tokens_per_step": tokens, "flops_per_step": flops,
           "tokens_per_s": tokens / result["step_s"]}
    if peak:
        out["mfu"] = flops / result["step_s"] / (peak * result["num_devices"])
    return out


def table(rows: list[dict]) -> str:
    head = ("| variant | tokens/s | step ms | MFU | compile s | first step s | of which first run s | compiled GB / device "
            "| loss |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        mem = f"{r['compiled_bytes'] / 1e9:.2f}" if r.get("compiled_bytes") else "-"
        name = r["variant"] + (f" (attention fell back to {r['attention']})" if r.get("attention_fallback") else "")
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {1000 * r['step_s']:.1f} | {mfu} | "
                     f"{r['compile_s']:.1f} | {r['first_step_s']:.1f} | {r['first_run_s']:.1f} | {mem} | {r['loss']:.3f} |")
    return "\n".join(lines)


def run_bench_cli(args) -> int:
    if args.steps < 1 or args.warmup < 1:
        raise ConfigError(f"--steps={args.steps} and --warmup={args.warmup} must be >= 1")
    variants = [("default", [])] + [parse_variant(v) for v in args.variant]
    names = [name for name, _ in variants]
    if len(set(names)) < len(names):
        raise ConfigError(f"--variant names must differ from each other and from 'default': {names[1:]}")
    cfgs = [(name, load_config(args.config, args.overrides + extra)) for name, extra in variants]  # all checked first
    if args.profile:
        from t5x_lite.profiling import no_graphs_note

        no_graphs_note(print_to=sys.stderr)
    rows = []
    for name, cfg in cfgs:
        print(f"bench {name}: compiling and timing {args.warmup} + {args.steps} steps of batch "
              f"{cfg.train.batch_size} x {cfg.data.seq_len}", file=sys.stderr, flush=True)
        profile_dir = os.path.join(args.profile, name) if args.profile else None
        result = measure_train(cfg, args.steps, args.warmup, profile_dir)
        if result["profile"]:
            from t5x_lite.profiling import format_summary

            summary = result["profile"].get("error") or format_summary(result["profile"])
            print(f"profile of {name} ({profile_dir}):\n{summary}\n", file=sys.stderr)
        if not math.isfinite(result["loss"]):
            print(f"warning: variant {name}: the loss is {result['loss']}", file=sys.stderr)
        row = {"variant": name, "overrides": args.overrides + dict(variants)[name], **result,
               **_figures(cfg, result, args.peak_tflops)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(table(rows))
    if args.json:
        write_json(args.json, {"date": time.strftime("%Y-%m-%d"), "config": args.config, "results": rows})
    return 0
