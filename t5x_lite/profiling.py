"""Where a compiled step spends its time: a profiler trace, summed by what the model does.

``jax.profiler.trace(..., create_perfetto_trace=True)`` writes a Chrome-trace JSON in which
every executed HLO instruction is an event carrying ``hlo_module`` and ``hlo_op`` (XLA's name
for the instruction: ``fusion.12``, ``dot.60``...). The compiled module's text gives each
instruction's ``op_name`` metadata: the JAX name stack, which holds the flax module path
(``.../layers/mlp/wi_0/dot_general``) and whether it ran in the forward (``jvp(...)``) or the
backward pass (``transpose(jvp(...))``). Summing the events' *exclusive* time (a ``while``
event on a CPU thread contains its body's events) by that path gives the table the GPU plan
needs: how much of a step the MLP, attention, norms, output layer and optimizer take.

Times are summed over the threads or streams that run instructions: where they overlap (a
collective on its own stream) the sum exceeds the step's wall time.

On a GPU, XLA launches sequences of kernels as CUDA graphs ("command buffers"): the trace then shows one
``command_buffer_N`` event per graph and none of the instructions in it (a 2026-11-23 H100 run
attributed 100% of llama_1b's step to ``command_buffer_*``, half the step's time seen). ``t5x-lite
bench --profile`` therefore runs with ``--xla_gpu_enable_command_buffer=`` (off; its timings are
then those of a step without graphs, said in its output).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from typing import Optional

TOP_OPS = 25  # instructions listed in the printed table (the JSON holds all of them)
NO_COMMAND_BUFFERS = "--xla_gpu_enable_command_buffer="  # XLA_FLAGS: every kernel its own event (GPU)

CAST_SCOPE = "cast_for_compute"  # the scope of the weights cast to the compute dtype once a step (trainer)

# (category, pattern on "hlo_op op_name"), first match wins.
CATEGORIES = (
    ("collectives", re.compile(r"^(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)")),
    # the weights cast to the compute dtype once a step, and their gradients back (trainer.cast_for_compute)
    ("weight casts (once a step)", re.compile(re.escape(CAST_SCOPE))),
    ("attention: projections", re.compile(r"_attention/(query|key|value|out|qkv|kv)/")),
    ("attention: scores, softmax, kernel", re.compile(r"_attention/|dot_product_attention|fmha|cudnn")),
    ("mlp", re.compile(r"/mlp/")),
    ("norms", re.compile(r"_norm/|final_norm/")),
    ("output layer + loss", re.compile(r"/head/|lm_head|logits|cross_entropy|log_softmax")),
    ("layers: residuals, RoPE, scan", re.compile(r"/stack/")),
    ("embeddings", re.compile(r"embed")),
    ("model: other", re.compile(r"Model\)")),
    ("output layer + loss", re.compile(r"jvp\(")),  # differentiated, outside the model: the loss
)
OTHER = "optimizer, clipping, other"
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"')
_DEFINITION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*)$')
_METADATA = re.compile(r'metadata=\{[^}]*\}')
_OPCODE = re.compile(r'(?:^|[\s)}])([a-z][a-z0-9\-]*)\(')

# What kind of kernel an instruction is (the other axis of the table: a GPU step's matmul-class
# work runs near the chip's FLOP peak, the rest is bound by memory bandwidth or launches).
KINDS = (
    ("attention kernel (cuDNN)", re.compile(r"fmha|cudnn\$|__cudnn")),
    ("matmul (Triton)", re.compile(r"triton_gemm|__triton_nested_gemm")),
    ("matmul (cuBLAS, library)", re.compile(r"cublas|__gemm|\bdot\(|convolution\(")),
    ("collectives", re.compile(r"\b(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(-start|-done)?\(")),
    ("Triton fusions (norms, softmax, reductions)", re.compile(r'"kind":"__triton"')),
    ("reductions (fusions)", re.compile(r"kind=kInput")),
    ("elementwise (fusions)", re.compile(r"kind=k(Loop|Output)")),
    ("copies, transposes, slices", re.compile(r"\b(copy|transpose|dynamic-slice|dynamic-update-slice|slice|concatenate)\(")),
    ("scatter, gather, sort", re.compile(r"\b(scatter|gather|sort)\(")),
)


def first_match(table, text: str, default: Optional[str]) -> Optional[str]:
    """The name of ``table``'s first ``(name, pattern)`` whose pattern occurs in ``text``."""
    return next((name for name, pattern in table if pattern.search(text)), default)


