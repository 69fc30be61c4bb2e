"""``t5x-lite`` command line (also ``python -m t5x_lite``).

Every command turns configuration and data problems into one ``error: ...`` line on stderr
and exit code 2, before any work is done.
"""

from __future__ import annotations

import argparse
import os
import sys

COMPILING = {"train", "eval", "decode", "serve", "sweep", "plan"}  # commands that compile XLA programs


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML experiment file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=100 (repeatable)")


# ------------------------------------------------------------------------ commands


def enable_compilation_cache() -> None:
    """XLA's persistent compilation cache, so that a rerun, a resume or a sweep of the same
    shapes loads its compiled steps instead of compiling them again (on a GPU, tens of seconds
    of the first step). ``T5X_LITE_COMPILE_CACHE``: a directory, or ``off``; default
    ``~/.cache/t5x_lite/xla``. A cache dir set through JAX's own option is left as it is."""
    where = os.environ.get("T5X_LITE_COMPILE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "t5x_lite", "xla"))
    if where.strip().lower() in ("", "off", "0", "none", "false"):
        return
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", where)


def cmd_train(args) -> int:
    from t5x_lite.config import load_config
    from t5x_lite.trainer import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, args.workdir)
    return 0


def cmd_plot(args) -> int:
    from t5x_lite.metrics import plot_metrics

    print(plot_metrics(args.workdir, args.output))
    return 0


