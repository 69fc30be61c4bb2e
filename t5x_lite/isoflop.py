"""``t5x-lite sweep --budgets``: isoFLOP profiles, the measurement behind ``N_opt(C)``.

A ladder at a fixed tokens-per-parameter ratio (``t5x_lite.sweep``) cannot tell which model
size a compute budget should buy: every rung is told its ratio. Here each *budget* C (FLOPs)
trains every size of the ladder for ``C / train_flops_per_step`` steps, so small models see
many tokens and large ones few. Final eval loss against ``ln N`` is about a parabola near its
minimum (Chinchilla's approach 2); its vertex is the compute-optimal size at that budget.
Vertices of several budgets give ``N_opt(C) = k C^alpha`` and the compute-optimal tokens per
parameter, ``D_opt / N_opt``, measured instead of assumed.

Rules, fixed in code:

- a (budget, size) of fewer than ``MIN_STEPS`` steps is not trained (warmup alone would be most
  of it), and neither is one that would read the training rows more than ``REPEAT_EPOCHS`` times
  (repeated tokens are worth less; the profile would tilt toward large models) when the rows
  per epoch are known from an earlier run;
- a budget's parabola goes through its lowest loss and up to ``WINDOW`` = 2 sizes on each side
  (3 at least; the lowest loss must not be at either end of the ladder); its vertex counts only
  if the parabola opens upward and the vertex lies inside those sizes (else the log says which
  way to extend the ladder). The window was added after a first CPU run, in which one parabola
  through all 5 sizes of a budget was pulled off its minimum by sizes 4x away from it;
- ``N_opt(C)`` is a least-squares line in log-log space through the counted vertices (2 or more).

Results go into ``WORKDIR/isoflop.json`` after each run (a rerun trains only what is missing)
and ``WORKDIR/isoflop.png``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Optional, Sequence

import numpy as np

from t5x_lite.config import Config, ConfigError
from t5x_lite.metrics import REPEAT_EPOCHS, tokens_per_step, train_flops_per_step

ISOFLOP_FILE = "isoflop.json"
ISOFLOP_PLOT = "isoflop.png"
MIN_STEPS = 50
WINDOW = 2  # sizes on each side of a budget's lowest loss that its parabola goes through


def parse_budgets(text: str) -> list[float]:
    try:
        budgets = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--budgets expects comma-separated FLOP counts such as 1e11,3e11,1e12; got {text!r}") from None
    if not budgets or min(budgets) <= 0:
        raise ConfigError(f"--budgets needs positive FLOP counts such as 1e11,3e11,1e12; got {text!r}")
    return budgets


def budget_entry(base: Config, size: int, budget: float) -> dict:
    """One (budget, size): its config (``budget / FLOPs per step`` steps) and counts."""
    from t5x_lite.planning import param_counts
    from t5x_lite.sweep import size_config, with_steps

    shape = size_config(base, size)
    steps = max(1, round(budget / train_flops_per_step(shape)))
    cfg = with_steps(shape, base, steps)
    params = param_counts(shape)["total"]
    tokens = steps * tokens_per_step(cfg)
    return {"size": size, "budget": budget, "cfg": cfg, "num_params": params, "steps": steps, "tokens": tokens,
            "tokens_per_param": tokens / params, "compute": train_flops_per_step(cfg) * steps}


def fit_profile(num_params: Sequence[float], losses: Sequence[float], window: int = WINDOW) -> dict:
    """Parabola of loss in ``ln N`` through the lowest point and up to ``window`` sizes on each
    side of it (far from the minimum a profile is not a parabola); its vertex when it opens
    upward and lies inside those sizes."""
    order = np.argsort(np.asarray(num_params, float))
    x, y = np.log(np.asarray(num_params, float))[order], np.asarray(losses, float)[order]
    if len(x) < 3:
        return {"ok": False, "why": f"{len(x)} sizes trained at this budget; a parabola needs 3"}
    best = int(np.argmin(y))
    if best in (0, len(x) - 1):
        side = "smaller" if best == 0 else "larger"
        return {"ok": False, "why": f"the lowest loss is at the {side.replace('er', 'est')} size tried: add {side} sizes"}
    lo, hi = max(0, best - window), min(len(x), best + window + 1)
    x, y = x[lo:hi], y[lo:hi]
    p2, p1, p0 = np.polyfit(x, y, 2)
    out = {"coef": [float(p2), float(p1), float(p0)], "fit_params": [float(v) for v in np.exp(x)]}
    if p2 <= 0:
        return dict(out, ok=False, why="the losses do not curve upward on both sides: no minimum among these sizes; "
                                      "add sizes on the side where the loss still falls")
    vertex = -p1 / (2 * p2)
    if not x.min() <= vertex <= x.max():
        side = "smaller" if vertex < x.min() else "larger"
        return dict(out, ok=False, why=f"the minimum lies beyond the sizes tried: add {side} sizes")
    return dict(out, ok=True, n_opt=float(math.exp(vertex)), loss_opt=float(p0 + p1 * vertex + p2 * vertex ** 2))


def fit_n_opt(budgets: Sequence[float], n_opt: Sequence[float]) -> dict:
    alpha, log_k = np.polyfit(np.log(np.asarray(budgets, float)), np.log(np.asarray(n_opt, float)), 1)
    return {"k": float(math.exp(log_k)), "alpha": float(alpha)}


def _key(budget: float, size: int, seed: int) -> str:
    return f"{budget:.3g}/{size}/{seed}"


def run_isoflop(base: Config, sizes: Sequence[int], budgets: Sequence[float], workdir: str, seeds: int = 1,
                train_fn: Optional[Callable] = None, log: Callable[[str], None] = print) -> dict:
    """Train every (budget, size, seed) the rules admit and that ``isoflop.json`` lacks, fit each
    budget's profile and ``N_opt(C)``; write ``isoflop.json`` and ``isoflop.png``."""
    from t5x_lite.data.shards import write_json
    from t5x_lite.sweep import train_run

    if seeds < 1:
        raise ConfigError(f"--seeds={seeds} must be 1 or more")
    if base.data.eval_fraction <= 0 or not base.train.eval_batches:
        raise ConfigError("isoFLOP profiles compare final eval losses: set data.eval_fraction > 0 and "
                          "train.eval_batches > 0")
    entries = [budget_entry(base, s, b) for b in budgets for s in sorted(set(sizes))]  # errors before any work
    path = os.path.join(workdir, ISOFLOP_FILE)
    state = {"base_seed": base.train.seed, "runs": {}, "profiles": {}, "n_opt": None}
    if os.path.exists(path):
        with open(path) as f:
            state = json.load(f)
    if train_fn is None:
        from t5x_lite.trainer import train as train_fn

    seed_list = [base.train.seed + j for j in range(seeds)]
    todo = []
    for e in entries:
        if e["steps"] < MIN_STEPS:
            log(f"[isoflop] C={e['budget']:.3g} size {e['size']}: {e['steps']} steps < {MIN_STEPS}, not trained")
            continue
        todo += [(e, seed) for seed in seed_list if _key(e["budget"], e["size"], seed) not in state["runs"]]
    for i, (e, seed) in enumerate(todo):
        rows = _rows_per_epoch(state)
        epochs = e["steps"] * e["cfg"].train.batch_size / rows if rows else None
        if epochs is not None and epochs > REPEAT_EPOCHS:
            log(f"[isoflop] C={e['budget']:.3g} size {e['size']}: would read the training rows {epochs:.1f} times "
                f"(> {REPEAT_EPOCHS}), not trained")
            continue
        name = f"c{e['budget']:.3g}_size_{e['size']}_seed{seed}".replace("+", "")
        log(f"[isoflop] {i + 1}/{len(todo)}: C={e['budget']:.3g} size {e['size']} seed {seed}: "
            f"{e['num_params']:,} params x {e['tokens']:,} tokens ({e['tokens_per_param']:.1f} per param) in "
            f"{e['steps']:,} steps -> {os.path.join(workdir, name)}")
        one = train_run(e["cfg"], seed, workdir, name, [r["workdir"] for r in state["runs"].values()], train_fn,
                        lambda m: log(f"[isoflop] {m}"))
        if one is None:
            return state
        run = dict({k: e[k] for k in ("budget", "size", "num_params", "steps", "tokens", "tokens_per_param",
                                      "compute")}, seed=seed, **one)
        state["runs"][_key(e["budget"], e["size"], seed)] = run
        write_json(path, state)
        log(f"[isoflop] C={e['budget']:.3g} size {e['size']} seed {seed}: eval loss {run['eval_loss']:.4f} in "
            f"{run['seconds']:.0f} s")
    _fit(state, log)
    write_json(path, state)
    plot_isoflop(state, os.path.join(workdir, ISOFLOP_PLOT))
    log(f"[isoflop] wrote {path} and {os.path.join(workdir, ISOFLOP_PLOT)}")
    return state