def op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> op_name metadata, from a compiled module's text (``compiled.as_text()``)."""
    return {m.group(1): m.group(2) for m in map(_INSTRUCTION.match, hlo_text.splitlines()) if m}


def instruction_kinds(hlo_text: str) -> dict[str, str]:
    """Instruction name -> the kind of kernel it is (``KINDS``; else its opcode), from the module's text."""
    out = {}
    for m in map(_DEFINITION.match, hlo_text.splitlines()):
        if not m:
            continue
        rest = _METADATA.sub("", m.group(2))  # its op_name would match (``transpose(jvp(...``)
        kind = first_match(KINDS, rest, None)
        if kind is None:
            op = _OPCODE.search(rest)
            kind = op.group(1) if op else "other"
        out[m.group(1)] = kind
    return out


_KIND_BY_NAME = (  # instructions the module's text does not hold (named by XLA after it was printed)
    ("copies, transposes, slices", re.compile(r"dynamic_update_slice|dynamic_slice|copy|transpose|concatenate")),
    ("reductions (fusions)", re.compile(r"^input_|reduce")),
    ("elementwise (fusions)", re.compile(r"^loop_|^wrapped_")),
)


def kind_of(hlo_op: str, kinds: dict[str, str]) -> str:
    """``instruction_kinds``' answer, else a guess from the instruction's name (XLA's fusion names
    say what they fuse: ``loop_dynamic_update_slice_fusion.21``), else "other"."""
    if hlo_op in kinds:
        return kinds[hlo_op]
    return first_match(_KIND_BY_NAME, hlo_op, "other")


def category(hlo_op: str, op_name: str) -> str:
    return first_match(CATEGORIES, f"{hlo_op} {op_name}", OTHER)


def trace_file(log_dir: str) -> str:
    found = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir} (jax.profiler.trace(..., "
                                "create_perfetto_trace=True) writes one)")
    return found[-1]


def exclusive_times(events: list[dict]) -> list[tuple[dict, float]]:
    """``(event, microseconds)`` of complete events minus the events nested in them, per thread
    (an event that starts inside another and ends after it counts against it only while inside)."""
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    out = []
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack: list[list] = []  # [event, end, exclusive]
        for e in evs:
            start, dur = e["ts"], e.get("dur", 0)
            while stack and stack[-1][1] <= start:
                out.append((stack[-1][0], stack[-1][2]))
                stack.pop()
            if stack:  # only the part inside the enclosing event: a launch can outlast its caller's event
                stack[-1][2] -= min(start + dur, stack[-1][1]) - start
            stack.append([e, start + dur, dur])
        out.extend((s[0], s[2]) for s in stack)
    return [(e, max(us, 0)) for e, us in out]  # children that overlap each other: never below zero


def device_events(ops: list[dict], events: list[dict]) -> list[dict]:
    """The instruction events of the accelerators' processes when the trace has any (a GPU trace
    also has the host threads' events of launching each one: counting both would count an
    instruction twice, once at launch cost); else all of them (CPU: the host threads run them)."""
    names = {e.get("pid"): str(e.get("args", {}).get("name", "")) for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = {pid for pid, name in names.items() if "/device:" in name and "CPU" not in name.upper()}
    on_device = [e for e in ops if e.get("pid") in devices]
    return on_device or ops


def summarize(log_dir: str, hlo_text: str, steps: int, module: Optional[str] = None) -> dict:
    """Per-step time by category and the costliest instructions of ``steps`` traced steps.

    ``module``: the ``hlo_module`` to keep (default: the one with the most time)."""
    events = json.load(gzip.open(trace_file(log_dir)))
    events = events["traceEvents"] if isinstance(events, dict) else events
    ops = device_events([e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})], events)
    if not ops:
        raise ValueError(f"the trace in {log_dir} has no events with an hlo_op: nothing to attribute")
    timed = exclusive_times(ops)
    per_module = collections.Counter()
    for e, us in timed:
        per_module[e["args"].get("hlo_module", "")] += us
    module = module or per_module.most_common(1)[0][0]
    names, kinds = op_names(hlo_text), instruction_kinds(hlo_text)
    by_category, by_op, passes = collections.Counter(), collections.Counter(), collections.Counter()
    by_kind, count = collections.Counter(), collections.Counter()
    for e, us in timed:
        if e["args"].get("hlo_module", "") != module:
            continue
        op = e["args"]["hlo_op"]
        name = names.get(op, "")
        by_category[category(op, name)] += us
        by_op[(op, name)] += us
        by_kind[kind_of(op, kinds)] += us
        count[(op, name)] += 1
        passes["backward" if "transpose(" in name else "forward" if "jvp(" in name else "update, metrics"] += us
    total = sum(by_category.values())
    ms = lambda us: us / 1000 / steps
    return {
        "module": module, "steps": steps, "busy_ms_per_step": ms(total),
        # kernels (instruction runs) a step: what a launch-bound step (decoding one token) pays per kernel
        "launches_per_step": sum(count.values()) / steps,
        "categories": [{"category": c, "ms": ms(us), "share": us / total} for c, us in by_category.most_common()],
        "passes": {p: ms(us) for p, us in passes.most_common()},
        "kinds": [{"kind": k, "ms": ms(us), "share": us / total} for k, us in by_kind.most_common()],
        "top_ops": [{"hlo_op": op, "op_name": name, "ms": ms(us), "category": category(op, name)}
                    for (op, name), us in by_op.most_common(TOP_OPS)],
        # every instruction (a scanned layer's run once per layer: ``calls`` a step), for reading offline
        "ops": [{"hlo_op": op, "ms": ms(us), "calls": count[(op, name)] / steps, "kind": kind_of(op, kinds),
                 "category": category(op, name), "op_name": name} for (op, name), us in by_op.most_common()],
    }