def _delegate(module: str, function: str):
    """A command implemented in ``module.function(args) -> exit code`` (imported lazily)."""

    def run(args) -> int:
        import importlib

        return getattr(importlib.import_module(module), function)(args)

    return run


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t5x-lite",
        description="Train, evaluate and serve encoder, decoder and encoder-decoder transformers, "
                    "sharded with ZeRO/FSDP over one JAX mesh.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (resumes when the work dir has a checkpoint)")
    _add_config_args(p)
    p.add_argument("--workdir", required=True, help="where config, tokenizer, checkpoints and metrics live")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("prepare", help="tokenize a corpus once into memory-mapped shards (train with data.path=DIR)")
    p.add_argument("--input", action="append", required=True, metavar="GLOB",
                   help="text / JSON-lines files, gzip'd or not: a file, a directory or a glob (repeatable)")
    p.add_argument("--output", required=True, metavar="DIR", help="the prepared directory (new, or one to resume)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="MODEL", help="sentencepiece .model to use (default: train one)")
    tok.add_argument("--vocab-size", type=int, metavar="N", help="pieces of the trained tokenizer (default 32000)")
    p.add_argument("--num-sentinels", type=int, default=100, help="<extra_id_N> pieces of a trained tokenizer")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: the CPU count)")
    p.add_argument("--field", default="text", help="JSON-lines field holding the text (default: text)")
    p.add_argument("--pairs", action="store_true",
                   help="JSON lines of (input, target) pairs or conversations, for data.objective=supervised")
    p.add_argument("--input-field", default="input", help="--pairs: the input's field (default: input)")
    p.add_argument("--target-field", default="target", help="--pairs: the target's field (default: target)")
    p.add_argument("--messages-field", default="messages", help="--pairs: a conversation's field (default: messages)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="--pairs: the chat template conversations are rendered by (import-hf's chat_template.json)")
    p.add_argument("--chat-turns", default="all", choices=("all", "last"),
                   help="--pairs: a pair per assistant turn (all) or the final one (last)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="replace a directory prepared from other inputs")
    p.set_defaults(fn=_delegate("t5x_lite.data.prepare", "run_prepare_cli"))

    p = sub.add_parser("plot", help="PNG of loss, eval loss, learning rate and tokens/s against step")
    p.add_argument("--workdir", required=True)
    p.add_argument("--output", default=None, help="PNG path (default: WORKDIR/metrics.png)")
    p.set_defaults(fn=cmd_plot)

    p = sub.add_parser("plan", help="memory by ZeRO stage, compute budget and the compiled step, before training")
    _add_config_args(p)
    p.add_argument("--gpus", type=int, default=None, help="devices to plan for (default: the local devices)")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one device in GB (1e9 bytes)")
    p.add_argument("--memory-fraction", type=float, default=0.75,
                   help="share of it JAX may use (its default preallocation; XLA_PYTHON_CLIENT_MEM_FRACTION)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak TFLOP/s of one device (H100 bf16: 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization for the wall-clock estimate")
    p.add_argument("--tokens", type=float, default=None, help="training tokens (default: 20 per parameter)")
    p.add_argument("--precision", choices=["config", "mixed"], default="config",
                   help="state bytes of this trainer's config, or the ZeRO paper's mixed-precision Adam (2+2+12)")
    p.add_argument("--no-compile", action="store_true", help="formulas only: skip compiling on the local devices")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=_delegate("t5x_lite.planning", "run_plan_cli"))

    p = sub.add_parser("bench", help="time the compiled train step of a config (and variants) on this machine")
    _add_config_args(p)
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="another row with these overrides, e.g. remat_full:model.remat=full (repeatable)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps, the first one compiles")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="one device's dense peak for MFU (default: known GPUs, e.g. H100 989)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="trace 2 more steps per variant into DIR/<variant> and print where their time goes")
    p.set_defaults(fn=_delegate("t5x_lite.benchmark", "run_bench_cli"))

    p = sub.add_parser("sweep", help="train a ladder of d_model sizes on compute-matched budgets, fit L(C)")
    _add_config_args(p)
    p.add_argument("--sizes", required=True, help="comma-separated d_model values, e.g. 32,48,64,96")
    p.add_argument("--tokens-per-param", type=float, default=None, help="training tokens per parameter (default 20)")
    p.add_argument("--workdir", default=None, help="default: runs/sweep_<config name>")
    p.add_argument("--predict", type=int, default=None, help="size whose loss to predict (default: the next one up)")
    p.add_argument("--seeds", type=int, default=1,
                   help="runs per size (seeds train.seed, train.seed+1, ...); the fit uses each size's mean")
    p.add_argument("--budgets", default=None,
                   help="isoFLOP profiles instead: comma-separated FLOP budgets (e.g. 1e11,3e11,1e12), every size "
                        "trained on each; fits N_opt(C) from the profiles' minima")
    p.set_defaults(fn=_delegate("t5x_lite.sweep", "run_sweep_cli"))

    p = sub.add_parser("eval", help="evaluate the latest checkpoint of a work dir on held-out data")
    p.add_argument("--workdir", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="data.*, train.eval_batches, train.batch_size, mesh.*, sharding.* (repeatable); "
                        "another data.path is evaluated whole")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.set_defaults(fn=_delegate("t5x_lite.trainer", "run_eval_cli"))

    p = sub.add_parser("decode", help="generate from the latest checkpoint (or an exported model)")
    p.add_argument("--workdir", required=True, help="training work dir or `t5x-lite export` output")
    p.add_argument("--prompt", action="append", help="repeatable (or --input)")
    p.add_argument("--input", help="prompts from JSON lines (their --field), decoded --batch-size at a time")
    p.add_argument("--field", default="input", help="the prompt field of --input's records (default: input)")
    p.add_argument("--output", help="write JSON lines: each --input record with its 'output' (default: print)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts decoded at once (default 32)")
    p.add_argument("--chat", action="store_true",
                   help="each prompt is a user turn (an --input record's 'messages', the conversation so far), "
                        "rendered by the work dir's chat template (data.chat_template)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample from the K best tokens (0 = off); encoder family: candidates per <mask> (default 5)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1] (1 = off)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with B beams when > 1 (deterministic)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = log p / length ** L (0 = plain log-probability)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.set_defaults(fn=_delegate("t5x_lite.decoding", "run_decode_cli"))

    p = sub.add_parser("serve", help="serve the latest checkpoint (or an export) over HTTP, OpenAI-style JSON API")
    p.add_argument("--workdir", required=True, help="training work dir or `t5x-lite export` output")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one, logged)")
    p.add_argument("--name", default=None, help="the model's id in responses (default: the work dir's name)")
    p.add_argument("--max-batch-size", type=int, default=32, help="rows decoded at once, across requests (default 32)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a request waits for others to share its batch (default 5)")
    p.add_argument("--stream-tokens", type=int, default=8,
                   help="tokens the device makes between two events of a streamed answer (default 8)")
    p.add_argument("--quiet", action="store_true", help="no line per HTTP request (batches are still logged)")
    p.set_defaults(fn=_delegate("t5x_lite.serve", "run_serve_cli"))

    p = sub.add_parser("export", help="write params only (for serving or fine-tuning elsewhere)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: the params' dtype")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.set_defaults(fn=_delegate("t5x_lite.checkpoints", "run_export_cli"))

    p = sub.add_parser("import-hf", help="import a Hugging Face model directory into a new work dir (step 0)")
    p.add_argument("path", help="directory with config.json + safetensors (BERT/RoBERTa, GPT-2, LLaMA/Mistral, T5)")
    p.add_argument("--workdir", required=True, help="new work dir: config.yaml, tokenizer, step-0 checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the imported config, e.g. --set data.path=my.jsonl (repeatable)")
    p.set_defaults(fn=_delegate("t5x_lite.interop.hf", "run_import_cli"))

    p = sub.add_parser("export-hf", help="write the latest checkpoint (or --step) as a Hugging Face model directory")
    p.add_argument("--workdir", required=True)
    p.add_argument("--output", required=True, help="new directory: config.json + model.safetensors + tokenizer")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.set_defaults(fn=_delegate("t5x_lite.interop.hf", "run_export_cli"))
    return parser


def main(argv=None) -> int:
    from t5x_lite.config import ConfigError

    try:
        from t5x_lite.data import DataError
    except ImportError:  # pragma: no cover - data package always present in a real install
        DataError = ConfigError

    args = build_parser().parse_args(argv)
    try:
        from t5x_lite.distributed import initialize

        initialize()  # multi-process runs: join jax.distributed before any device is touched
        if args.command in COMPILING:
            enable_compilation_cache()
        return args.fn(args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
