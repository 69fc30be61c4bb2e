"""Per-device training state of ZeRO stages 0-3, measured from the shardings, next to the ZeRO paper.

For each stage the trainer's setup is built for ``--config`` (default ``configs/llama_1b.yaml``)
on ``--devices`` fake CPU devices (mesh ``data=1, fsdp=N, tensor=1``) from abstract shapes only
(``jax.eval_shape``: nothing is allocated, nothing compiled), and the bytes one device holds of
the parameters, the gradients fed to the optimizer and the optimizer state are read from their
shardings (``TrainSetup.bytes_per_device``). Next to them, the ZeRO paper's model-state
formulas (Rajbhandari et al. 2020, fig. 1) with this config's dtypes, for Ψ parameters sharded
N ways, p / g / o bytes per parameter of params / grads / Adam state:

    stage 0: (p+g+o)Ψ    stage 1: (p+g)Ψ + oΨ/N    stage 2: pΨ + (g+o)Ψ/N    stage 3: (p+g+o)Ψ/N

With fp32 params, fp32 grads and fp32 Adam m+v (p=4, g=4, o=8): 16Ψ, 8Ψ+8Ψ/N, 4Ψ+12Ψ/N, 16Ψ/N.
The paper's mixed-precision numbers (p=2, g=2, o=12: fp32 master copy + m + v) are printed for
reference: 16Ψ, 4Ψ+12Ψ/N, 2Ψ+14Ψ/N, 16Ψ/N. The script exits 1 if a measured total is more than
10% off its formula.

``--compile-seq-len L`` also compiles each stage's train step at sequence length L (ahead of
time, nothing allocated) and reports XLA's temp and argument bytes per device: minutes on CPU.

Usage::

    python bench/zero_memory.py                      # llama_1b, 8 devices: table + runs/zero_memory.json
    python bench/zero_memory.py --devices 64 --json /tmp/zero64.json
    python bench/zero_memory.py --compile-seq-len 128
    python bench/zero_memory.py --config configs/moe_1b.yaml --set sharding.expert_parallel=true

With ``sharding.expert_parallel`` the Ψe expert weights are split N ways at every stage: the
formula is the stage's on Ψ - Ψe plus (p+g+o)Ψe/N.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 0.10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "llama_1b.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices; ZeRO shards over all of them")
    p.add_argument("--json", default=os.path.join(ROOT, "runs", "zero_memory.json"), help="write the results here")
    p.add_argument("--compile-seq-len", type=int, default=0,
                   help="also AOT-compile each stage at this sequence length and report XLA's memory analysis")
    return p.parse_args(argv)


def formula_bytes(stage: int, psi: int, n: int, p: float, g: float, o: float) -> float:
    """The ZeRO paper's per-device model-state bytes for ``psi`` parameters sharded ``n`` ways."""
    return {0: (p + g + o) * psi, 1: (p + g) * psi + o * psi / n, 2: p * psi + (g + o) * psi / n,
            3: (p + g + o) * psi / n}[stage]


def formula_text(stage: int, p: float, g: float, o: float) -> str:
    def term(k):
        return f"{k:g}Ψ"

    return {0: term(p + g + o), 1: f"{term(p + g)}+{term(o)}/N", 2: f"{term(p)}+{term(g + o)}/N",
            3: f"{term(p + g + o)}/N"}[stage]


