"""Training throughput: t5x_lite against Hugging Face transformers, side by side, one GPU.

For each workload the same architecture is built twice — our config from ``configs/`` and the
matching ``transformers`` model (LlamaForCausalLM, T5ForConditionalGeneration,
BertForMaskedLM; MixtralForCausalLM for ``--workloads moe``) with random weights — and trained on random tokens: warm-up steps, then timed
steps. Each measurement runs in its own subprocess so that JAX and PyTorch never share a GPU's
memory and peak memory is each one's own.

Both sides: bf16 compute, fp32 master weights and AdamW state (HF: ``torch.autocast`` bf16 with
fused AdamW; ours: ``model.dtype=bfloat16``, ``param_dtype=float32``, optax's AdamW, also for
t5_base, whose config trains with Adafactor: ``SAME_WORK``). Counting is identical:

    tokens/step = batch x (input length [+ target length for T5])
    FLOPs/step  = t5x_lite.metrics.train_flops_per_step(cfg)   (6 x matmul weights per token,
                  the output layer included, + 12 x keys seen x heads x head_dim per token and
                  layer; causal stacks see half their keys; experts: the k a token visits and
                  the router) -- the count the training log uses
    MFU         = FLOPs/step / step time / peak (989 TFLOP/s dense bf16 on H100/H200)

Usage::

    python bench/train_vs_hf.py                       # llama_1b, t5_base, bert_base on the GPU
    python bench/train_vs_hf.py --workloads llama --steps 20 --json out.json
    python bench/train_vs_hf.py --smoke               # tiny sizes on CPU (CI keeps this working)
    python bench/train_vs_hf.py --workloads llama --variant remat_full:model.remat=full \
        --variant b16:train.batch_size=16,train.micro_batches=2   # more rows of ours, same run

A ``--variant NAME:key=value,...`` adds a row ``ours:NAME`` measured with those overrides of
our config only (HF keeps the base config), so every variant sits beside the same HF baselines.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = {"llama": "configs/llama_1b.yaml", "t5": "configs/t5_base.yaml", "bert": "configs/bert_base.yaml",
             "moe": "configs/moe_1b.yaml"}
# The update both sides run: HF's rows use torch's fused AdamW, so a config that trains with
# another optimizer (t5_base: Adafactor, T5's own) runs AdamW here too (`--variant
# adafactor:optim.name=adafactor` times the shipped one beside it; H100 compiled offline, 2026-12-05:
# Adafactor 0.7 ms a step slower on t5_base). Session 8's t5 rows (1.42x) ran Adafactor.
SAME_WORK = {"t5": ["optim.name=adamw"]}
SMOKE = ["model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.d_ff=128", "model.vocab_size=512",
         "model.max_length=64", "data.seq_len=64", "train.batch_size=4", "model.dtype=float32"]
SMOKE_EXTRA = {"llama": ["model.num_kv_heads=2"], "t5": ["model.num_decoder_layers=2", "model.head_dim=16"],
               "bert": ["model.dropout=0.0"], "moe": ["model.num_kv_heads=2", "model.num_experts=4",
                                                      "model.expert_d_ff=64", "model.expert_group_size=32"]}


# ------------------------------------------------------------------------- shared


def load_cfg(workload: str, smoke: bool, overrides: list[str]):
    from t5x_lite.config import load_config

    extra = SAME_WORK.get(workload, []) + ((SMOKE + SMOKE_EXTRA[workload]) if smoke else [])
    return load_config(os.path.join(ROOT, WORKLOADS[workload]), extra + overrides)


def peak_tflops(device_name: str, given: float | None) -> float | None:
    from t5x_lite.metrics import peak_flops

    peak = peak_flops(device_name, given)
    return peak / 1e12 if peak else None


# --------------------------------------------------------------------------- ours


# ----------------------------------------------------------------------------- HF


def hf_model(cfg):
    """The transformers model with our config's architecture (random weights)."""
    import transformers as tf

    m = cfg.model
    if m.family == "decoder" and m.num_experts:  # Mixtral: the same attention, experts in every layer
        conf = tf.MixtralConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.expert_width,
                                num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                                num_key_value_heads=m.kv_heads, max_position_embeddings=m.max_length,
                                rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
                                num_local_experts=m.num_experts, num_experts_per_tok=m.experts_per_token,
                                output_router_logits=bool(m.router_aux_loss), router_aux_loss_coef=m.router_aux_loss)
        return tf.MixtralForCausalLM(conf)
    if m.family == "decoder":
        conf = tf.LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
                              num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                              num_key_value_heads=m.kv_heads, max_position_embeddings=m.max_length,
                              rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings)
        return tf.LlamaForCausalLM(conf)
    if m.family == "encoder_decoder":
        conf = tf.T5Config(vocab_size=m.vocab_size, d_model=m.d_model, d_kv=m.dim_per_head, d_ff=m.d_ff,
                           num_layers=m.num_layers, num_decoder_layers=m.decoder_layers, num_heads=m.num_heads,
                           relative_attention_num_buckets=m.relative_buckets,
                           relative_attention_max_distance=m.relative_max_distance, dropout_rate=m.dropout,
                           layer_norm_epsilon=m.norm_eps, feed_forward_proj="gated-gelu",
                           tie_word_embeddings=m.tie_embeddings, decoder_start_token_id=0)
        return tf.T5ForConditionalGeneration(conf)
    conf = tf.BertConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.num_layers,
                         num_attention_heads=m.num_heads, intermediate_size=m.d_ff,
                         max_position_embeddings=m.max_length, hidden_dropout_prob=m.dropout,
                         attention_probs_dropout_prob=m.dropout, layer_norm_eps=m.norm_eps,
                         hidden_act="gelu" if not m.gelu_approximate else "gelu_new")
    return tf.BertForMaskedLM(conf)