def format_summary(s: dict) -> str:
    seen = f", {s['busy_ms_per_step'] / s['step_ms']:.0%} of the timed {s['step_ms']:.2f} ms" if s.get("step_ms") else ""
    lines = [f"{s['module']}: {s['busy_ms_per_step']:.2f} ms of instructions per step "
             f"(summed over threads / streams{seen}; {s['launches_per_step']:.0f} instruction runs a step; "
             f"{s['steps']} steps traced); "
             + ", ".join(f"{p} {ms:.2f} ms" for p, ms in s["passes"].items()),
             "| where | ms / step | share |", "|---|---|---|"]
    lines += [f"| {c['category']} | {c['ms']:.2f} | {100 * c['share']:.1f}% |" for c in s["categories"]]
    lines += ["", "| kind of kernel | ms / step | share |", "|---|---|---|"]
    lines += [f"| {k['kind']} | {k['ms']:.2f} | {100 * k['share']:.1f}% |" for k in s.get("kinds", [])]
    lines += ["", "| instruction | ms / step | where | op_name |", "|---|---|---|---|"]
    for o in s["top_ops"]:
        lines.append(f"| {o['hlo_op']} | {o['ms']:.3f} | {o['category']} | {o['op_name'][-90:]} |")
    return "\n".join(lines)


def no_graphs_note(print_to) -> None:
    """Profiling: XLA's command buffers (CUDA graphs) hide the instructions inside them from the
    trace; turn them off for this process (XLA_FLAGS is read when the backend starts: before the
    first device is asked for). A flag the user set is left as it is."""
    try:  # jax's own (private) answer; without it, assume nothing started yet
        from jax._src.xla_bridge import backends_are_initialized
    except ImportError:
        backends_are_initialized = lambda: False  # noqa: E731

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_enable_command_buffer" in flags:
        return
    if backends_are_initialized():
        print("note: --profile: the backend already started; on a GPU, command buffers (CUDA graphs) "
              "stay on and hide the instructions inside them", file=print_to)
        return
    os.environ["XLA_FLAGS"] = f"{flags} {NO_COMMAND_BUFFERS}".strip()
    print(f"note: --profile runs with {NO_COMMAND_BUFFERS} (XLA's CUDA graphs off, so that the trace "
          "shows each kernel): on a GPU its timings are those of steps without graphs", file=print_to)
