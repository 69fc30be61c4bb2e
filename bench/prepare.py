"""Benchmark of the data pipeline on a real corpus: the running Python's standard-library sources.

    python bench/prepare.py [--workers 2] [--vocab-size 8192] [--out /tmp/t5x_lite_bench_prepare]

Reports, on this machine:
1. ``t5x-lite prepare`` tokenization throughput (input MB/s) with 1 and with ``--workers``
   processes (the tokenizer is trained once beforehand and given with ``--tokenizer``), and per
   CPU-second in one process (what a busy machine does not distort);
2. packing efficiency (non-pad share of row positions) per objective and row length, on the
   stdlib sources (long documents) and on the default corpus, the stdlib docstrings (short ones);
3. steady-state batch time of each objective at ``configs/decoder_tiny.yaml``'s shape, against
   the compiled train step of that tiny model (the loader must stay under 5% of it);
4. the row index at scale: a synthetic 1B-token corpus (a sparse memory-mapped file, 2M documents)
   — time to index once, then the time of a batch at a far step (it reads only its rows).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import sysconfig
import time

import numpy as np

from t5x_lite.config import load_config
from t5x_lite.data import Batches, TokenStore, Tokenizer, make_datasets
from t5x_lite.data.corpus import stdlib_docstrings
from t5x_lite.data.prepare import prepare

TINY = "configs/decoder_tiny.yaml"


def stdlib_inputs() -> list[str]:
    """Globs covering every ``.py`` file of the standard library except installed packages."""
    root = sysconfig.get_paths()["stdlib"]
    dirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and d != "site-packages")
    globs = [os.path.join(root, "*.py")] + [os.path.join(root, d, "**", "*.py") for d in dirs]
    return [g for g in globs if glob.glob(g, recursive=True)]


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def bench_tokenize(out: str, inputs: list[str], tokenizer: str, workers_list: list[int]) -> None:
    for workers in workers_list:
        target = os.path.join(out, f"prepared_w{workers}")
        shutil.rmtree(target, ignore_errors=True)
        cpu0 = time.process_time()
        manifest, seconds = timed(prepare, inputs, target, tokenizer=tokenizer, workers=workers, progress=False,
                                  log=lambda _: None)
        megabytes = manifest["bytes"] / 1e6
        cpu = f"; {megabytes / (time.process_time() - cpu0):.2f} MB per CPU-second" if workers == 1 else ""
        print(f"  {workers} worker(s): {megabytes:.1f} MB, {manifest['documents']} docs, "
              f"{manifest['tokens'] / 1e6:.2f}M tokens in {seconds:.1f}s = {megabytes / seconds:.2f} MB/s, "
              f"{manifest['tokens'] / seconds / 1e3:.0f}k tokens/s{cpu}", flush=True)


def cfg_for(objective: str, seq_len: int, path, vocab: int, batch_size: int = 16):
    family = {"causal": "decoder", "prefix": "decoder", "mlm": "encoder", "span": "encoder_decoder"}[objective]
    extra = {"encoder": ["model.position=learned"], "encoder_decoder": ["model.position=relative"]}.get(family, [])
    overrides = [f"model.family={family}", f"data.objective={objective}", f"data.seq_len={seq_len}",
                 f"model.vocab_size={vocab}", f"train.batch_size={batch_size}", f"model.max_length={max(seq_len, 512)}",
                 "data.num_sentinels=100"] + extra + ([f"data.path={path}"] if path else [])
    return load_config(TINY, overrides)


def bench_packing(prepared: str, workdir: str, vocab: int) -> None:
    print("\npacking efficiency (non-pad share of row positions; span: of encoder positions)")
    print("| corpus | objective | seq_len 128 | 512 | 1024 |\n|---|---|---|---|---|")
    for name, path in (("stdlib sources (prepared)", prepared), ("stdlib docstrings (default)", None)):
        for objective in ("causal", "span"):
            cells = []
            for seq_len in (128, 512, 1024):
                cfg = cfg_for(objective, seq_len, path, vocab)
                _, train, _ = make_datasets(cfg, workdir, log=lambda _: None)
                cells.append(f"{train.packing_efficiency:.1%}")
            print(f"| {name} | {objective} | " + " | ".join(cells) + " |", flush=True)


def bench_batch_time(prepared: str, workdir: str, vocab: int) -> tuple[dict, Batches]:
    """Seconds per batch of each objective; and the causal batch source."""
    print("\nsteady-state batch time at decoder_tiny's shape (batch 16, seq_len 128), 200 steps")
    out, sources = {}, {}
    for objective in ("causal", "prefix", "mlm", "span"):
        _, train, _ = make_datasets(cfg_for(objective, 128, prepared, vocab), workdir, log=lambda _: None)
        train.batches(0)
        _, seconds = timed(lambda: [train.batches(s) for s in range(1000, 1200)])
        out[objective], sources[objective] = seconds / 200, train
        print(f"  {objective}: {1e3 * out[objective]:.2f} ms/batch", flush=True)
    return out, sources["causal"]


def bench_step_time(train: Batches) -> float:
    """Median seconds of decoder_tiny's compiled train step (on this machine's default devices),
    fed ``train``'s causal batches with ids folded into its 2048-piece vocab (values do not
    change the timing)."""
    import jax

    from t5x_lite import partitioning, trainer

    cfg = load_config(TINY)
    setup = trainer.make_setup(cfg, partitioning.make_mesh(cfg))
    compiled = trainer.compile_train_step(setup)
    with setup.activation_context():
        state = setup.init(jax.random.key(0))
        times = []
        for step in range(8):
            batch = train.batches(step)
            for key in ("input_ids", "targets"):
                batch[key] = batch[key] % cfg.model.vocab_size
            batch = trainer.to_global(batch, setup.batch_sharding)
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    return float(np.median(times[2:]))


def bench_scale(workdir: str, tokenizer: Tokenizer) -> None:
    """A 1B-token corpus of 2M documents (lognormal lengths, mean ~500): a sparse file of zeros."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(300), 1.0, 2_000_000), 2, 50_000).astype(np.int64)
    lengths = (lengths * (1e9 / lengths.sum())).astype(np.int64) + 1
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    path = os.path.join(workdir, "sparse_tokens.bin")
    with open(path, "wb") as f:
        f.truncate(int(offsets[-1]) * 2)
    store = TokenStore([(np.memmap(path, np.uint16, "r", shape=(int(offsets[-1]),)), offsets)], tokenizer.eos_id)
    print(f"\nrow index at scale: {store.num_documents / 1e6:.0f}M documents, {store.num_tokens / 1e9:.2f}B tokens "
          "(sparse memory-mapped file)")
    for seq_len, batch_size in ((128, 256), (2048, 64)):
        cfg = cfg_for("causal", seq_len, None, tokenizer.vocab_size, batch_size)
        train, seconds = timed(Batches, cfg, store, tokenizer)
        train.batches(10**9)
        _, batch_seconds = timed(lambda: [train.batches(10**9 + s) for s in range(20)])
        print(f"  seq_len {seq_len}: {train.rows_per_epoch / 1e6:.2f}M rows indexed in {seconds:.1f}s "
              f"({train.rows_per_epoch * 8 / 2**20:.0f} MiB of row starts), packing {train.packing_efficiency:.1%}; "
              f"batch of {batch_size} at step 1e9: {1e3 * batch_seconds / 20:.1f} ms", flush=True)
    os.remove(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--out", default="/tmp/t5x_lite_bench_prepare")
    parser.add_argument("--skip-step", action="store_true", help="do not compile/time the tiny model's step")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    inputs = stdlib_inputs()
    print(f"corpus: stdlib sources of Python {sys.version.split()[0]} ({len(inputs)} globs); "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    tok_path = os.path.join(args.out, "tokenizer.model")
    if not os.path.exists(tok_path):
        _, seconds = timed(Tokenizer.train, stdlib_docstrings(), tok_path, args.vocab_size, 100)
        print(f"trained a {args.vocab_size}-piece tokenizer on the stdlib docstrings in {seconds:.1f}s")
    tokenizer = Tokenizer.load(tok_path)

    print("\ntokenization (t5x-lite prepare --tokenizer, whole run incl. planning and writing)")
    bench_tokenize(args.out, inputs, tok_path, sorted({1, args.workers}))
    prepared = os.path.join(args.out, f"prepared_w{args.workers}")
    workdir = os.path.join(args.out, "workdir")
    shutil.rmtree(workdir, ignore_errors=True)
    bench_packing(prepared, workdir, args.vocab_size)
    batch_times, causal = bench_batch_time(prepared, workdir, args.vocab_size)
    if not args.skip_step:
        step = bench_step_time(causal)
        print(f"\ndecoder_tiny train step: {1e3 * step:.0f} ms; batch time / step time: "
              + ", ".join(f"{k} {v / step:.1%}" for k, v in batch_times.items()))
    bench_scale(args.out, tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