def hf_inputs(cfg, device) -> dict:
    import torch

    from t5x_lite.benchmark import random_batch

    b = {k: torch.as_tensor(v, device=device) for k, v in random_batch(cfg).items()}  # the tokens ours gets
    if cfg.model.family == "decoder":
        return {"input_ids": b["targets"].long(), "labels": b["targets"].long()}
    if cfg.model.family == "encoder_decoder":
        return {"input_ids": b["encoder_input_ids"].long(), "labels": b["targets"].long()}
    labels = torch.where(b["weights"] > 0, b["targets"].long(), torch.full_like(b["targets"].long(), -100))
    return {"input_ids": b["input_ids"].long(), "labels": labels}


def run_hf(cfg, steps: int, warmup: int, compile_model: bool) -> dict:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    t0 = time.perf_counter()
    model = hf_model(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(cfg.optim.b1, cfg.optim.b2),
                            weight_decay=cfg.optim.weight_decay, fused=cuda)
    fwd = torch.compile(model) if compile_model else model
    inputs = hf_inputs(cfg, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.model.dtype == "bfloat16")

    def step():
        with autocast:
            loss = fwd(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    loss = step()
    sync()
    first_step_s = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss = float(loss.detach())
    sync()
    elapsed = time.perf_counter() - t1
    return {"step_s": elapsed / steps, "first_step_s": first_step_s, "loss": loss,
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__}


# ------------------------------------------------------------------------- driver


def child(args) -> None:
    """One measurement; prints one JSON line."""
    cfg = load_cfg(args.workload, args.smoke, args.set)
    if args.impl.startswith("ours"):
        from t5x_lite.benchmark import measure_train

        result = measure_train(cfg, args.steps, args.warmup)
    else:
        result = run_hf(cfg, args.steps, args.warmup, compile_model=args.impl == "hf_compile")
    from t5x_lite.metrics import tokens_per_step, train_flops_per_step

    result.update(workload=args.workload, impl=args.impl, tokens_per_step=tokens_per_step(cfg),
                  flops_per_step=train_flops_per_step(cfg))
    print("RESULT " + json.dumps(result), flush=True)


def split_env(overrides) -> tuple[dict, list[str]]:
    """A variant's ``NAME=value`` items with an upper-case NAME are environment variables of its
    process (``XLA_FLAGS`` is added to the inherited flags); the rest are config overrides."""
    env, config = {}, []
    for item in overrides:
        name, _, value = item.partition("=")
        if name.isupper():
            env[name] = (os.environ.get(name, "") + " " + value).strip() if name == "XLA_FLAGS" else value
        else:
            config.append(item)
    return env, config


def measure(workload: str, impl: str, args, extra: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--workload", workload, "--impl", impl,
           "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--smoke"] if args.smoke else [])
    variant_env, extra = split_env(extra)
    for s in list(args.set) + list(extra):
        cmd += ["--set", s]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONPATH=ROOT, **variant_env)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {"workload": workload, "impl": impl, "error": tail}
    return json.loads(lines[-1][len("RESULT "):])


