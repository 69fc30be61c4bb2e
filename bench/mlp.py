"""The SwiGLU MLP of one llama_1b layer, forward + backward, against the GEMMs it is made of.

The plain-JAX profile in PERF_NOTES put the MLP at 57% of the llama_1b step while running at
~55% of the measured matmul peak. This isolates it: same shapes, one layer, bf16, side by side:

    python bench/mlp.py                  # GPU: 8 x 2048 tokens, d_model 2048, d_ff 5632
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python bench/mlp.py   # cuBLAS for every GEMM
    python bench/mlp.py --smoke          # tiny, float32, CPU

Rows (each the median of ``--repeats`` runs of ``jit(grad)`` after a compile run):

- ``module``  t5x_lite's ``layers.Mlp`` (the flax module the model runs), input and weight grads;
- ``fused``   the same math with gate and up as one ``[D, 2F]`` matmul (MaxText's fused_mlp);
- ``gemms``   only the 9 matmuls of forward + backward at the same shapes (3 forward, 2 per
              weight backward), no activation and no elementwise work: the rate to aim for.

FLOPs of every row: 18 x tokens x d_model x d_ff (3 matmuls of 2 M D F, x3 with the backward).
Prints one JSON object per row and a table; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from t5x_lite.benchmark import time_calls  # noqa: E402
from t5x_lite.config import load_config  # noqa: E402
from t5x_lite.data.shards import write_json  # noqa: E402
from t5x_lite.models.layers import Mlp  # noqa: E402


def rows(tokens: int, d: int, f: int, dtype, seed: int = 0) -> dict:
    """name -> (jitted step, its arguments), all computing forward + backward of one MLP."""
    cfg = load_config(os.path.join(ROOT, "configs", "llama_1b.yaml"),
                      [f"model.d_model={d}", f"model.d_ff={f}", f"model.dtype={jnp.dtype(dtype).name}",
                       f"model.param_dtype={jnp.dtype(dtype).name}"]).model
    keys = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(keys[0], (1, tokens, d), dtype)
    g = jax.random.normal(keys[1], (1, tokens, d), dtype)
    mlp = Mlp(cfg)
    params = nn.unbox(mlp.init(keys[2], x)["params"])
    w0, w1, wo = (params[n]["kernel"] for n in ("wi_0", "wi_1", "wo"))

    def module_loss(params, x):
        return jnp.sum((mlp.apply({"params": params}, x) * g).astype(jnp.float32))

    def fused_loss(w01, wo, x):
        gate, up = jnp.split(x @ w01, 2, axis=-1)
        return jnp.sum(((jax.nn.silu(gate) * up) @ wo * g).astype(jnp.float32))

    def gemms(x2, h, w0, w1, wo, d_gate, d_up, dy):  # 3 forward + 6 backward matmuls, nothing else
        return (x2 @ w0, x2 @ w1, h @ wo,  # forward (returned whole: no reduction XLA could fold)
                dy @ wo.T, h.T @ dy,  # wo: input and weight gradients
                d_gate @ w0.T, x2.T @ d_gate, d_up @ w1.T, x2.T @ d_up)  # wi_0, wi_1

    h, d_gate, d_up = (jax.random.normal(k, (tokens, f), dtype) for k in jax.random.split(keys[0], 3))
    return {
        "module": (jax.jit(jax.grad(module_loss, argnums=(0, 1))), (params, x)),
        "fused": (jax.jit(jax.grad(fused_loss, argnums=(0, 1, 2))), (jnp.concatenate([w0, w1], axis=-1), wo, x)),
        "gemms": (jax.jit(gemms), (x[0], h, w0, w1, wo, d_gate, d_up, g[0])),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8 * 2048)
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--d-ff", type=int, default=5632)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=856.0,
                   help="for the %% column: the bf16 matmul rate measured through JAX on an H100 (PERF_NOTES)")
    p.add_argument("--smoke", action="store_true", help="tiny float32 shapes (CPU)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dtype = jnp.bfloat16
    if args.smoke:
        args.tokens, args.d_model, args.d_ff, args.repeats, dtype = 256, 64, 96, 2, jnp.float32
    flops = 18 * args.tokens * args.d_model * args.d_ff
    device = jax.devices()[0]
    results = []
    reference = None
    for name, (step, step_args) in rows(args.tokens, args.d_model, args.d_ff, dtype).items():
        first, median, out = time_calls(step, step_args, args.repeats)
        row = {"variant": name, "tokens": args.tokens, "d_model": args.d_model, "d_ff": args.d_ff,
               "dtype": jnp.dtype(dtype).name, "device": device.device_kind, "jax": jax.__version__,
               "compile_s": round(first - median, 3), "ms": round(1000 * median, 3),
               "tflops": round(flops / median / 1e12, 2), "of_peak": round(flops / median / 1e12 / args.peak_tflops, 3)}
        if name == "module":
            reference = out[1]  # d loss / d x
        elif name == "fused":  # the same function: its input gradient must match the module's
            row["max_dx_err"] = float(np.abs(np.asarray(out[2], np.float32) - np.asarray(reference, np.float32)).max())
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| variant | ms fwd+bwd | TFLOP/s | of {args.peak_tflops:g} |  ({device.device_kind}, {args.tokens} tokens, "
          f"{args.d_model} -> {args.d_ff}, {jnp.dtype(dtype).name}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['ms']:.2f} | {r['tflops']:.1f} | {100 * r['of_peak']:.0f}% |")
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
