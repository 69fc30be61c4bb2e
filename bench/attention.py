"""Attention kernels on one layer of the llama_1b shape: forward + backward time and error of
each way t5x_lite could call attention on packed rows, side by side in one run.

    python bench/attention.py                         # GPU: [8, 2048, 16 heads / 8 kv, 128], bf16
    python bench/attention.py --segments 1            # one document per row (causal == document mask)
    python bench/attention.py --smoke                 # tiny, float32, CPU: the two XLA rows only

Rows (each ``jit(grad)`` of ``sum(attention(q, k, v) * g)``, timed as the median of
``--repeats`` runs after a compile run):

- ``xla_mask``     our XLA einsum attention with the ``[B, 1, T, S]`` document + causal mask
                   (``model.attention=xla``); the reference of every error column (float32);
- ``xla_packed``   the same attention with the documents rebuilt from the lengths / starts that
                   ``cudnn_packed`` is given: zero error checks them (runs on a CPU too);
- ``cudnn_mask``   ``jax.nn.dot_product_attention(mask=..., implementation="cudnn")``: what
                   ``model.attention=cudnn`` calls today; jax turns the mask into a dense bias
                   and runs the kernel non-causal;
- ``cudnn_causal`` the same with ``is_causal=True`` and no mask: the fastest call there is,
                   but it ignores document boundaries (equal to the reference only with
                   ``--segments 1``);
- ``cudnn_packed`` jax's cuDNN function with ``mask_type=PADDING_CAUSAL`` and per-document
                   lengths and starts (``q_seqlen``/``q_offsets``, ``[B, M]`` / ``[B, M + 1]``):
                   causal within each document, no bias. A private jax API: an error row says
                   this jax does not take it. ``model.attention=cudnn_packed`` runs this call.
- ``pallas_segments`` / ``pallas_segments_bwd64``: jax's own Pallas (Triton) flash attention
                   as ``model.attention=pallas`` runs it (``layers.pallas_segment_attention``):
                   causal, documents from the segment ids inside the kernel (no M: nothing
                   grows with the documents a row), k / v repeated for GQA; the library's
                   default backward blocks (32) and blocks of 64.

``--t5`` times T5's biased attention instead: one t5_base encoder layer ([64, 512, 12 heads x 64],
bf16, a trainable float32 ``[1, N, T, S]`` relative bias, non-causal documents), every row's
gradient taken for q, k, v and the bias:

- ``xla_bias``          XLA's einsum attention with bias and mask (the float32 reference);
- ``cudnn_bias``        ``jax.nn.dot_product_attention(bias=, mask=, implementation="cudnn")``:
                        cuDNN computes the gradient of the ``[B, N, T, S]`` bias + mask, then
                        summed over the batch (``model.attention_bias_grad: cudnn``);
- ``cudnn_pallas_bias`` cuDNN without a bias gradient and the Pallas kernel summing it over the
                        batch (``model.attention_bias_grad: pallas``, ``models/bias_grad.py``);
- ``xla_own_bias``      (``--smoke``) the same VJP with XLA standing in for both kernels;
- ``cudnn_lengths_bias`` (``--segments 1``: rows of one document) cuDNN given a length a row and
                        the ``[1, N, T, S]`` bias as it is, no mask: its gradient comes back
                        ``[1, N, T, S]`` (``model.max_segments: 1``); ``xla_lengths_bias`` with
                        ``--smoke``: the same call on jax's XLA reference;
- ``cudnn_lengths_pallas_bias`` (``--segments 1``) the lengths with no bias gradient from cuDNN
                        and the Pallas kernel's instead (``model.attention_bias_grad: pallas``);
                        ``xla_lengths_own_bias`` with ``--smoke``: its VJP on XLA.

Prints one JSON object per row and a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from t5x_lite.benchmark import time_calls  # noqa: E402
from t5x_lite.data.shards import write_json  # noqa: E402
from t5x_lite.models.layers import (  # noqa: E402
    attention_mask,
    cudnn_packed_attention,
    dot_product_attention,
    pallas_segment_attention,
    row_lengths,
    segment_lengths_and_starts,
    segments_from_lengths_and_starts,
)


def packed_rows(batch: int, length: int, segments: int, seed: int = 0) -> np.ndarray:
    """int32 [B, T] segment ids: ``segments`` documents of random lengths per row, then 5% padding."""
    rng = np.random.default_rng(seed)
    used = int(length * 0.95) if segments > 1 else length
    out = np.zeros((batch, length), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, used), segments - 1, replace=False)) if segments > 1 else []
        bounds = [0, *cuts, used]
        for s in range(segments):
            out[b, bounds[s]:bounds[s + 1]] = s + 1
    return out


def variants(seg: jax.Array, scale: float, max_segments: int, interpret: bool = False) -> dict:
    t = seg.shape[1]
    idx = jnp.arange(t)
    mask = attention_mask(seg, seg, causal=True, q_idx_T=idx, k_idx_S=idx)

    def xla_mask(q, k, v):
        return dot_product_attention(q, k, v, mask, None, scale, "xla")

    def cudnn_mask(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")

    def cudnn_causal(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale, implementation="cudnn")

    def cudnn_packed(q, k, v):  # what model.attention=cudnn_packed runs in every layer
        lengths, starts = segment_lengths_and_starts(seg, max_segments)
        return cudnn_packed_attention(q, k, v, None, (lengths, starts, lengths, starts), scale, causal=True)

    def xla_packed(q, k, v):  # the documents rebuilt from lengths / starts alone: checks them on any device
        rebuilt = segments_from_lengths_and_starts(*segment_lengths_and_starts(seg, max_segments), t)
        mask2 = attention_mask(rebuilt, rebuilt, causal=True, q_idx_T=idx, k_idx_S=idx)
        return dot_product_attention(q, k, v, mask2, None, scale, "xla")

    def pallas_segments(q, k, v, bwd_block=None):  # what model.attention=pallas runs in every layer
        from jax.experimental.pallas.ops.gpu import attention as pallas_attention

        blocks = None
        if bwd_block:
            blocks = pallas_attention.BlockSizes(block_q=128, block_k=128, block_q_dkv=bwd_block,
                                                 block_kv_dkv=bwd_block, block_q_dq=bwd_block, block_kv_dq=bwd_block)
        return pallas_segment_attention(q, k, v, seg, scale, True, block_sizes=blocks, interpret=interpret)

    return {"xla_mask": xla_mask, "xla_packed": xla_packed, "cudnn_mask": cudnn_mask, "cudnn_causal": cudnn_causal,
            "cudnn_packed": cudnn_packed, "pallas_segments": pallas_segments,
            "pallas_segments_bwd64": lambda q, k, v: pallas_segments(q, k, v, 64)}


def bias_variants(seg: jax.Array, scale: float, blocks: tuple = ()) -> dict:
    """T5's encoder self-attention with its relative bias, each way the model can run it; ``blocks``:
    ``(block_q, block_k, num_warps)`` of more ``cudnn_pallas_bias`` rows (the kernel's tuning)."""
    import functools

    from t5x_lite.models import bias_grad

    mask = attention_mask(seg, seg, causal=False)

    def xla_bias(q, k, v, bias):
        return dot_product_attention(q, k, v, mask, bias, scale, "xla")

    def cudnn_bias(q, k, v, bias):  # what the layers call with attention_bias_grad=cudnn
        return jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), mask=mask, scale=scale,
                                            implementation="cudnn")

    def cudnn_pallas_bias(q, k, v, bias):
        return bias_grad.attention_own_bias_grad(q, k, v, bias, mask, scale)

    lengths = (row_lengths(seg), row_lengths(seg))  # rows of one document (--segments 1) only

    def cudnn_lengths_bias(q, k, v, bias):  # what the layers call with model.max_segments 1
        return dot_product_attention(q, k, v, mask, bias, scale, "cudnn_packed", lengths=lengths)

    def cudnn_lengths_pallas_bias(q, k, v, bias):  # ... with model.attention_bias_grad pallas
        return dot_product_attention(q, k, v, mask, bias, scale, "cudnn_packed", bias_grad="pallas", lengths=lengths)

    def xla_lengths_own_bias(q, k, v, bias):  # its VJP with XLA standing in for both kernels
        return bias_grad.attention_own_bias_grad(q, k, v, bias, None, scale, bias_grad.xla_core,
                                                 bias_grad.bias_grad_reference, lengths=lengths)

    def xla_lengths_bias(q, k, v, bias):  # the same call on jax's XLA reference: checks it on any device
        return jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), scale=scale,
                                            query_seq_lengths=lengths[0], key_value_seq_lengths=lengths[1],
                                            implementation="xla")

    def xla_own_bias(q, k, v, bias):
        return bias_grad.attention_own_bias_grad(q, k, v, bias, mask, scale, bias_grad.xla_core,
                                                 bias_grad.bias_grad_reference)

    def tuned(bq, bk, warps):
        kernel = functools.partial(bias_grad.bias_grad_pallas, block=bq, block_k=bk, num_warps=warps)
        return lambda q, k, v, bias: bias_grad.attention_own_bias_grad(q, k, v, bias, mask, scale,
                                                                       bias_grad.cudnn_core, kernel)

    fns = {"xla_bias": xla_bias, "cudnn_bias": cudnn_bias, "cudnn_pallas_bias": cudnn_pallas_bias,
           "xla_own_bias": xla_own_bias, "cudnn_lengths_bias": cudnn_lengths_bias, "xla_lengths_bias": xla_lengths_bias,
           "cudnn_lengths_pallas_bias": cudnn_lengths_pallas_bias, "xla_lengths_own_bias": xla_lengths_own_bias}
    fns.update({f"cudnn_pallas_bias_{bq}x{bk}w{w}": tuned(bq, bk, w) for bq, bk, w in blocks})
    return fns