def machine_info() -> dict:
    """GPU, driver and library versions of this machine (what the figures need next to them)."""
    info = {"python": sys.version.split()[0]}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        if out:
            info["gpu"] = out.splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib import metadata

    for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return info


def table(results: list[dict], peak: float | None) -> str:
    head = "| workload | impl | tokens/s | step ms | MFU | peak mem GiB | first step s | vs HF eager | vs HF compiled |"
    rows = [head, "|" + "---|" * 9]
    by = {(r["workload"], r["impl"]): r for r in results}
    for r in results:
        if "error" in r:
            rows.append(f"| {r['workload']} | {r['impl']} | error | | | | | | |")
            continue
        tps = r["tokens_per_step"] / r["step_s"]
        mfu = f"{100 * r['flops_per_step'] / r['step_s'] / (peak * 1e12):.1f}%" if peak else "n/a"
        mem = f"{r['peak_bytes'] / 2**30:.1f}" if r.get("peak_bytes") else "n/a"

        def ratio(other):
            o = by.get((r["workload"], other))
            return f"{o['step_s'] / r['step_s']:.2f}x" if o and "error" not in o else "-"

        impl = r["impl"] + (f" (attention fell back to {r['attention']})" if r.get("attention_fallback") else "")
        rows.append(f"| {r['workload']} | {impl} | {tps:,.0f} | {1000 * r['step_s']:.1f} | {mfu} | {mem} | "
                    f"{r['first_step_s']:.1f} | {ratio('hf')} | {ratio('hf_compile')} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="llama,t5,bert")
    p.add_argument("--impls", default="ours,hf,hf_compile")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, float32, CPU-friendly")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--set", action="append", default=[], help="override our config (applies to HF too)")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME:key=value,... another row of ours with these overrides (HF unchanged); "
                        "an upper-case key is an environment variable of that run, e.g. "
                        "nogemm:XLA_FLAGS=--xla_gpu_enable_triton_gemm=false")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--jobs", type=int, default=1,
                   help="measurements run at once (only for --smoke on CPU: timings on a GPU need it alone)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    from t5x_lite.config import ConfigError, parse_variant

    try:
        variants = [parse_variant(v) for v in args.variant]
    except ConfigError as e:
        raise SystemExit(f"--variant: {e}") from None
    impls = [(i, ()) for i in args.impls.split(",")] + [(f"ours:{name}", tuple(o)) for name, o in variants]
    if args.smoke:
        impls = [(i, o) for i, o in impls if i != "hf_compile"]  # torch.compile on CPU takes minutes
    if args.jobs > 1 and not args.smoke:
        raise SystemExit("--jobs > 1 only with --smoke: measurements that share the machine time each other")
    runs = [(workload, impl, extra) for workload in args.workloads.split(",") for impl, extra in impls]

    done: list[dict] = []
    machine = machine_info() if args.json else {}

    def save(results: list[dict]) -> float | None:
        device = next((r.get("device") for r in results if r.get("device") and r["impl"].startswith("ours")), "cpu")
        peak = peak_tflops(device or "", args.peak_tflops)
        if args.json:  # after every row too: a run cut short (a device call's time limit) keeps what it measured
            from t5x_lite.data.shards import write_json

            write_json(args.json, {"date": time.strftime("%Y-%m-%d"), "peak_tflops": peak, "machine": machine,
                                   "results": results})
        return peak

    def run(item):
        workload, impl, extra = item
        r = measure(workload, impl, args, extra)
        if extra:
            r["overrides"] = list(extra)
        if impl.startswith("ours") and SAME_WORK.get(workload):  # what ours changed to do HF's work
            r["same_work"] = list(SAME_WORK[workload])
        if args.set:  # every row's --set (HF's too): a row without it ran the shipped config
            r["set"] = list(args.set)
        print(f"{workload:6s} {impl:16s} " + (f"{1000 * r['step_s']:.1f} ms/step" if "error" not in r
                                               else "ERROR\n" + r["error"]), flush=True)
        done.append(r)
        save(done)
        return r

    with concurrent.futures.ThreadPoolExecutor(max(args.jobs, 1)) as pool:  # each run is a subprocess
        results = list(pool.map(run, runs))
    peak = save(results)  # in the order asked for
    print()
    print(table(results, peak))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
