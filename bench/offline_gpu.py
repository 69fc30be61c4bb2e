"""Compile a train step (or the decoding loop) for an H100 on a machine without a GPU, and price
every kernel of the compiled program (``t5x_lite/hlo_cost.py``): what a change does to a GPU step,
read from the program XLA would run there, between GPU sessions.

    bash bench/offline_gpu_env.sh                      # once: a Python 3.12 venv with jax 0.11.2 + CUDA plugin
    OFFLINE=~/.cache/t5x_lite/offline_gpu/bin/python
    $OFFLINE bench/offline_gpu.py --config configs/llama_1b.yaml
    $OFFLINE bench/offline_gpu.py --config configs/llama_1b.yaml --variant unroll:model.scan_unroll=16 \
        --variant dsf:xla.xla_gpu_enable_dynamic_slice_fusion=true     # rows side by side
    $OFFLINE bench/offline_gpu.py --config configs/llama_1b.yaml --decode 1   # the token loop, batch 1
    $OFFLINE bench/offline_gpu.py --config configs/llama_1b.yaml --gpus 8     # ZeRO-3 over 8 H100s (NVLink)
    python bench/offline_gpu.py --hlo runs/profile/step.hlo.txt        # any saved program (no plugin needed)
    python bench/offline_gpu.py --hlo before.hlo.txt --hlo after.hlo.txt   # two saved programs, what changed

Every row after the first also says what changed from the first, by work (the same kernel in
every layer together: ``hlo_cost.changes``), the largest moves in time first. A variant's
``xla.NAME=VALUE`` entries are XLA options for that compile only (``--xla_NAME`` without the
dashes); the others are config overrides. Nothing runs: XLA compiles against an H100's
description (``H100_TARGET`` below: the same fusions, loops, copies and cuDNN calls as on the
device, GEMM tilings not autotuned), and the estimate is a roofline per kernel (bandwidth 3.0
TB/s, GEMMs 800 TFLOP/s, measured on an H100 by this project; see ``hlo_cost``). It is a guide to
where time goes and to what a change removes, not a measurement: GPU figures come from the device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from t5x_lite.config import xla_option  # noqa: E402  (no jax: the CUDA plugin is set up first)

# An H100 SXM's description for XLA (a stream_executor.GpuTargetConfigProto): the chip's published
# figures, and the cuDNN of the device machine's jax 0.11.2 (9.x).
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84978434048 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/llama_1b.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="another row: config overrides and xla.NAME=VALUE compiler options")
    p.add_argument("--decode", type=int, default=0, metavar="BATCH",
                   help="price the generation loop (greedy, --prompt-len + --new-tokens) at this batch, not training")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--gpus", type=int, default=1, help="H100s on one host (NVLink): the config's mesh over them")
    p.add_argument("--hlo", action="append", default=[], metavar="FILE",
                   help="price this saved program text instead of compiling one (again: more rows, each named "
                        "by its file, set against the first)")
    p.add_argument("--save-hlo", default=None, metavar="DIR", help="write each row's compiled program here")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def split_variant(overrides: list[str]) -> tuple[list[str], dict]:
    """Config overrides and XLA compiler options (``xla.NAME=VALUE``) of one row."""
    config, xla = [], {}
    for item in overrides:
        if item.startswith("xla."):
            name, value = xla_option(item[4:])
            xla[name] = value
        else:
            config.append(item)
    return config, xla


def h100_devices(gpus: int = 1):
    """Compile-only devices of ``gpus`` H100s on one host (jax's CUDA plugin, no GPU needed), and
    jax patched to answer its cuDNN checks for that device instead of the (absent) local one."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver here: skip the plugin's probe
    import jax._src.cudnn.fused_attention_stablehlo as fused
    from jax._src import xla_bridge

    try:
        topology = xla_bridge.make_pjrt_topology("cuda", "", topology=f"1x1x{gpus}", target_config=H100_TARGET)
    except Exception as e:  # no plugin: say how to get one
        raise SystemExit(f"offline_gpu: jax's CUDA plugin is needed to compile for a GPU ({type(e).__name__}: "
                         f"{str(e)[:200]}); run `bash bench/offline_gpu_env.sh` and use its python") from e
    version = lambda c: tuple(int(x) for x in c.split("."))
    fused.check_compute_capability = lambda c: version(c) <= (9, 0)
    fused.is_cuda_compute_capability_equal = lambda c: version(c) == (9, 0)
    from t5x_lite.models import layers

    layers.on_gpu = lambda: True  # attention=auto takes the GPU's paths (cuDNN)
    return topology._make_compile_only_devices()


def compile_train(cfg, devices, xla: dict) -> str:
    from t5x_lite import partitioning, trainer

    setup = trainer.make_setup(cfg, partitioning.make_mesh(cfg, devices))
    return trainer.compile_train_step(setup, compiler_options=xla).as_text()


def compile_decode(cfg, devices, xla: dict, batch: int, prompt_len: int, new_tokens: int) -> str:
    """The sampling loop (greedy) after a prompt of ``prompt_len``: the program each token runs."""
    import jax
    import numpy as np

    from t5x_lite import decoding, partitioning
    from t5x_lite.models import abstract_params
    import flax.linen as nn

    dec = decoding._decoder(cfg, partitioning.make_mesh(cfg, devices), batch)
    # the parameters as training stores them, then as generate hands them to the loop (put_params)
    stored = jax.eval_shape(dec.prepare, nn.meta.unbox(abstract_params(cfg)))
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), stored,
                          dec.param_shardings)
    ids = tuple(jax.ShapeDtypeStruct((batch, prompt_len), np.int32, sharding=dec.batch) for _ in range(3))
    prefill = dec._build_prefill(params, ids, new_tokens, decoding.BOS_ID)
    with dec.context():
        state = jax.eval_shape(prefill, params, *ids)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                         dec._state_shardings(state))
    sample = dec._build_sample(state, new_tokens, output_logits=False, greedy=True)
    rep = dec.replicated
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
    sampling = decoding.Sampling(*(jax.ShapeDtypeStruct((), np.float32 if i != 1 else np.int32, sharding=rep)
                                   for i in range(3)))
    eos = jax.ShapeDtypeStruct((decoding.MAX_STOP_IDS,), np.int32, sharding=rep)
    with dec.context():
        lowered = sample.lower(params, state, key, sampling, eos)
    return lowered.compile(compiler_options=xla or None).as_text()