def measure(fn, args: tuple, g, repeats: int) -> tuple[float, float, jax.Array, tuple]:
    """``(compile + first run s, median s, output, grads)`` of forward + backward, the gradient
    taken for every argument."""
    def loss(*args):
        out = fn(*args)
        return jnp.sum(out.astype(jnp.float32) * g), out

    step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))
    first, median, ((_, out), grads) = time_calls(step, args, repeats)
    return first, median, out, grads


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # default sizes: one llama_1b layer, or with --t5 one t5_base encoder layer
    p.add_argument("--batch", type=int, default=None, help="8 (--t5: 64)")
    p.add_argument("--length", type=int, default=None, help="2048 (--t5: 512)")
    p.add_argument("--heads", type=int, default=None, help="16 (--t5: 12)")
    p.add_argument("--kv-heads", type=int, default=None, help="8 (--t5: 12)")
    p.add_argument("--head-dim", type=int, default=None, help="128 (--t5: 64)")
    p.add_argument("--segments", type=int, default=4, help="documents per row")
    p.add_argument("--max-segments", type=int, default=None,
                   help="M of the packed layout (default: --segments; the model uses model.max_segments)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny float32 shapes, XLA rows only (CPU)")
    p.add_argument("--t5", action="store_true",
                   help="T5's relative-bias attention (a t5_base encoder layer, unless sizes are given)")
    p.add_argument("--bias-blocks", default="64x128x4,128x64x8,128x128x8",
                   help="--t5: more Pallas rows, block_q x block_k x warps, comma-separated (default 64x64x4)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dtype = jnp.bfloat16
    names = ["xla_mask", "cudnn_mask", "cudnn_causal", "cudnn_packed", "pallas_segments", "pallas_segments_bwd64"]
    sizes = dict(zip(("batch", "length", "heads", "kv_heads", "head_dim"),
                     (64, 512, 12, 12, 64) if args.t5 else (8, 2048, 16, 8, 128)))
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.t5:
        blocks = tuple(tuple(int(x) for x in b.split("x")) for b in args.bias_blocks.split(",") if b)
        names = ["xla_bias", "cudnn_bias", "cudnn_pallas_bias", *(f"cudnn_pallas_bias_{bq}x{bk}w{w}"
                                                                   for bq, bk, w in blocks)]
    if args.smoke:
        args.batch, args.length, args.heads, args.kv_heads, args.head_dim = 2, 64, 4, 2, 16
        args.repeats, dtype = 2, jnp.float32
        # the Pallas kernel in its interpreter: its documents and GQA checked, not its speed
        names = ["xla_bias", "xla_own_bias"] if args.t5 else ["xla_mask", "xla_packed", "pallas_segments"]
    if args.t5 and args.segments == 1:  # rows of one document: also a length a row (model.max_segments 1)
        names[1:1] = (["xla_lengths_bias", "xla_lengths_own_bias"] if args.smoke
                      else ["cudnn_lengths_bias", "cudnn_lengths_pallas_bias"])
    keys = jax.random.split(jax.random.key(0), 4)
    b, t, n, kh, h = args.batch, args.length, args.heads, args.kv_heads, args.head_dim
    q = jax.random.normal(keys[0], (b, t, n, h), dtype)
    k = jax.random.normal(keys[1], (b, t, kh, h), dtype)
    v = jax.random.normal(keys[2], (b, t, kh, h), dtype)
    g = jax.random.normal(keys[3], (b, t, n, h), jnp.float32)
    seg = jnp.asarray(packed_rows(b, t, args.segments))
    scale = 1.0 / math.sqrt(h)
    inputs = (q, k, v)
    if args.t5:  # T5: a trainable float32 bias, no 1/sqrt(H) (folded into the query's init)
        inputs, scale = (q, k, v, 0.5 * jax.random.normal(keys[3], (1, n, t, t), jnp.float32)), 1.0
        fns = bias_variants(seg, scale, blocks)
    else:
        fns = variants(seg, scale, args.max_segments or args.segments, interpret=args.smoke)
    # padding queries get no cotangent, as in a model (no loss, no other row reads them): the
    # kernels differ in what a fully masked row attends to, which then changes nothing
    g = g * (seg > 0)[:, :, None, None]
    # Reference in float32 (XLA), the error of every row against it, on real (non-pad) queries only.
    reference = "xla_bias" if args.t5 else "xla_mask"
    _, _, ref, ref_grads = measure(fns[reference], tuple(x.astype(jnp.float32) for x in inputs), g, 0)
    real = np.asarray(seg > 0)[:, :, None, None]
    lengths = np.stack([(np.asarray(seg) == i).sum(1) for i in range(1, args.segments + 1)])
    pairs = float((lengths * lengths if args.t5 else lengths * (lengths + 1) / 2).sum())  # T5: not causal
    device = jax.devices()[0]
    results = []
    for name in names:
        row = {"variant": name, "batch": b, "length": t, "heads": n, "kv_heads": kh, "head_dim": h,
               "segments": args.segments, "dtype": jnp.dtype(dtype).name, "device": device.device_kind,
               "jax": jax.__version__}
        try:
            first, median, out, grads = measure(fns[name], inputs, g, args.repeats)
        except Exception as e:  # a kernel this jax / GPU does not take: a row that says so
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            results.append(row)
            print(json.dumps(row), flush=True)
            continue
        out_err = np.abs(np.asarray(out, np.float32) - np.asarray(ref)) * real
        grad_err = max(float(np.abs(np.asarray(a, np.float32) - np.asarray(r)).max())
                       for a, r in zip(grads, ref_grads))
        # FLOPs actually needed: 4 H N per (query, key) pair of one document with key <= query
        # (QK^T and PV, 2 FLOPs a multiply-add), forward; x3.5 with the backward pass.
        flops = 3.5 * 4 * n * h * pairs
        row.update(compile_s=round(first - median, 3), ms=round(1000 * median, 3),
                   tflops=round(flops / median / 1e12, 2), max_out_err=float(out_err.max()), max_grad_err=grad_err)
        if args.t5:  # the bias's gradient, relative to its largest entry
            row["bias_grad_rel_err"] = float(np.abs(np.asarray(grads[3]) - np.asarray(ref_grads[3])).max()
                                             / np.abs(np.asarray(ref_grads[3])).max())
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| variant | ms fwd+bwd | TFLOP/s (needed FLOPs) | max out err | max grad err |  ({device.device_kind}, "
          f"{b}x{t}, {n}/{kh} heads x {h}, {args.segments} docs/row)")
    print("|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | error: {r['error'][:80]} | | | |")
        else:
            print(f"| {r['variant']} | {r['ms']:.2f} | {r['tflops']:.1f} | {r['max_out_err']:.2e} | "
                  f"{r['max_grad_err']:.2e} |")
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