def _rows_per_epoch(state: dict) -> Optional[float]:
    known = [r["rows_per_epoch"] for r in state["runs"].values() if r.get("rows_per_epoch")]
    return float(np.median(known)) if known else None


def _means(state: dict) -> dict:
    """``{budget: [(size, params, tokens/param, mean loss, seeds)]}`` over the recorded runs."""
    by = {}
    for r in state["runs"].values():
        by.setdefault(r["budget"], {}).setdefault(r["size"], []).append(r)
    return {b: [(s, rs[0]["num_params"], rs[0]["tokens_per_param"], float(np.mean([r["eval_loss"] for r in rs])),
                 len(rs)) for s, rs in sorted(sizes.items())] for b, sizes in sorted(by.items())}


def _fit(state: dict, log: Callable) -> None:
    state["profiles"], state["n_opt"] = {}, None
    good = []
    for budget, rows in _means(state).items():
        log(f"[isoflop] C={budget:.3g}: " + ", ".join(f"size {s} ({n:,} params, {tpp:.1f} tok/param) {loss:.4f}"
                                                    for s, n, tpp, loss, _ in rows))
        prof = fit_profile([r[1] for r in rows], [r[3] for r in rows])
        state["profiles"][f"{budget:.6g}"] = dict(prof, budget=budget)
        if prof["ok"]:
            tpp = budget / (6 * prof["n_opt"] ** 2)
            prof.update(tokens_per_param_opt=tpp)
            good.append((budget, prof["n_opt"]))
            log(f"[isoflop] C={budget:.3g}: N_opt = {prof['n_opt']:,.0f} params (loss {prof['loss_opt']:.4f}), "
                f"about {tpp:.1f} tokens per parameter")
        else:
            log(f"[isoflop] C={budget:.3g}: no N_opt: {prof['why']}")
    if len(good) >= 2:
        state["n_opt"] = dict(fit_n_opt(*zip(*good)), budgets=[b for b, _ in good])
        log(f"[isoflop] N_opt(C) = {state['n_opt']['k']:.3g} C^{state['n_opt']['alpha']:.3f} over "
            f"{len(good)} budgets (Chinchilla: C^0.50)")
    else:
        log(f"[isoflop] N_opt(C) needs 2 budgets with a minimum inside their sizes; {len(good)} so far")


