"""Host time of the input pipeline: how long the host takes to make one training batch of each
GPU config (packing, the objective, the step's rows read from the token store), beside the step
time that issue 8's GPU targets leave, so one sees whether the host keeps up with the device.

    python bench/pipeline.py                                   # llama_1b, t5_base, bert_base
    python bench/pipeline.py --configs bert_base --set data.path=corpus/ --batches 50
    python bench/pipeline.py --workers 0,2,4                   # also through data.workers processes
    python bench/pipeline.py --smoke                           # the tiny configs, few batches

The training loop makes step n+1's batch while the device runs step n, so the host is free as
long as ``batch_ms`` stays below the step time; past it the device waits (the training log's
``data_time`` says the same of a real run). With ``--workers``, each count > 0 is one more row:
batches taken in order from that many worker processes (``data.workers``), steady state, the
time between batches as the loop sees it. The default corpus (the stdlib docstrings) is too
small for 32k-piece tokenizers: ``model.vocab_size`` defaults to 8000 here, which changes the
documents' lengths in tokens a little and nothing else of the work. Tokenizers and token caches
are kept under ``--workdir`` between runs. No GPU needed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import numpy as np

from t5x_lite.config import load_config
from t5x_lite.data import make_datasets
from t5x_lite.data.prefetch import Prefetcher
from t5x_lite.data.shards import write_json
from t5x_lite.metrics import tokens_per_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Issue 8's targets, tokens/s on one H100: 1.35x HF compiled (llama), 2x HF compiled (t5), 1.5x HF eager (bert).
TARGET_TOKENS_PER_S = {"llama_1b": 1.35 * 74.5e3, "t5_base": 2 * 261e3, "bert_base": 1.5 * 311e3}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="llama_1b,t5_base,bert_base", help="names under configs/, or paths")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batches", type=int, default=20, help="timed batches per config (after one untimed)")
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "pipeline_bench"))
    p.add_argument("--workers", default="0", help="comma-separated data.workers counts, one row each")
    p.add_argument("--smoke", action="store_true", help="the tiny configs, 3 batches")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def config_path(name: str) -> str:
    return name if os.path.exists(name) else os.path.join(ROOT, "configs", f"{name}.yaml")


def measure(name: str, overrides: list[str], batches: int, workdir: str, workers: int = 0) -> dict:
    cfg = load_config(config_path(name), overrides)
    t0 = time.perf_counter()
    _, train, _ = make_datasets(cfg, os.path.join(workdir, os.path.basename(name).removesuffix(".yaml")),
                                log=lambda line: None)
    setup_s = time.perf_counter() - t0
    source = Prefetcher(train, workers) if workers else contextlib.nullcontext(train)
    with source as source:
        for step in range(1 + 2 * workers):  # workers started, their queue full
            source(step)
        times = []
        for step in range(1 + 2 * workers, 1 + 2 * workers + batches):
            t = time.perf_counter()
            source(step)
            times.append(time.perf_counter() - t)
    tokens = tokens_per_step(cfg)
    ms = 1000 * statistics.median(times)
    row = {"config": name, "workers": workers, "objective": cfg.objective, "batch": cfg.train.batch_size, "tokens_per_batch": tokens,
           "batch_ms": round(ms, 2), "batch_ms_max": round(1000 * max(times), 2),
           "host_tokens_per_s": round(tokens / (ms / 1000)), "packing": round(train.packing_efficiency, 4),
           "setup_s": round(setup_s, 1)}
    target = TARGET_TOKENS_PER_S.get(os.path.basename(name).removesuffix(".yaml"))
    if target:
        row["target_step_ms"] = round(1000 * tokens / target, 1)
        row["share_of_target_step"] = round(ms / row["target_step_ms"], 3)
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    names = args.configs.split(",")
    overrides = list(args.overrides)
    batches = args.batches
    if args.smoke:
        names, batches = ["decoder_tiny", "encoder_tiny", "encoder_decoder_tiny"], 3
        overrides = ["data.max_docs=400"] + overrides
    elif not any(o.startswith("model.vocab_size=") for o in overrides):
        overrides = ["model.vocab_size=8000"] + overrides
    rows = [measure(name, overrides, batches, args.workdir, int(w)) for name in names for w in args.workers.split(",")]
    print("| config | workers | objective | batch | tokens | batch ms (median / max) | host tok/s | target step ms | share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['workers']} | {r['objective']} | {r['batch']} | {r['tokens_per_batch']:,} | "
              f"{r['batch_ms']:.1f} / {r['batch_ms_max']:.1f} | {r['host_tokens_per_s']:,} | "
              f"{r.get('target_step_ms', '-')} | {r.get('share_of_target_step', '-')} |")
    if args.json:
        write_json(args.json, {"rows": rows, "overrides": overrides, "cpus": os.cpu_count(), "numpy": np.__version__,
                               "python": sys.version.split()[0]})
    return 0


if __name__ == "__main__":  # (needed: worker processes import this file again)
    sys.exit(main())
