"""Issue 8's targets against one GPU session's results, as markdown for docs/PERFORMANCE.md.

    python bench/gpu_report.py runs/gpu_session          # the directory bench/gpu_session.sh wrote
    python bench/gpu_report.py runs/gpu_session --json runs/gpu_session/report.json

Reads whichever of ``llama.json``, ``llama_more.json``, ``t5.json``, ``bert.json``, ``moe.json`` (from
``bench/train_vs_hf.py``; then any other file of its rows there) and ``decode.json`` (from
``bench/decode.py``) are there. For each
training workload the best row of ours (any variant) is set against the Hugging Face baseline
*of the same run*, the same file (llama and t5: ``torch.compile``; bert: eager), tokens/s over
tokens/s: a faster row from a run without the baseline is listed, not compared; the
first llama_1b step of the shipped config (init and compile included) against 30 s; decoding at
batch 1 and 32 (end to end, prefill included) against 600 and 10,000 tokens/s. Then every row
of every workload, best first, with MFU against the peak the bench used and the loss after the
timed steps (the same data and steps for every row: a variant that only changes how XLA builds
the program must end where the shipped row does). Nothing is measured
here: a missing file or row is reported as missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# workload -> (the HF row it is compared with, the ratio to reach)
TRAIN_TARGETS = {"llama": ("hf_compile", 1.35), "t5": ("hf_compile", 2.0), "bert": ("hf", 1.5)}
FIRST_STEP_S = 30.0
DECODE_TARGETS = {1: 600.0, 32: 10_000.0}
DECODE_CONFIG = "llama_1b.yaml"  # the targets' model (decode_moe.json's rows are listed, not compared)
TRAIN_FILES = ("llama.json", "llama_more.json", "t5.json", "bert.json", "moe.json")  # moe: a table, no target


def tokens_per_s(row: dict) -> float:
    return row["tokens_per_step"] / row["step_s"]


def changes(row: dict) -> list[str]:
    """What a row ran beyond the shipped config: the bench's ``SAME_WORK`` (ours doing HF's update),
    ``--set`` (every row of that run) and its variant's."""
    return list(row.get("same_work", [])) + list(row.get("set", [])) + list(row.get("overrides", []))


def same_work(row: dict, baseline: dict) -> bool:
    """A row counts against a target only if it did the baseline's work: the same tokens and FLOPs a
    step (a variant at batch 16 is another workload, listed but not compared)."""
    return (row["tokens_per_step"] == baseline["tokens_per_step"]
            and abs(row["flops_per_step"] - baseline["flops_per_step"]) <= 1e-6 * baseline["flops_per_step"])


def load(directory: str) -> tuple[dict, list, dict]:
    """``(rows by workload, decode rows, first machine / date / peak seen)``."""
    by_workload: dict[str, list] = {}
    meta: dict = {}
    names = [n for n in TRAIN_FILES if os.path.exists(os.path.join(directory, n))]
    names += sorted(n for n in os.listdir(directory) if n.endswith(".json") and n not in names)
    for name in names:
        with open(os.path.join(directory, name)) as f:
            data = json.load(f)
        if not isinstance(data, dict) or not all("impl" in r for r in data.get("results") or [{}]):
            continue  # not bench/train_vs_hf.py's (decode.json, t5x-lite bench's rows, a report)
        for key in ("date", "machine", "peak_tflops"):
            meta.setdefault(key, data.get(key))
        for row in data.get("results", []):
            if "error" not in row:
                by_workload.setdefault(row["workload"], []).append(dict(row, file=name))
    decode = []  # decode.json, then decode_NAME.json (another run of bench/decode.py: its rows tagged NAME)
    for name in sorted(n for n in os.listdir(directory) if n.startswith("decode") and n.endswith(".json")):
        tag = name[len("decode"):-len(".json")].strip("_")
        with open(os.path.join(directory, name)) as f:
            rows = json.load(f)
        decode += [dict(r, variant=f"{tag}:{r.get('variant', 'default')}" if tag else r.get("variant", "default"))
                   for r in rows]
    return by_workload, decode, meta