def plot_isoflop(state: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_p, ax_n) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (budget, rows) in enumerate(_means(state).items()):
        color = f"C{i}"
        n = np.array([r[1] for r in rows], float)
        ax_p.plot(n, [r[3] for r in rows], "o", color=color, label=f"C = {budget:.2g} FLOPs")
        prof = state["profiles"].get(f"{budget:.6g}", {})
        if "coef" in prof:
            xs = np.geomspace(min(prof["fit_params"]), max(prof["fit_params"]), 100)
            ax_p.plot(xs, np.polyval(prof["coef"], np.log(xs)), "-", color=color, alpha=0.6)
        if prof.get("ok"):
            ax_p.plot([prof["n_opt"]], [prof["loss_opt"]], "*", ms=14, color=color)
    ax_p.set(xscale="log", xlabel="parameters N", ylabel="final eval loss", title="isoFLOP profiles (* = N_opt)")
    ax_p.legend(fontsize=8)
    ax_p.grid(alpha=0.3, which="both")
    good = [(p["budget"], p["n_opt"]) for p in state["profiles"].values() if p.get("ok")]
    if good:
        ax_n.plot(*zip(*good), "*", ms=12, color="C3", label="N_opt of each budget")
    if state.get("n_opt"):
        k, alpha = state["n_opt"]["k"], state["n_opt"]["alpha"]
        xs = np.geomspace(min(b for b, _ in good) / 2, max(b for b, _ in good) * 2, 50)
        ax_n.plot(xs, k * xs ** alpha, "-", color="C1", label=f"N_opt = {k:.3g} C^{alpha:.3f}")
    ax_n.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel="N_opt", title="N_opt(C)")
    if good:
        ax_n.legend(fontsize=8)
    ax_n.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
