"""A static cost model of a compiled XLA program: every kernel it launches, what it reads and
writes, its FLOPs, and an estimate of its time, read from the optimized module's text.

Most sessions of this project have no GPU. XLA can still compile for one without it: given an
H100's description (``bench/offline_gpu.py`` does this), the compiled program is the one a GPU
would run (the same fusions, copies, loops and cuDNN calls), only its GEMM tilings are not
autotuned. This module reads that program and prices each kernel with a roofline:

    time = max(bytes / bandwidth, FLOPs / peak) + launch     (per kernel, times its runs a step)

* **kernels**: the instructions of the entry computation and of the loops, conditionals and
  calls it runs (a while body counted ``known_trip_count`` times, its condition once more);
  parameters, tuples, bitcasts, constants and an uninitialised buffer (``AllocateBuffer``)
  launch nothing.
* **bytes**: each operand and result once; a fusion that only slices an operand (the layer scan's
  ``dynamic-slice`` of a stacked ``[L, ...]`` buffer) reads the slice, and one whose result is a
  ``dynamic-update-slice`` of an operand writes the update in place.
* **FLOPs**: ``2 x result x contracted`` for each dot (inside Triton GEMM fusions too) and each
  GEMM handed to cuBLAS (alone, or in a dynamic-slice fusion that reads or writes it in place in
  a stacked buffer; its workspace is not counted as moved); cuDNN
  attention ``4 B N T S H`` forward (half when causal) and 2.5x that backward.
* **collectives**: the bytes each device sends (``collective_bytes``) over the links instead.

It does not know caches, overlap between streams or how well a kernel is tuned: it is a guide
to where a step's time can go and what a change removes (the same program with and without
it), not a measurement. ``docs/offline_runs/2026-11-23-s9/README.md`` sets it against session
8's timed H100 steps of the same programs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Optional

from t5x_lite.profiling import category

# H100 SXM figures this project measured (docs/PERFORMANCE.md, 2026-11-23): AdamW's update and the
# SwiGLU fusions stream at ~3.0-3.2 TB/s, llama_1b's MLP GEMMs run at ~800 TFLOP/s, and one
# llama_1b layer's cuDNN attention (8 x 2048, causal, forward + backward) takes 1.57 ms, which
# 400 TFLOP/s forward and 300 backward reproduce; ~1.5 us a kernel for the launch and tail.
# Collectives between the H100s of one host: NVLink 4 moves 450 GB/s each way; a ring collective
# gets ~80% of it (an assumption, not yet measured here).
H100 = {"bandwidth": 3.0e12, "gemm_flops": 800e12, "attention_fwd_flops": 400e12, "attention_bwd_flops": 300e12,
        "launch_s": 1.5e-6, "link_bandwidth": 360e9}

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPERAND = re.compile(r"%([\w.\-]+)")
_CALLED = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_GEMM_CONTRACTING = re.compile(r'"lhs_contracting_dimensions":\[([^\]]*)\]')
_FUSION_KIND = re.compile(r'"fusion_backend_config":\{"kind":"([^"]+)"(?:,"custom_fusion_config":\{"name":"([^"]+)")?')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Instructions that launch nothing: they name, group or alias buffers.
_FREE = frozenset({"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id",
                   "replica-id", "opt-barrier", "add-dependency"})
# Custom calls that launch nothing: an uninitialised buffer (what XLA's DUS-accumulator pass puts in
# place of the zeros a layer scan's stacked outputs started from).
_NO_KERNEL = frozenset({"AllocateBuffer"})
_FUSIONS = frozenset({"fusion", "fusion-start"})  # XLA 0.11 runs some fusions asynchronously: start ... done
_CONTAINERS = frozenset({"while", "conditional", "call"})
_SLICING = frozenset({"dynamic-slice", "slice", "gather"})


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str
    opcode: str
    operands: list
    attrs: str
    root: bool = False


@dataclasses.dataclass
class Computation:
    name: str
    instructions: list
    entry: bool = False

    def __post_init__(self):
        self.by_name = {i.name: i for i in self.instructions}

    @property
    def root(self) -> Instruction:
        return next((i for i in self.instructions if i.root), self.instructions[-1])


def shape_bytes(shape: str) -> float:
    """Bytes of every array in an HLO shape (tuples summed; layouts ignored)."""
    return sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _ARRAY.findall(shape))


def shape_dims(shape: str) -> list[int]:
    """The dimensions of the first array in an HLO shape."""
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _closing(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise ValueError(f"unbalanced parentheses in {text[:200]!r}")


def parse_instruction(line: str) -> Optional[Instruction]:
    m = _INSTR.match(line)
    if not m:
        return None
    rest = m.group(3)
    if rest.startswith("("):  # a tuple shape
        end = _closing(rest, 0)
        shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    paren = rest.find("(")
    if paren < 0:
        return None
    opcode = rest[:paren].strip()
    end = _closing(rest, paren)
    return Instruction(name=m.group(2), shape=shape, opcode=opcode, operands=_OPERAND.findall(rest[paren:end]),
                       attrs=rest[end + 1:], root=bool(m.group(1)))


def parse_module(text: str) -> dict[str, Computation]:
    """Computation name -> ``Computation``, from ``compiled.as_text()`` (or any HLO module text)."""
    comps, current, instructions, entry = {}, None, [], False
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and not line.startswith("HloModule"):
                current, instructions, entry = m.group(2), [], bool(m.group(1))
            continue
        if line.startswith("}"):
            comps[current] = Computation(current, instructions, entry)
            current = None
            continue
        instr = parse_instruction(line)
        if instr is not None:
            instructions.append(instr)
    return comps


def entry_computation(comps: dict[str, Computation]) -> Computation:
    entries = [c for c in comps.values() if c.entry]
    if not entries:
        raise ValueError("the module text has no ENTRY computation")
    return entries[0]


def kernels(comps: dict[str, Computation], unknown_trips: int = 1) -> list[tuple[Instruction, Computation, float]]:
    """``(instruction, its computation, runs a step)`` for every instruction that launches work,
    walking from the entry through while loops (``known_trip_count`` runs of the body, one more
    of the condition; ``unknown_trips`` when XLA does not know it: a decoding loop's tokens),
    conditionals (each branch counted once: an upper bound) and calls."""
    out = []

    def walk(comp: Computation, runs: float, depth: int = 0):
        if depth > 50:
            raise ValueError("computations nest deeper than 50: a cycle?")
        for instr in comp.instructions:
            if instr.opcode in _CONTAINERS:
                called = dict(_CALLED.findall(instr.attrs))
                if instr.opcode == "while":
                    trip = _TRIP.search(instr.attrs)
                    n = int(trip.group(1)) if trip else unknown_trips
                    walk(comps[called["body"]], runs * n, depth + 1)
                    walk(comps[called["condition"]], runs * (n + 1), depth + 1)
                elif instr.opcode == "conditional":
                    branches = _BRANCHES.search(instr.attrs)
                    names = ([b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches
                             else [called["true_computation"], called["false_computation"]])
                    for name in names:
                        walk(comps[name], runs, depth + 1)
                else:
                    walk(comps[called["to_apply"]], runs, depth + 1)
            elif (instr.opcode not in _FREE and not instr.opcode.endswith("-done")  # an async op's work: its start
                  and _target(instr) not in _NO_KERNEL):
                out.append((instr, comp, runs))
    walk(entry_computation(comps), 1.0)
    return out


def _sliced_bytes(name: str, body: Computation, users: dict, outputs: frozenset = frozenset()) -> Optional[float]:
    """Bytes read of ``name`` when every use of it only slices it: the slices' sizes, seen through
    bitcasts and through a ``dynamic-update-slice`` of it (a cache updated, then one layer of it
    read; written in place when it is one of the fusion's ``outputs``); None when some use reads
    it whole."""
    used = users.get(name, [])
    if not used:
        return None
    total = 0.0
    for u in used:
        if u.opcode in _SLICING and u.operands and u.operands[0] == name:
            total += shape_bytes(u.shape)
        elif u.opcode == "bitcast" or (u.opcode == "dynamic-update-slice" and u.operands[0] == name):
            if u.name in outputs:
                continue  # updated in place: the update is counted as written
            inner = _sliced_bytes(u.name, body, users, outputs)
            if inner is None:
                return None
            total += inner
        else:
            return None
    return total


def _fusion_bytes(instr: Instruction, body: Computation) -> float:
    """Bytes a fusion moves: operands sliced inside it count their slices, an operand updated in
    place (a ``dynamic-update-slice`` result) counts nothing, the result the update only."""
    params = {i.name: i for i in body.instructions if i.opcode == "parameter"}
    users: dict[str, list[Instruction]] = {i.name: [] for i in body.instructions}
    for i in body.instructions:
        for op in i.operands:
            if op in users:
                users[op].append(i)
    root = _root(body)
    updates = [root] if root.opcode == "dynamic-update-slice" else (
        [body.by_name[o] for o in root.operands if o in body.by_name and body.by_name[o].opcode == "dynamic-update-slice"]
        if root.opcode == "tuple" else [])
    in_place = {u.operands[0] for u in updates if u.operands}
    total = 0.0
    for name, p in params.items():
        if name in in_place:
            continue
        sliced = _sliced_bytes(name, body, users, frozenset(u.name for u in updates))
        total += shape_bytes(p.shape) if sliced is None else sliced
    if updates:
        total += sum(shape_bytes(body.by_name[u.operands[1]].shape) for u in updates
                     if len(u.operands) > 1 and u.operands[1] in body.by_name)
        if root.opcode == "tuple":  # the other results, written whole
            total += sum(shape_bytes(body.by_name[o].shape) for o in root.operands
                         if o in body.by_name and body.by_name[o] not in updates)
    else:
        total += shape_bytes(body.root.shape if instr.opcode == "fusion-start" else instr.shape)
    return total


def _matmul_flops(instr: Instruction, comp: Computation) -> float:
    """``2 x result x contracted`` of a dot, or of a GEMM handed to cuBLAS: the result is the first
    array of its shape (a cuBLAS call's tuple holds the workspace after it); the lhs's contracted
    dimensions are in a dot's attributes, in a cuBLAS call's backend config."""
    lhs = comp.by_name.get(instr.operands[0]) if instr.operands else None
    if lhs is None:
        return 0.0
    dims = shape_dims(lhs.shape)
    m = (_GEMM_CONTRACTING if _is_gemm_call(instr) else _CONTRACTING).search(instr.attrs)
    contracted = math.prod(dims[int(d.strip('" '))] for d in m.group(1).split(",") if d.strip('" ')) if m else 1
    return 2.0 * math.prod(shape_dims(instr.shape)) * contracted


def _target(instr: Instruction) -> str:
    """A custom call's target ("" for anything else)."""
    m = _TARGET.search(instr.attrs) if instr.opcode == "custom-call" else None
    return m.group(1) if m else ""


def _is_gemm_call(instr: Instruction) -> bool:
    """A GEMM handed to a library (``__cublas$gemm``, ``__cublas$lt$matmul``): what XLA emits for
    a dot its autotuner (or ``xla_gpu_enable_triton_gemm=false``) gives cuBLAS."""
    return instr.opcode == "custom-call" and '"gemm_backend_config"' in instr.attrs


def _library_gemm(instr: Instruction, body: Optional[Computation] = None) -> Optional[Instruction]:
    """The cuBLAS call a kernel is or holds (``body``: the computation a fusion calls; a
    dynamic-slice fusion wraps one), else None."""
    if _is_gemm_call(instr):
        return instr
    return next((i for i in body.instructions if _is_gemm_call(i)), None) if body is not None else None


def _workspace_bytes(instr: Instruction) -> float:
    """Bytes of the scratch a kernel holding a cuBLAS call returns beside its result (the ``s8``
    arrays of its result): cuBLAS's workspace, not data it moves through HBM."""
    return sum(shape_bytes(f"{t}[{dims}]") for t, dims in _ARRAY.findall(instr.shape) if t == "s8")


def _fusion_flops(body: Computation, comps: dict[str, Computation], depth: int = 0) -> float:
    flops = 0.0
    for i in body.instructions:
        if i.opcode == "dot" or _is_gemm_call(i):
            flops += _matmul_flops(i, body)
        elif i.opcode in _FUSIONS and depth < 5:
            called = dict(_CALLED.findall(i.attrs)).get("calls")
            if called in comps:
                flops += _fusion_flops(comps[called], comps, depth + 1)
    return flops


def _attention_flops(instr: Instruction, comp: Computation) -> float:
    """cuDNN flash attention: ``4 B N T S H`` forward (q ``[B, T, N, H]``, k ``[B, S, K, H]``), half
    of it under a causal mask, 2.5x backward (scores again, then four products)."""
    q, k = (comp.by_name.get(o) for o in instr.operands[:2])
    if q is None or k is None:
        return 0.0
    qd, kd = shape_dims(q.shape), shape_dims(k.shape)
    if len(qd) != 4 or len(kd) != 4:
        return 0.0
    flops = 4.0 * qd[0] * qd[2] * qd[1] * kd[1] * qd[3]
    if re.search(r'"mask_type":\s*"(PADDING_)?CAUSAL"', instr.attrs):
        flops /= 2
    return flops * (2.5 if "Backward" in instr.attrs else 1.0)


def _root(body: Computation) -> Instruction:
    root = body.root
    while root.opcode == "bitcast" and root.operands and root.operands[0] in body.by_name:
        root = body.by_name[root.operands[0]]
    return root


_GROUP_MESH = re.compile(r"mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_GROUP_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")


def group_size(instr: Instruction) -> int:
    """Devices in one group of a collective (``replica_groups``: a mesh's named axes or explicit
    lists); 1 when the text does not say."""
    m = _GROUP_MESH.search(instr.attrs)
    if m:
        sizes = dict((k.strip("' "), int(v)) for k, v in (kv.split("=") for kv in m.group(1).split(",") if "=" in kv))
        return math.prod(sizes.get(a.strip("' "), 1) for a in m.group(2).split(",") if a.strip())
    m = _GROUP_LIST.search(instr.attrs)
    return len(m.group(1).split(",")) if m else 1


def collective_bytes(instr: Instruction, comp: Computation) -> float:
    """Bytes each device sends over its links for a collective on ``n`` devices (ring algorithms):
    an all-gather its result's ``(n-1)/n``, a reduce-scatter its input's, an all-reduce twice its
    input's, the others their input."""
    n = group_size(instr)
    operands = sum(shape_bytes(comp.by_name[o].shape) for o in instr.operands if o in comp.by_name)
    result = shape_bytes(instr.shape) - (operands if instr.opcode.endswith("-start") and instr.shape.startswith("((")
                                         else 0)
    share = (n - 1) / n if n > 1 else 0.0
    op = instr.opcode.removesuffix("-start")
    if op == "all-gather":
        return result * share
    if op == "all-reduce":
        return 2 * operands * share
    return operands * share


def kind(instr: Instruction, body: Optional[Computation] = None) -> str:
    """What kind of kernel ``instr`` is (``body``: the computation a fusion calls): the rows of
    the cost table."""
    if instr.opcode == "custom-call":
        target = _target(instr)
        if "fmha" in target or "cudnn" in target:
            return "attention (cuDNN)"
        if "cublas" in target or "gemm" in target:
            return "matmul"
        return f"custom-call {target}"
    if instr.opcode in _FUSIONS:
        if body is not None and _root(body).opcode == "dynamic-update-slice":
            return "copies: updates of stacked buffers"
        if body is not None and (_library_gemm(instr, body) or any(i.opcode == "dot" for i in body.instructions)):
            return "matmul"  # a Triton GEMM, or cuBLAS reading / writing slices (dynamic-slice fusion)
        m = _FUSION_KIND.search(instr.attrs)
        backend = m.group(1) if m else ""
        if "gemm" in backend:
            return "matmul"
        if m and m.group(2) and "dynamic_slice" in m.group(2):
            return "copies: slices of stacked buffers"
        if backend == "__triton":
            return "Triton fusions (norms, softmax)"
        if "dynamic_update_slice" in instr.name or "dynamic-update-slice" in instr.name:
            return "copies: updates of stacked buffers"
        if "dynamic_slice" in instr.name:
            return "copies: slices of stacked buffers"
        if "kind=kInput" in instr.attrs:
            return "reductions (fusions)"
        return "elementwise (fusions)"
    if instr.opcode == "dot":
        return "matmul"
    if instr.opcode in ("copy", "copy-start", "transpose", "concatenate", "slice", "dynamic-slice",
                        "dynamic-update-slice", "pad"):
        return "copies: " + instr.opcode
    if instr.opcode in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute") or \
            instr.opcode.endswith(("-start", "-done")):
        return "collectives"
    return instr.opcode


@dataclasses.dataclass
class KernelCost:
    name: str
    kind: str
    category: str
    runs: float
    bytes: float  # one run
    flops: float  # one run
    seconds: float  # one run, by the roofline
    op_name: str


def kernel_costs(text: str, machine: Optional[dict] = None, unknown_trips: int = 1) -> list[KernelCost]:
    """One ``KernelCost`` per kernel-launching instruction of the compiled module ``text``
    (``unknown_trips``: the runs of a loop whose trip count XLA does not know, see ``kernels``)."""
    machine = dict(H100, **(machine or {}))
    comps = parse_module(text)
    out = []
    for instr, comp, runs in kernels(comps, unknown_trips):
        flops, body = 0.0, None
        if instr.opcode in _FUSIONS:
            body = comps.get(dict(_CALLED.findall(instr.attrs)).get("calls"))
        k = kind(instr, body)
        if body is not None:
            nbytes = _fusion_bytes(instr, body)
            flops = _fusion_flops(body, comps)
        else:
            nbytes = shape_bytes(instr.shape) + sum(shape_bytes(comp.by_name[o].shape) for o in instr.operands
                                                    if o in comp.by_name)
            if instr.opcode == "dot" or _is_gemm_call(instr):
                flops = _matmul_flops(instr, comp)
        gemm = _library_gemm(instr, body)
        if gemm is not None:
            nbytes -= _workspace_bytes(instr)
        peak = machine["gemm_flops"]
        if k == "attention (cuDNN)":
            flops = _attention_flops(instr, comp)
            peak = machine["attention_bwd_flops" if "Backward" in instr.attrs else "attention_fwd_flops"]
        if k == "collectives":  # over the links, not HBM; they may overlap compute (priced as if not)
            nbytes = collective_bytes(instr, comp)
            seconds = nbytes / machine["link_bandwidth"] + machine["launch_s"]
        else:
            seconds = max(nbytes / machine["bandwidth"], flops / peak) + machine["launch_s"]
        # a dynamic-slice fusion carries no name of its own: its GEMM's
        op = _OP_NAME.search(instr.attrs) or (_OP_NAME.search(gemm.attrs) if gemm is not None else None)
        op_name = op.group(1) if op else ""
        out.append(KernelCost(instr.name, k, category(instr.name, op_name), runs, nbytes, flops, seconds, op_name))
    return out


def group(c: KernelCost) -> str:
    """The same work in every layer under one name: the kind and the op's last three scopes with
    layer numbers taken out (``layers_3`` and ``layers_11`` alike), so that an unrolled stack's 16
    copies of a kernel add up as a scanned stack's one kernel run 16 times does."""
    scopes = re.sub(r"layers_\d+", "layers", "/".join(c.op_name.split("/")[-3:])) or re.sub(r"\.\d+$", "", c.name)
    return f"{c.kind[:24]}: {scopes}"


def _totals(costs: list[KernelCost], key: Callable[[KernelCost], str]) -> dict[str, dict]:
    """``{key(kernel): {ms, kernels, gbytes, tflops}}`` a step, summed over the kernels of a key."""
    acc: dict[str, dict] = {}
    for c in costs:
        row = acc.setdefault(key(c), {"ms": 0.0, "kernels": 0.0, "gbytes": 0.0, "tflops": 0.0})
        row["ms"] += c.seconds * c.runs * 1e3
        row["kernels"] += c.runs
        row["gbytes"] += c.bytes * c.runs / 1e9
        row["tflops"] += c.flops * c.runs / 1e12
    return acc


def summarize(costs: list[KernelCost], top: int = 25) -> dict:
    """Totals a step: kernels launched, bytes, FLOPs, estimated ms; by kind, by category (the
    profile's categories, ``t5x_lite.profiling``) and by ``group``; the costliest instructions."""
    def rollup(key):
        rows = [dict(name=k, **{f: round(v, 3) for f, v in row.items()}) for k, row in _totals(costs, key).items()]
        return sorted(rows, key=lambda r: -r["ms"])

    ranked = sorted(costs, key=lambda c: -c.seconds * c.runs)
    return {
        "ms": round(sum(c.seconds * c.runs for c in costs) * 1e3, 3),
        "kernels": round(sum(c.runs for c in costs)),
        "gbytes": round(sum(c.bytes * c.runs for c in costs) / 1e9, 3),
        "tflops": round(sum(c.flops * c.runs for c in costs) / 1e12, 3),
        # each its own cuDNN graph, built when the program first runs (trainer.CUDNN_BUILD_S each)
        "cudnn_calls": sum(c.kind == "attention (cuDNN)" for c in costs),
        "kinds": rollup(lambda c: c.kind),
        "categories": rollup(lambda c: c.category),
        "groups": rollup(group)[:top],
        "top": [{"name": c.name, "kind": c.kind, "runs": c.runs, "ms": round(c.seconds * c.runs * 1e3, 3),
                 "mbytes": round(c.bytes / 1e6, 2), "gflops": round(c.flops / 1e9, 2), "op_name": c.op_name[-120:]}
                for c in ranked[:top]],
    }


def changes(base: list[KernelCost], costs: list[KernelCost], top: int = 10) -> list[dict]:
    """What differs between two programs' kernels, by ``group`` (the same work in every layer
    together): the ``top`` groups whose estimated time moved most, either way, with the kernel
    runs and GB moved of each side (a group only one side has counts 0 on the other)."""
    before, after = _totals(base, group), _totals(costs, group)
    none = {"ms": 0.0, "kernels": 0.0, "gbytes": 0.0}
    out = []
    for name in set(before) | set(after):
        was, now = before.get(name, none), after.get(name, none)
        if round(now["ms"] - was["ms"], 3) or now["kernels"] != was["kernels"]:
            out.append({"name": name, "ms": round(now["ms"] - was["ms"], 3), "base_ms": round(was["ms"], 3),
                        "kernels": round(now["kernels"] - was["kernels"]), "gbytes": round(now["gbytes"] - was["gbytes"], 3)})
    return sorted(out, key=lambda r: (-abs(r["ms"]), r["name"]))[:top]


def format_summary(s: dict, title: str = "") -> str:
    lines = [f"{title}estimated {s['ms']:.1f} ms a step: {s['kernels']} kernel runs, {s['gbytes']:.1f} GB moved, "
             f"{s['tflops']:.2f} TFLOP, {s['cudnn_calls']} cuDNN attention calls to build on the first run"]
    for section in ("kinds", "categories"):
        lines.append(f"  by {section[:-1] if section == 'kinds' else 'category'}:")
        for r in s[section]:
            lines.append(f"    {r['name'][:44]:44s} {r['ms']:9.2f} ms {r['kernels']:8.0f} runs {r['gbytes']:9.2f} GB "
                         f"{r['tflops']:8.2f} TFLOP")
    lines.append("  costliest work (the same kernel in every layer counted together):")
    for r in s.get("groups", []):
        lines.append(f"    {r['ms']:8.2f} ms {r['kernels']:6.0f} runs {r['gbytes']:8.2f} GB {r['tflops']:7.2f} TFLOP  {r['name'][:90]}")
    lines.append("  costliest kernels:")
    for r in s["top"][:10]:
        lines.append(f"    {r['ms']:8.2f} ms {r['runs']:5.0f}x {r['kind'][:26]:26s} {r['name'][:36]:36s} {r['op_name'][-60:]}")
    return "\n".join(lines)