def targets(by_workload: dict, decode: list) -> list[dict]:
    out = []
    for workload, (baseline, goal) in TRAIN_TARGETS.items():
        rows = by_workload.get(workload, [])
        entry = {"target": f"{workload} train >= {goal}x {baseline}", "goal": goal}
        # (ratio, ours, hf) of every row of ours against the baseline of its own run (file)
        pairs = [(tokens_per_s(r) / tokens_per_s(hf), r, hf) for hf in rows if hf["impl"] == baseline
                 for r in rows if r["impl"].startswith("ours") and r["file"] == hf["file"] and same_work(r, hf)]
        if pairs:
            ratio, r, hf = max(pairs, key=lambda p: p[0])
            label = ", ".join([r["impl"]] + changes(r))
            entry.update(measured=f"{tokens_per_s(r):,.0f} tok/s ({label}) vs {tokens_per_s(hf):,.0f} ({r['file']})",
                         value=ratio, met=ratio >= goal)
        out.append(entry)
    shipped = next((r for r in by_workload.get("llama", []) if r["impl"] == "ours" and not changes(r)), None)
    entry = {"target": f"llama_1b first step <= {FIRST_STEP_S:.0f} s", "goal": FIRST_STEP_S}
    if shipped and shipped.get("first_step_s") is not None:
        entry.update(measured=f"{shipped['first_step_s']:.1f} s", value=shipped["first_step_s"],
                     met=shipped["first_step_s"] <= FIRST_STEP_S)
    out.append(entry)
    for batch, goal in DECODE_TARGETS.items():
        rows = [r for r in decode if r.get("batch") == batch and r.get("config", DECODE_CONFIG) == DECODE_CONFIG]
        entry = {"target": f"decode batch {batch} >= {goal:,.0f} tok/s", "goal": goal}
        if rows:
            best = max(rows, key=lambda r: r["tokens_per_s"])
            entry.update(measured=f"{best['tokens_per_s']:,.0f} tok/s ({best.get('variant', 'default')})",
                         value=best["tokens_per_s"], met=best["tokens_per_s"] >= goal)
        out.append(entry)
    return out


def markdown(by_workload: dict, decode: list, meta: dict) -> str:
    lines = [f"Results of {meta.get('date', '?')}; machine: "
             + ", ".join(f"{k} {v}" for k, v in (meta.get("machine") or {}).items()), "",
             "| target | measured | ratio / value | met |", "|---|---|---|---|"]
    for t in targets(by_workload, decode):
        if "value" not in t:
            lines.append(f"| {t['target']} | missing | | |")
        else:
            value = f"{t['value']:.2f}x" if "train" in t["target"] else f"{t['value']:,.1f}"
            lines.append(f"| {t['target']} | {t['measured']} | {value} | {'yes' if t['met'] else 'no'} |")
    peak = meta.get("peak_tflops")
    for workload, rows in by_workload.items():
        lines += ["", f"**{workload}** (best first)", "",
                  "| impl | file | tokens/s | step ms | MFU | first step s (its first run) | peak GiB | loss "
                  "| beyond the shipped config |", "|---|---|---|---|---|---|---|---|---|"]
        baseline = next((r for r in rows if r["impl"] == TRAIN_TARGETS.get(workload, ("hf",))[0]), None)
        for r in sorted(rows, key=tokens_per_s, reverse=True):
            mfu = f"{100 * r['flops_per_step'] / r['step_s'] / (peak * 1e12):.1f}%" if peak else "n/a"
            first = f"{r['first_step_s']:.1f}" if r.get("first_step_s") is not None else ""
            if r.get("first_run_s") is not None:  # ours since session 8: the compiled step's first run
                first += f" ({r['first_run_s']:.1f})"
            mem = f"{r['peak_bytes'] / 2**30:.1f}" if r.get("peak_bytes") else ""
            loss = f"{r['loss']:.4f}" if r.get("loss") is not None else ""  # after the same steps: a variant
            # that only reorganises the program (an XLA option) must match the shipped row's
            note = ", ".join(changes(r)) + ("" if baseline is None or same_work(r, baseline)
                                            else " (other work a step: not compared)")
            lines.append(f"| {r['impl']} | {r['file']} | {tokens_per_s(r):,.0f} | {1000 * r['step_s']:.1f} | {mfu} | "
                         f"{first} | {mem} | {loss} | {note.strip()} |")
        kernels = [(r["impl"], r["file"], r["attention_kernels"]) for r in rows if r.get("attention_kernels")]
        if kernels:  # ours since session 12: what each row's compiled step attended with
            lines += [""] + [f"- {impl} ({file}): {what}" for impl, file, what in kernels]
    if decode:
        first = decode[0]
        lines += ["", f"**decode** ({first.get('prompt_len', '?')} + {first.get('new_tokens', '?')} tokens)", "",
                  "| config | variant | batch | tokens/s end to end | decode tokens/s | ms / step | compile s |",
                  "|---|---|---|---|---|---|---|"]
        for r in decode:
            compile_s = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else ""
            lines.append(f"| {r.get('config', '?')} | {r.get('variant', 'default')} | {r['batch']} | "
                         f"{r['tokens_per_s']:,.0f} | {r['decode_tokens_per_s']:,.0f} | {r['ms_per_step']:.2f} | "
                         f"{compile_s} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory")
    p.add_argument("--json", default=None, help="also write the targets as JSON")
    args = p.parse_args(argv)
    by_workload, decode, meta = load(args.directory)
    if not by_workload and not decode:
        print(f"no results under {args.directory} (expected {', '.join(TRAIN_FILES)} or decode.json)", file=sys.stderr)
        return 2
    print(markdown(by_workload, decode, meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"targets": targets(by_workload, decode), **meta}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
