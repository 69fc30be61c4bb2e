"""Decode throughput of ``t5x_lite.generate``: tokens/s at batch 1 and 32 (128-token prompts,
256 new tokens), LLaMA-1B with bf16 weights and random init by default.

    python bench/decode.py                                # configs/llama_1b.yaml on the GPU
    python bench/decode.py --set model.attention=xla      # any config override
    python bench/decode.py --variant unroll:model.scan_unroll=16   # another row, same params
    python bench/decode.py --smoke                        # configs/decoder_tiny.yaml: runs on a CPU
    python bench/decode.py --batch-sizes 1,8,32 --json runs/decode_bench.json
    python bench/decode.py --batch-sizes 1 --profile runs/decode_profile   # kernel by kernel, per token

Every figure excludes compilation: each shape runs once to compile (reported as
``compile_s``: first call minus a timed call), then ``--repeats`` timed runs (median). EOS is
ignored, so every row generates exactly ``--new-tokens`` tokens. ``tokens_per_s`` is end to end
(prefill + decode, batch x new tokens / time); ``decode_tokens_per_s`` leaves the prefill out: it
times ``--new-tokens`` against 1 new token. One JSON object per batch size goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

import t5x_lite
from t5x_lite.config import ConfigError, load_config, parse_variant
from t5x_lite.data.shards import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="default: configs/llama_1b.yaml (--smoke: decoder_tiny.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="more rows, same params: e.g. unroll:model.scan_unroll=16 (model.attention, remat, "
                        "scan_unroll, dtype: what does not change the parameters)")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--param-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--smoke", action="store_true", help="the tiny CPU config, 2 timed runs")
    p.add_argument("--json", default=None, help="also write all results to this file")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also trace one generation of each variant at the first batch size (XLA's CUDA graphs "
                        "off) and print per generated token: instruction time, instruction runs (kernels), "
                        "the costliest; a decoding step is launch-bound when its instructions' time is far "
                        "below its timed step")
    return p.parse_args(argv)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def random_prompts(cfg, batch: int, prompt_len: int) -> np.ndarray:
    rng = np.random.default_rng(batch)
    prompts = rng.integers(5, cfg.model.vocab_size, (batch, prompt_len)).astype(np.int32)
    prompts[:, 0] = 3  # BOS
    return prompts


def measure(cfg, params, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Compile, then time ``generate`` for ``new_tokens`` and for 1 token at one batch size."""
    prompts = random_prompts(cfg, batch, prompt_len)

    def run(k):
        return lambda: generate_once(cfg, params, prompts, k)

    out = {}
    for k in (new_tokens, 1):
        first = timed(run(k))
        times = [timed(run(k)) for _ in range(repeats)]
        out[k] = (first, statistics.median(times))
    (first_k, t_k), (first_1, t_1) = out[new_tokens], out[1]
    return {
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "seconds": round(t_k, 4),
        "tokens_per_s": round(batch * new_tokens / t_k, 1),
        "decode_tokens_per_s": round(batch * (new_tokens - 1) / max(t_k - t_1, 1e-9), 1),
        "ms_per_step": round(1000 * (t_k - t_1) / (new_tokens - 1), 3),
        "prefill_s": round(t_1, 4),
        "compile_s": round(max((first_k - t_k) + (first_1 - t_1), 0.0), 2),  # already compiled: noise, not < 0
    }


def generate_once(cfg, params, prompts, max_new_tokens):
    tokens = t5x_lite.generate(cfg, params, prompts, max_new_tokens=max_new_tokens, eos_id=None)
    assert tokens.shape == (len(prompts), max_new_tokens)  # host copy: the run is complete


def profile(cfg, params, batch: int, prompt_len: int, new_tokens: int, log_dir: str, ms_per_step: float) -> dict:
    """One traced generation (already compiled by ``measure``), per generated token: the module that
    took the most time (the token loop's), its instructions' time, runs and costliest (by name: the
    module's text is not at hand here)."""
    from t5x_lite import profiling

    prompts = random_prompts(cfg, batch, prompt_len)
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        generate_once(cfg, params, prompts, new_tokens)
    try:
        summary = profiling.summarize(log_dir, "", new_tokens)
    except (ValueError, FileNotFoundError) as e:
        return {"error": str(e)}
    summary["step_ms"] = ms_per_step
    summary.pop("categories")  # without the module's text every instruction would be "other"
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    default = "configs/decoder_tiny.yaml" if args.smoke else "configs/llama_1b.yaml"
    path = args.config or os.path.join(ROOT, default)
    overrides = [f"model.param_dtype={args.param_dtype}", *args.overrides]
    if args.smoke:
        args.repeats = min(args.repeats, 2)
    cfg = load_config(path, overrides)
    longest = args.prompt_len + args.new_tokens
    if longest > cfg.model.max_length:
        print(f"error: --prompt-len + --new-tokens = {longest} exceeds model.max_length={cfg.model.max_length}",
              file=sys.stderr)
        return 2
    if args.profile:
        from t5x_lite.profiling import no_graphs_note

        no_graphs_note(print_to=sys.stderr)  # before the first device is asked for
    device = jax.devices()[0]
    t0 = time.perf_counter()
    params = jax.block_until_ready(t5x_lite.init_params(cfg, seed=0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"{os.path.basename(path)}: {n_params / 1e6:.1f}M params ({args.param_dtype}), "
          f"cache {cfg.model.dtype}, attention={cfg.model.attention}, {jax.device_count()} x "
          f"{device.device_kind}; init {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    try:
        variants = [("default", cfg)] + [(name, load_config(path, overrides + extra))
                                         for name, extra in map(parse_variant, args.variant)]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = []
    for name, variant_cfg in variants:
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            r = measure(variant_cfg, params, batch, args.prompt_len, args.new_tokens, args.repeats)
            r.update(variant=name, config=os.path.basename(path), params_m=round(n_params / 1e6, 1),
                     param_dtype=args.param_dtype, device=device.device_kind, num_devices=jax.device_count(),
                     jax=jax.__version__)
            results.append(r)
            print(json.dumps(r), flush=True)
            print(f"  {name} batch {batch:3d}: {r['tokens_per_s']:>10,.0f} tok/s end to end, "
                  f"{r['decode_tokens_per_s']:>10,.0f} tok/s decode ({r['ms_per_step']:.2f} ms/step), "
                  f"prefill {r['prefill_s'] * 1000:.0f} ms, compile {r['compile_s']:.1f}s", file=sys.stderr)
            if args.profile and batch == int(args.batch_sizes.split(",")[0]):
                r["profile"] = profile(variant_cfg, params, batch, args.prompt_len, args.new_tokens,
                                       os.path.join(args.profile, name), r["ms_per_step"])
                p = r["profile"]
                print(p.get("error") or f"  {name} batch {batch:3d}, per generated token (graphs off): "
                      f"{p['busy_ms_per_step']:.3f} ms of instructions in {p['launches_per_step']:.0f} runs, "
                      f"against {p['step_ms']:.3f} ms a timed step; costliest: "
                      + ", ".join(f"{o['hlo_op']} {o['ms']:.3f} ms ({o['calls']:.0f}x)" for o in p["ops"][:5]),
                      file=sys.stderr)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