def main(argv=None) -> int:
    args = parse_args(argv)
    from t5x_lite import hlo_cost

    rows, costs = [], []
    if args.hlo:
        names = [os.path.basename(path).split(".")[0] for path in args.hlo]
        if len(set(names)) < len(names):  # step.hlo.txt in two run folders: name them by folder too
            names = [f"{os.path.basename(os.path.dirname(os.path.abspath(p)))}/{n}" for p, n in zip(args.hlo, names)]
        for path, name in zip(args.hlo, names if len(args.hlo) > 1 else ["saved"]):
            with open(path) as f:
                costs.append(hlo_cost.kernel_costs(f.read()))
            rows.append((name, hlo_cost.summarize(costs[-1], args.top), 0.0))
    else:
        devices = h100_devices(args.gpus)
        from t5x_lite.config import load_config, parse_variant

        variants = [("default", [])] + [parse_variant(v) for v in args.variant]
        for name, overrides in variants:
            config_overrides, xla = split_variant(overrides)
            cfg = load_config(os.path.join(ROOT, args.config) if not os.path.isabs(args.config) else args.config,
                              args.overrides + config_overrides)
            t0 = time.perf_counter()
            if args.decode:
                text = compile_decode(cfg, devices, xla, args.decode, args.prompt_len, args.new_tokens)
            else:
                text = compile_train(cfg, devices, xla)
            compile_s = time.perf_counter() - t0
            if args.save_hlo:
                os.makedirs(args.save_hlo, exist_ok=True)
                with open(os.path.join(args.save_hlo, f"{name}.hlo.txt"), "w") as f:
                    f.write(text)
            # decoding: the token loop's trip count is not known to XLA (rows may stop early); priced
            # for --new-tokens tokens, and a token's share is the call's / new tokens
            trips = args.new_tokens if args.decode else 1
            costs.append(hlo_cost.kernel_costs(text, unknown_trips=trips))
            rows.append((name, hlo_cost.summarize(costs[-1], args.top), compile_s))
    for name, summary, compile_s in rows:
        if args.decode:
            summary["ms_per_token"] = round(summary["ms"] / args.new_tokens, 4)
            print(f"[{name}] decoding {args.new_tokens} tokens at batch {args.decode}: estimated "
                  f"{summary['ms_per_token']:.3f} ms a token ({1e3 / summary['ms_per_token'] * args.decode:,.0f} tok/s), "
                  f"{summary['gbytes'] / args.new_tokens:.2f} GB moved a token")
        print(hlo_cost.format_summary(summary, title=f"[{name}] compiled in {compile_s:.0f} s; "))
        print()
    if len(rows) > 1:
        base, base_name = rows[0][1], rows[0][0]
        print(f"rows against {base_name}: estimated ms a step, kernel runs, GB moved, cuDNN calls (first-run builds)")
        for name, s, _ in rows:
            print(f"  {name:24s} {s['ms']:9.1f} ms ({s['ms'] - base['ms']:+.1f}) {s['kernels']:7d} "
                  f"({s['kernels'] - base['kernels']:+d}) {s['gbytes']:8.1f} GB ({s['gbytes'] - base['gbytes']:+.1f}) "
                  f"{s['cudnn_calls']:4d}")
        for (name, s, _), row_costs in zip(rows[1:], costs[1:]):
            s["changes"] = hlo_cost.changes(costs[0], row_costs, args.top)
            print(f"\nwhat changed from {base_name} to {name} (the same work in every layer together; "
                  f"ms, kernel runs, GB moved a step):")
            for r in s["changes"]:
                print(f"  {r['ms']:+8.2f} ms (of {r['base_ms']:7.2f}) {r['kernels']:+6d} runs {r['gbytes']:+7.2f} GB  "
                      f"{r['name'][:90]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "overrides": args.overrides, "decode_batch": args.decode,
                       "rows": [dict(name=n, compile_s=round(c, 1), **s) for n, s, c in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
