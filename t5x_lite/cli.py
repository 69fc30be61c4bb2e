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


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t5x-lite", description=__doc__.splitlines()[0])
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
    return parser


def main(argv=None) -> int:
    from t5x_lite.config import ConfigError

    try:
        from t5x_lite.data import DataError
    except ImportError:  # pragma: no cover - data package always present in a real install
        DataError = ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