def measure(cfg_path: str, overrides: list, devices: int, compile_seq_len: int) -> dict:
    import jax
    import numpy as np

    from t5x_lite import partitioning, planning
    from t5x_lite.config import ConfigError, load_config
    from t5x_lite.trainer import compile_train_step, compiled_stats, make_setup

    rows = []
    base = load_config(cfg_path, overrides)
    if base.optim.name != "adamw":
        raise ConfigError(f"optim.name={base.optim.name}: the ZeRO formulas here are for Adam; use --set optim.name=adamw")
    p = g = np.dtype(base.model.param_dtype).itemsize  # grads take the params' dtype
    o = 2 * p  # optax Adam keeps m and v in the params' dtype
    for stage in range(4):
        sets = overrides + [f"sharding.zero_stage={stage}", "mesh.data=1", f"mesh.fsdp={devices}", "mesh.tensor=1",
                            "sharding.shard_opt_over_data=false", f"train.batch_size={devices}",
                            "train.micro_batches=1"]
        if compile_seq_len:
            sets.append(f"data.seq_len={compile_seq_len}")
        cfg = load_config(cfg_path, sets)
        setup = make_setup(cfg, partitioning.make_mesh(cfg, jax.devices()[:devices]))
        sizes = setup.bytes_per_device()
        psi = sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))
        total = sizes["params"] + sizes["grads"] + sizes["opt_state"]
        # sharding.expert_parallel: the Ψe expert weights (and their grads, Adam state) split N ways at every stage
        psi_e = planning.param_counts(cfg)["experts"] if cfg.sharding.expert_parallel else 0
        expect = formula_bytes(stage, psi - psi_e, devices, p, g, o) + (p + g + o) * psi_e / devices
        text = formula_text(stage, p, g, o) + (f" on Ψ-Ψe, +{p + g + o:g}Ψe/N" if psi_e else "")
        row = {"stage": stage, "params_bytes": sizes["params"], "grads_bytes": sizes["grads"],
               "opt_state_bytes": sizes["opt_state"], "total_bytes": total, "formula": text, "expert_params": psi_e,
               "formula_bytes": expect, "measured_over_formula": total / expect,
               "paper_mixed_precision": formula_text(stage, 2, 2, 12),
               "paper_mixed_precision_bytes": formula_bytes(stage, psi, devices, 2, 2, 12)}
        if compile_seq_len:
            stats = compiled_stats(compile_train_step(setup))
            row.update(compiled_temp_bytes=stats.get("temp_bytes"), compiled_argument_bytes=stats.get("argument_bytes"))
        rows.append(row)
        print(f"stage {stage}: {total / 2**30:.2f} GiB per device (formula {expect / 2**30:.2f} GiB)",
              file=sys.stderr, flush=True)
    return {"config": os.path.relpath(cfg_path, ROOT), "overrides": overrides, "devices": devices,
            "compile_seq_len": compile_seq_len or None,
            "mesh": {"data": 1, "fsdp": devices, "tensor": 1}, "num_params": psi,
            "bytes_per_param": {"params": p, "grads": g, "adam_m_v": o},
            "date": datetime.date.today().isoformat(), "jax": jax.__version__, "rows": rows}


def markdown(result: dict) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"
    n, psi = result["devices"], result["num_params"]
    compiled = "compiled_temp_bytes" in result["rows"][0]
    head = ["ZeRO stage", "params", "grads", "Adam m+v", "total / device", "formula", "formula GiB", "measured / formula",
            "paper (mixed precision)"] + (["XLA temp", "XLA arguments"] if compiled else [])
    note = (f" XLA columns: the train step compiled ahead of time at data.seq_len={result['compile_seq_len']}, "
            f"batch {n} (one sequence per device)." if compiled else "")
    experts = result["rows"][0].get("expert_params")
    if experts:
        note = f" Expert parallelism: Ψe = {experts:,} of them expert weights, split N ways at every stage." + note
    lines = [f"Per-device model state in GiB, Ψ = {psi:,} parameters, N = {n} devices "
             f"(`{result['config']}`{', ' + ' '.join(result['overrides']) if result['overrides'] else ''}, "
             f"mesh data=1 fsdp={n} tensor=1).{note}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [str(r["stage"]), gib(r["params_bytes"]), gib(r["grads_bytes"]), gib(r["opt_state_bytes"]),
                 gib(r["total_bytes"]), r["formula"], gib(r["formula_bytes"]), f"{r['measured_over_formula']:.4f}",
                 f"{r['paper_mixed_precision']} = {gib(r['paper_mixed_precision_bytes'])}"]
        if compiled:
            cells += [gib(r["compiled_temp_bytes"] or 0), gib(r["compiled_argument_bytes"] or 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, ROOT)
    import jax

    if jax.device_count() < args.devices:
        print(f"error: --devices={args.devices}, but JAX sees {jax.device_count()} devices "
              f"(XLA_FLAGS={os.environ['XLA_FLAGS']!r})", file=sys.stderr)
        return 2
    from t5x_lite.config import ConfigError

    try:
        result = measure(args.config, args.overrides, args.devices, args.compile_seq_len)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(result))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    off = [r["stage"] for r in result["rows"] if abs(r["measured_over_formula"] - 1) > TOLERANCE]
    if off:
        print(f"error: stages {off} are more than {TOLERANCE:.0%} off the ZeRO formula", file=sys.stderr)
        return 1
    print(f"\nall stages within {TOLERANCE:.0%} of the formula; wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
