"""``t5x-lite`` command line (also ``python -m t5x_lite``).

Every command turns configuration and data problems into one ``error: ...`` line on stderr
and exit code 2, before any work is done.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML experiment file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=100 (repeatable)")


# ------------------------------------------------------------------------ commands


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


def cmd_plan(args) -> int:
    from t5x_lite.config import load_config
    from t5x_lite.planning import compiled_plan, format_plan

    cfg = load_config(args.config, args.overrides)
    plan = compiled_plan(cfg)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
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

    p = sub.add_parser("plot", help="PNG of loss, eval loss, learning rate and tokens/s against step")
    p.add_argument("--workdir", required=True)
    p.add_argument("--output", default=None, help="PNG path (default: WORKDIR/metrics.png)")
    p.set_defaults(fn=cmd_plot)

    p = sub.add_parser("plan", help="compile the train step ahead of time and report per-device memory")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("eval", help="evaluate the latest checkpoint of a work dir on held-out data")
    p.add_argument("--workdir", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=_delegate("t5x_lite.trainer", "run_eval_cli"))

    p = sub.add_parser("decode", help="generate from the latest checkpoint (or an exported model)")
    p.add_argument("--workdir", required=True, help="training work dir or `t5x-lite export` output")
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_delegate("t5x_lite.decoding", "run_decode_cli"))

    p = sub.add_parser("export", help="write params only (for serving or fine-tuning elsewhere)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.set_defaults(fn=_delegate("t5x_lite.checkpoints", "run_export_cli"))
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
        return args.fn(args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
