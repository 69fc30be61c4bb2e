"""Throughput of ``t5x-lite serve`` under concurrent clients: batching across requests against
one request at a time, side by side in one run (LLaMA-1B, bf16 weights, random init by default).

    python bench/serve.py                                  # configs/llama_1b.yaml on the GPU
    python bench/serve.py --smoke                          # configs/decoder_tiny.yaml: runs on a CPU
    python bench/serve.py --clients 32 --max-batch-sizes 1,8,32 --json runs/serve_bench.json

``--clients`` threads each send ``--requests`` greedy completions of ``--prompt-len`` random
tokens (lengths varied by up to a quarter, so batches mix lengths) for ``--new-tokens`` tokens
(no early stop) to a server on a free local port, over HTTP as any client would. For every
``--max-batch-sizes`` value a fresh server compiles every batch shape the load can make, runs
the whole load once untimed and then timed. Each row: requests/s, generated tokens/s, latency median / p90
(seconds from sending a request to its answer), batches run, and the speedup over the first
row. The model's text is not decoded (no tokenizer: prompts go as token ids, answers come back
as ids joined by spaces).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

import t5x_lite
from t5x_lite.config import ConfigError, load_config
from t5x_lite.data.shards import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class IdsTokenizer:
    """Enough of a tokenizer for token-id prompts: text is the ids joined by spaces."""

    bos_id, eos_id, pad_id, mask_id = 3, 1, 0, None

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids if int(i) != self.pad_id)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="default: configs/llama_1b.yaml (--smoke: decoder_tiny.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients")
    p.add_argument("--requests", type=int, default=4, help="requests each client sends, one after the other")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--max-batch-sizes", default=None, help="server settings to compare (default: 1,CLIENTS)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--param-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--smoke", action="store_true", help="the tiny CPU config, a light load")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p.parse_args(argv)


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as r:
        return json.loads(r.read())


def load(url: str, prompts: list, clients: int, new_tokens: int) -> tuple[float, list, int]:
    """Every client sends its prompts one after the other; returns (seconds, latencies, tokens)."""
    def client(mine):
        out = []
        for ids in mine:
            t0 = time.perf_counter()
            answer = _post(url, {"prompt": ids, "max_tokens": new_tokens, "temperature": 0})
            out.append((time.perf_counter() - t0, answer["usage"]["completion_tokens"]))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, [prompts[c::clients] for c in range(clients)]) for r in rs]
    return time.perf_counter() - t0, [lat for lat, _ in results], sum(n for _, n in results)


def main(argv=None) -> int:
    from t5x_lite.serve import Job, Server, Service

    args = parse_args(argv)
    if args.smoke:
        args.config = args.config or os.path.join(ROOT, "configs", "decoder_tiny.yaml")
        args.clients, args.requests, args.prompt_len, args.new_tokens = 4, 2, 16, 8
    sizes = [int(x) for x in (args.max_batch_sizes or f"1,{args.clients}").split(",")]
    cfg = load_config(args.config or os.path.join(ROOT, "configs", "llama_1b.yaml"),
                      [f"model.param_dtype={args.param_dtype}"] + args.overrides)
    if args.prompt_len + args.new_tokens > cfg.model.max_length or cfg.model.family == "encoder":
        raise ConfigError("needs a decoder / encoder_decoder config whose max_length holds --prompt-len + "
                          "--new-tokens")
    params = t5x_lite.init_params(cfg, seed=0)
    rng = np.random.default_rng(0)
    lengths = rng.integers(max(1, args.prompt_len * 3 // 4), args.prompt_len + 1, args.clients * args.requests)
    prompts = [[3] + rng.integers(5, cfg.model.vocab_size, n - 1).tolist() for n in lengths]
    rows, base = [], None
    for size in sizes:
        service = Service(cfg, params, IdsTokenizer(), [], name="bench", max_batch=size,
                          batch_wait=args.batch_wait_ms / 1e3, log=lambda _: None)
        server = Server(service, port=0, access_log=False)
        server.serve_in_thread()
        try:
            # compile every batch shape the load can make (rows padded to powers of two), then run it once
            for n in sorted({min(1 << k, size) for k in range(size.bit_length() + 1)}):
                for length in {int(lengths.min()), int(lengths.max())}:
                    service.engine.run([Job([prompts[0][:1] * length] * n, max_new=args.new_tokens)])
            load(server.url, prompts, args.clients, args.new_tokens)
            before = dict(service.engine.stats)
            seconds, latencies, tokens = load(server.url, prompts, args.clients, args.new_tokens)
        finally:
            server.close()
        batches = service.engine.stats["batches"] - before["batches"]
        row = {"max_batch": size, "clients": args.clients, "requests": len(prompts), "seconds": round(seconds, 3),
               "requests_per_s": round(len(prompts) / seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
               "latency_p50_s": round(statistics.median(latencies), 3),
               "latency_p90_s": round(float(np.percentile(latencies, 90)), 3), "batches": batches,
               "rows_per_batch": round(len(prompts) / batches, 2)}
        base = base or row["tokens_per_s"]
        row["speedup"] = round(row["tokens_per_s"] / base, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    device = jax.devices()[0]
    print(f"\n{device.device_kind} x{jax.device_count()}, jax {jax.__version__}: {args.clients} clients x "
          f"{args.requests} requests, prompts {lengths.min()}-{lengths.max()} tokens, {args.new_tokens} new",
          file=sys.stderr)
    print(f"{'max batch':>9} {'req/s':>8} {'tok/s':>9} {'p50 s':>7} {'p90 s':>7} {'rows/batch':>10} {'speedup':>8}",
          file=sys.stderr)
    for r in rows:
        print(f"{r['max_batch']:>9} {r['requests_per_s']:>8} {r['tokens_per_s']:>9} {r['latency_p50_s']:>7} "
              f"{r['latency_p90_s']:>7} {r['rows_per_batch']:>10} {r['speedup']:>8}", file=sys.stderr)
    if args.json:
        write_json(args.json, {"device": device.device_kind, "devices": jax.device_count(), "jax": jax.__version__,
                               "rows": rows})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
