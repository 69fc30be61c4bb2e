"""``t5x-lite sweep``: a ladder of model sizes, each trained by the real trainer on a
compute-matched budget, final eval loss against compute, and the scaling laws fitted to them.

**A size is a ``d_model``.** Everything else follows from the base config, so the ladder
changes width only and keeps the shape of the model:

- ``head_dim`` stays the base's, so ``num_heads = d_model / head_dim``; ``num_kv_heads`` is the
  largest divisor of ``num_heads`` that keeps the base's GQA group size or a larger one;
- ``d_ff = d_model x`` (base ``d_ff / d_model``), rounded to a multiple of 8;
- depth, vocabulary, sequence length, batch size and optimizer stay the base's.

**Budget.** Each size sees ``R x N`` tokens (N: all its parameters; R: ``--tokens-per-param``,
default 20, Chinchilla's compute-optimal ratio), i.e. ``ceil(R N / tokens_per_step)`` steps;
warmup keeps the base config's fraction of the steps; one eval at the end. A run's compute
is ``metrics.train_flops_per_step x steps``, the count the training log and ``plan`` use.

**Fits** (numpy only). ``L(C) = a C^-b + c``: for a fixed ``c``, ``log(L - c) = log a - b log C``
is linear least squares; ``c`` is chosen on a grid below ``min L`` by the squared error in L,
then refined by golden-section search. ``c`` is not held at or above 0: small models far
from the irreducible loss fall about linearly in log C, which the family reaches with
``c < 0``. The fit runs over every size recorded in ``sweep.json``. ``N_opt(C) = k C^alpha``:
least squares in log space over the runs. Every run sits on the R-tokens-per-parameter line,
so alpha near 0.5 restates that ratio; measuring it needs isoFLOP profiles (``--budgets``: ``t5x_lite.isoflop``; several R per
compute).

**Seeds.** ``--seeds K`` trains every size K times, with ``train.seed`` ... ``train.seed + K - 1``
(the seed draws the initial weights, the data order and the held-out documents); the fit uses
each size's mean eval loss, and the prediction carries a 90% bootstrap interval (every size's
seeds resampled with replacement, refitted, predicted). All runs read one tokenizer, the first
run's, so their losses per token compare. Each run records how many epochs of the training
rows it read: past about 4 (Muennighoff et al. 2023) repeated tokens are worth less than new
ones, which a law of compute alone does not model.

**Resume and checks.** Results go into ``WORKDIR/sweep.json`` after each size; a rerun skips
the sizes recorded there and resumes a size stopped half-way from its checkpoint. The
predicted loss of the next size up is stored; when a later sweep trains that size, the
prediction's error is recorded next to it. A rerun with a larger ``--seeds`` adds the missing
seeds to the sizes already trained.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from typing import Callable, Optional, Sequence

import numpy as np

from t5x_lite.config import Config, ConfigError, config_from_dict
from t5x_lite.data.shards import write_json
from t5x_lite.metrics import METRICS_FILE, REPEAT_EPOCHS, read_metrics, tokens_per_step, train_flops_per_step

SWEEP_FILE = "sweep.json"
PLOT_FILE = "sweep.png"
COMPARED_SECTIONS = ("model", "data", "train", "optim")  # a sweep dir keeps one base for these


# --------------------------------------------------------------------------- fits


def fit_loss_curve(compute: Sequence[float], loss: Sequence[float]) -> dict:
    """Least-squares ``L = a C^-b + c`` through the points: ``a, b, c`` and the root-mean-square
    error. ``c`` is free below the smallest loss: ``c < 0`` says the points are still far from
    the irreducible loss, where L falls about linearly in log C (``c`` then has no meaning of its
    own, the curve still predicts). Needs three points."""
    c_arr, l_arr = np.asarray(compute, float), np.asarray(loss, float)
    if len(c_arr) < 3:
        raise ValueError(f"fitting L(C) = a C^-b + c needs at least 3 points, got {len(c_arr)}")
    log_c = np.log(c_arr)
    x = log_c - log_c.mean()

    def fits(cs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each ``c``: the least-squares line ``log(L - c) = log a - b log C`` (closed form)
        and its squared error in L: ``(errors, a, b)``."""
        y = np.log(l_arr[None, :] - cs[:, None])
        slope = (y - y.mean(axis=1, keepdims=True)) @ x / (x @ x)
        log_a = y.mean(axis=1) - slope * log_c.mean()
        curve = np.exp(log_a[:, None] + slope[:, None] * log_c[None, :]) + cs[:, None]
        return np.sum((curve - l_arr[None, :]) ** 2, axis=1), np.exp(log_a), -slope

    def solve(c: float) -> tuple[float, float, float]:
        errors, a, b = fits(np.array([c]))
        return float(errors[0]), float(a[0]), float(b[0])

    top = float(l_arr.min())
    scale = max(top, float(l_arr.max()) - top)
    grid = top - scale * np.geomspace(1e-9, 1e3, 1200)  # c just below min L ... far below (log-linear)
    errors = fits(grid)[0]
    best = int(np.argmin(errors))
    lo, hi = grid[min(best + 1, len(grid) - 1)], grid[max(best - 1, 0)]
    c = _golden_section(lambda x: solve(x)[0], lo, hi)
    err, a, b = solve(c)
    if err > errors[best]:
        c = float(grid[best])
        err, a, b = solve(c)
    return {"a": a, "b": b, "c": float(c), "rmse": math.sqrt(err / len(c_arr))}


def _golden_section(f: Callable[[float], float], lo: float, hi: float, iters: int = 100) -> float:
    """Minimum of a unimodal ``f`` on ``[lo, hi]``."""
    ratio = (math.sqrt(5) - 1) / 2
    x1, x2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    f1, f2 = f(x1), f(x2)
    for _ in range(iters):
        if f1 < f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - ratio * (hi - lo)
            f1 = f(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + ratio * (hi - lo)
            f2 = f(x2)
    return (lo + hi) / 2


def predict_loss(fit: dict, compute: float) -> float:
    return fit["a"] * compute ** -fit["b"] + fit["c"]


def law_text(fit: dict) -> str:
    """The fitted law; near the ``c -> -inf`` limit (``b`` ~ 0) also its log-linear form
    ``L ~ (a + c) - a b ln(10) log10 C``, the one that carries meaning there."""
    text = f"{fit['a']:.4g} C^-{fit['b']:.4g} {'-' if fit['c'] < 0 else '+'} {abs(fit['c']):.4f}"
    if fit["b"] < 0.01:
        text += f" (~ {fit['a'] + fit['c']:.3f} - {fit['a'] * fit['b'] * math.log(10):.3f} log10 C)"
    return text


def fit_optimal_size(compute: Sequence[float], params: Sequence[float]) -> dict:
    """``N_opt(C) = k C^alpha`` by least squares in log space (two points or more)."""
    if len(compute) < 2:
        raise ValueError(f"fitting N_opt(C) needs at least 2 points, got {len(compute)}")
    alpha, log_k = np.polyfit(np.log(np.asarray(compute, float)), np.log(np.asarray(params, float)), 1)
    return {"k": math.exp(log_k), "alpha": float(alpha)}


# ------------------------------------------------------------------------- ladder


def base_head_dim(base: Config) -> int:
    return base.model.dim_per_head


def size_config(base: Config, size: int) -> Config:
    """The base config at ``d_model = size``, the other dimensions derived (module docstring)."""
    m = base.model
    head_dim = base_head_dim(base)
    if size <= 0 or size % head_dim:
        raise ConfigError(f"--sizes: {size} is not a positive multiple of the base head dim {head_dim} "
                          f"(d_model / num_heads = {m.d_model} / {m.num_heads}); try "
                          f"{', '.join(str(head_dim * k) for k in (2, 3, 4, 6, 8))}")
    heads = size // head_dim
    most_kv = max(1, heads * m.kv_heads // m.num_heads)  # the base's group size, or larger groups
    kv_heads = max(k for k in range(1, most_kv + 1) if heads % k == 0)
    model = dataclasses.replace(
        m, d_model=size, num_heads=heads, d_ff=max(8, round(size * m.d_ff / m.d_model / 8) * 8),
        num_kv_heads=None if m.num_kv_heads is None else kv_heads)
    return dataclasses.replace(base, model=model).validate()


def with_budget(cfg: Config, base: Config, tokens_per_param: float, num_params: int) -> Config:
    """``cfg`` trained on ``tokens_per_param x num_params`` tokens (``with_steps``)."""
    return with_steps(cfg, base, max(1, math.ceil(tokens_per_param * num_params / tokens_per_step(cfg))))


def with_steps(cfg: Config, base: Config, steps: int) -> Config:
    """``cfg`` trained for ``steps`` steps, warmup at the base's fraction of the steps, one eval
    at the end, a checkpoint every quarter."""
    warmup = round(base.optim.warmup_steps * steps / max(base.train.steps, 1))
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, steps=steps, eval_every=steps),
        optim=dataclasses.replace(cfg.optim, warmup_steps=min(warmup, steps)),
        checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=max(1, steps // 4), keep=1),
    ).validate()


def ladder_entry(base: Config, size: int, tokens_per_param: float) -> dict:
    """One rung: its config, parameters and budget (no training)."""
    from t5x_lite.planning import param_counts

    shape = size_config(base, size)
    counts = param_counts(shape)
    cfg = with_budget(shape, base, tokens_per_param, counts["total"])
    steps = cfg.train.steps
    return {"size": size, "cfg": cfg, "num_params": counts["total"], "non_embedding_params": counts["non_embedding"],
            "num_layers": cfg.model.num_layers, "num_heads": cfg.model.num_heads,
            "num_kv_heads": cfg.model.kv_heads, "d_ff": cfg.model.d_ff, "steps": steps,
            "tokens": steps * tokens_per_step(cfg), "compute": train_flops_per_step(cfg) * steps}


def next_size(sizes: Sequence[int], head_dim: int) -> int:
    """One geometric step above the largest size (``s_k^2 / s_(k-1)``), as a head-dim multiple."""
    s = sorted(sizes)
    step = s[-1] / s[-2] if len(s) > 1 else 2.0
    return max(s[-1] + head_dim, round(s[-1] * step / head_dim) * head_dim)


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--sizes expects comma-separated d_model values such as 64,96,128; got {text!r}") from None
    if not sizes:
        raise ConfigError("--sizes is empty; give comma-separated d_model values such as 64,96,128")
    return sizes


# --------------------------------------------------------------------------- state


def _public(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "cfg"}


def load_state(workdir: str, base: Config, tokens_per_param: float) -> dict:
    """``sweep.json`` of ``workdir`` (or a fresh one), after checking it was made with the same
    base config and tokens per parameter."""
    fresh = {"base": {s: base.to_dict()[s] for s in COMPARED_SECTIONS}, "tokens_per_param": tokens_per_param,
             "runs": {}, "predictions": {}, "checks": {}, "fit": None, "n_opt": None}
    path = os.path.join(workdir, SWEEP_FILE)
    if not os.path.exists(path):
        return fresh
    with open(path) as f:
        state = json.load(f)
    if state.get("tokens_per_param") != tokens_per_param:
        raise ConfigError(f"{path} was made with --tokens-per-param {state.get('tokens_per_param')}, not "
                          f"{tokens_per_param}; use that value or a new --workdir")
    saved = config_from_dict(state["base"])
    diffs = [f"{s}.{k}: {getattr(getattr(saved, s), k)!r} -> {v!r}" for s in COMPARED_SECTIONS
             for k, v in base.to_dict()[s].items() if getattr(getattr(saved, s), k) != v]
    if diffs:
        raise ConfigError(f"{path} holds a sweep of another base config; use a new --workdir or the saved "
                          "settings. Differences:\n  - " + "\n  - ".join(diffs))
    return state


def save_state(workdir: str, state: dict) -> None:
    write_json(os.path.join(workdir, SWEEP_FILE), state)  # atomic: a crash leaves the previous file


def _final_eval_loss(result: dict, run_dir: str, steps: int) -> float:
    """The eval loss at the last step: from the trainer's return value, else its metrics file
    (a size finished before a crash returns nothing when rerun)."""
    if result and "eval_loss" in result:
        return float(result["eval_loss"])
    rows = [r for r in read_metrics(os.path.join(run_dir, METRICS_FILE)) if r.get("step") == steps and "eval_loss" in r]
    if not rows:
        raise RuntimeError(f"{run_dir} finished without an eval loss at step {steps}: the sweep needs held-out "
                           "data (data.eval_fraction > 0)")
    return float(rows[-1]["eval_loss"])


def _share_tokenizer(workdir: str, run_dir: str, done: Sequence[str]) -> None:
    """Copy the tokenizer the first run trained into ``run_dir``: every size and seed then reads
    the corpus in the same tokens, so their losses per token compare."""
    target = os.path.join(run_dir, "tokenizer.model")
    for name in done:
        source = os.path.join(workdir, name, "tokenizer.model")
        if os.path.exists(source) and not os.path.exists(target):
            os.makedirs(run_dir, exist_ok=True)
            shutil.copyfile(source, target)
            return


def train_run(cfg: Config, seed: int, workdir: str, name: str, earlier: Sequence[str], train_fn: Callable,
              log: Callable[[str], None]) -> Optional[dict]:
    """Train ``cfg`` with ``seed`` in ``workdir/name`` (on the tokenizer of the ``earlier`` run dirs):
    ``{"eval_loss", "seconds", "workdir"[, "epochs", "rows_per_epoch"]}``, or None when the
    trainer stopped early (SIGTERM / SIGINT: the caller stops too, a rerun resumes)."""
    run_dir = os.path.join(workdir, name)
    _share_tokenizer(workdir, run_dir, earlier)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed)).validate()
    t0 = time.time()
    result = train_fn(cfg, run_dir)
    steps = cfg.train.steps
    if result and result.get("step", steps) < steps:
        log(f"stopped at step {result['step']} of {steps}; run the same command again to resume")
        return None
    one = {"eval_loss": _final_eval_loss(result, run_dir, steps), "seconds": time.time() - t0, "workdir": name}
    if result and result.get("epochs"):
        one.update(epochs=float(result["epochs"]), rows_per_epoch=steps * cfg.train.batch_size / result["epochs"])
    return one


def run_name(size: int, seed: int, base_seed: int) -> str:
    """``size_48`` for the base config's seed, ``size_48_seed1`` for the others."""
    return f"size_{size}" if seed == base_seed else f"size_{size}_seed{seed}"


def _summarise(run: dict) -> None:
    """The size's ``eval_loss`` (mean over its seeds), ``eval_loss_std`` and ``num_seeds``."""
    losses = [r["eval_loss"] for r in run["seeds"].values()]
    run.update(eval_loss=float(np.mean(losses)), eval_loss_std=float(np.std(losses, ddof=1)) if len(losses) > 1 else 0.0,
               num_seeds=len(losses), seconds=float(sum(r["seconds"] for r in run["seeds"].values())))


# ---------------------------------------------------------------------------- run


def run_sweep(base: Config, sizes: Sequence[int], workdir: str, tokens_per_param: float = 20.0,
              predict: Optional[int] = None, train_fn: Optional[Callable] = None,
              log: Callable[[str], None] = print, seeds: int = 1) -> dict:
    """Train every (size, seed) not yet in ``workdir/sweep.json`` (seeds ``train.seed`` ...
    ``train.seed + seeds - 1``), fit ``L(C)`` to each size's mean eval loss and ``N_opt(C)`` over
    all recorded sizes, predict the loss of ``predict`` (default: the next size up) with a
    bootstrap interval over seeds, write ``sweep.json`` and ``sweep.png``. ``train_fn(cfg,
    workdir) -> last metrics`` defaults to ``trainer.train``; when it stops early (SIGTERM /
    SIGINT), so does the sweep, to resume on a rerun. Returns the sweep state."""
    if tokens_per_param <= 0:
        raise ConfigError(f"--tokens-per-param={tokens_per_param} must be positive")
    if seeds < 1:
        raise ConfigError(f"--seeds={seeds} must be 1 or more")
    if base.data.eval_fraction <= 0 or not base.train.eval_batches:
        raise ConfigError("a sweep compares final eval losses: set data.eval_fraction > 0 and train.eval_batches > 0")
    ladder = [ladder_entry(base, s, tokens_per_param) for s in sorted(set(sizes))]  # all errors before any work
    if predict is not None:
        ladder_entry(base, predict, tokens_per_param)
    state = load_state(workdir, base, tokens_per_param)
    if train_fn is None:
        from t5x_lite.trainer import train as train_fn

    base_seed = base.train.seed
    wanted = [base_seed + j for j in range(seeds)]
    for run in state["runs"].values():  # sweep.json of one seed per size, before --seeds existed
        run.setdefault("seeds", {str(base_seed): {k: run[k] for k in ("eval_loss", "seconds", "workdir") if k in run}})
    todo = [(e, seed) for e in ladder for seed in wanted
            if str(seed) not in state["runs"].get(str(e["size"]), {}).get("seeds", {})]
    for e in ladder:
        run = state["runs"].get(str(e["size"]))
        if run and all(str(seed) in run["seeds"] for seed in wanted):
            log(f"[sweep] size {e['size']}: done earlier (eval loss {run['eval_loss']:.4f} over {run['num_seeds']} "
                "seed(s)), skipped")
    for i, (e, seed) in enumerate(todo):
        name = run_name(e["size"], seed, base_seed)
        log(f"[sweep] size {e['size']} seed {seed} ({i + 1}/{len(todo)} to train): {e['num_params']:,} params, "
            f"{e['num_layers']} layers x {e['num_heads']} heads, d_ff {e['d_ff']}; {e['tokens']:,} tokens in "
            f"{e['steps']:,} steps = {e['compute']:.3g} FLOPs -> {os.path.join(workdir, name)}")
        earlier = [r["workdir"] for run in state["runs"].values() for r in run["seeds"].values() if "workdir" in r]
        one = train_run(e["cfg"], seed, workdir, name, earlier, train_fn, lambda m: log(f"[sweep] size {e['size']} "
                                                                                       f"seed {seed} {m}"))
        if one is None:
            return state
        run = state["runs"].setdefault(str(e["size"]), dict(_public(e), seeds={}))
        run["seeds"][str(seed)] = one
        for key in ("epochs", "rows_per_epoch"):
            if key in one:
                run[key] = one[key]
        _summarise(run)
        _check_prediction(state, run, log)
        save_state(workdir, state)
        log(f"[sweep] size {e['size']} seed {seed}: eval loss {one['eval_loss']:.4f} in {one['seconds']:.0f} s"
            + (f" ({one['epochs']:.1f} epochs of the training data)" if "epochs" in one else ""))
    for run in state["runs"].values():
        _summarise(run)
    _fit_and_predict(state, base, tokens_per_param, predict, log)
    save_state(workdir, state)
    plot_sweep(state, os.path.join(workdir, PLOT_FILE))
    log(f"[sweep] wrote {os.path.join(workdir, SWEEP_FILE)} and {os.path.join(workdir, PLOT_FILE)}")
    return state


def _check_prediction(state: dict, run: dict, log: Callable) -> None:
    pred = state["predictions"].get(str(run["size"]))
    if pred is None:
        return
    error = (pred["loss"] - run["eval_loss"]) / run["eval_loss"]
    check = {"predicted": pred["loss"], "actual": run["eval_loss"], "relative_error": error,
             "from_sizes": pred["from_sizes"], "num_seeds": run["num_seeds"]}
    if "interval" in pred:
        lo, hi = pred["interval"]
        check.update(interval=pred["interval"], inside_interval=bool(lo <= run["eval_loss"] <= hi))
    state["checks"][str(run["size"])] = check
    log(f"[sweep] size {run['size']}: predicted {pred['loss']:.4f} from sizes {pred['from_sizes']}, got "
        f"{run['eval_loss']:.4f} over {run['num_seeds']} seed(s) ({error:+.1%})"
        + (f"; 90% bootstrap interval [{check['interval'][0]:.4f}, {check['interval'][1]:.4f}]" if "interval" in check
           else ""))


def bootstrap_interval(runs: Sequence[dict], target_compute: float, resamples: int = 200, seed: int = 0,
                       level: float = 0.9) -> Optional[tuple[float, float]]:
    """A ``level`` interval of the predicted loss at ``target_compute``: each resample draws every
    size's seeds with replacement, refits on the means and predicts. None with one seed per size."""
    per_size = [np.array([r["eval_loss"] for r in run["seeds"].values()]) for run in runs]
    if max(len(x) for x in per_size) < 2:
        return None
    rng = np.random.default_rng(seed)
    compute = [run["compute"] for run in runs]
    preds = []
    for _ in range(resamples):
        means = [x[rng.integers(0, len(x), len(x))].mean() for x in per_size]
        preds.append(predict_loss(fit_loss_curve(compute, means), target_compute))
    tail = (1 - level) / 2 * 100
    return float(np.percentile(preds, tail)), float(np.percentile(preds, 100 - tail))


def _fit_and_predict(state: dict, base: Config, tokens_per_param: float, predict: Optional[int], log: Callable) -> None:
    runs = sorted(state["runs"].values(), key=lambda r: r["compute"])
    compute = [r["compute"] for r in runs]
    log(f"[sweep] {'size':>6} {'params':>12} {'tokens':>12} {'epochs':>7} {'FLOPs':>10} {'eval loss':>10} "
        f"{'std':>7} seeds")
    for r in runs:
        epochs = f"{r['epochs']:.2f}" if "epochs" in r else "-"
        log(f"[sweep] {r['size']:>6} {r['num_params']:>12,} {r['tokens']:>12,} {epochs:>7} {r['compute']:>10.3g} "
            f"{r['eval_loss']:>10.4f} {r.get('eval_loss_std', 0.0):>7.4f} {r.get('num_seeds', 1)}")
    if len(runs) >= 2:
        state["n_opt"] = dict(fit_optimal_size(compute, [r["num_params"] for r in runs]),
                              sizes=[r["size"] for r in runs])
    if len(runs) < 3:
        log(f"[sweep] {len(runs)} size(s) trained: L(C) = a C^-b + c needs 3 or more to fit")
        return
    fit = fit_loss_curve(compute, [r["eval_loss"] for r in runs])
    state["fit"] = dict(fit, sizes=[r["size"] for r in runs])
    log(f"[sweep] fit over sizes {state['fit']['sizes']}: L(C) = {law_text(fit)} (rms error {fit['rmse']:.4f}); "
        f"N_opt(C) = {state['n_opt']['k']:.3g} C^{state['n_opt']['alpha']:.3f}")
    target = predict or next_size([r["size"] for r in runs], base_head_dim(base))
    entry = ladder_entry(base, target, tokens_per_param)
    loss = predict_loss(fit, entry["compute"])
    interval = bootstrap_interval(runs, entry["compute"])
    rows = [r["rows_per_epoch"] for r in runs if r.get("rows_per_epoch")]
    epochs = entry["steps"] * entry["cfg"].train.batch_size / float(np.median(rows)) if rows else None
    if str(target) not in state["runs"]:
        pred = {"loss": loss, "compute": entry["compute"], "num_params": entry["num_params"],
                "from_sizes": state["fit"]["sizes"], "fit": {k: fit[k] for k in ("a", "b", "c")}}
        if interval:
            pred["interval"] = list(interval)
        if epochs:
            pred["epochs"] = epochs
        state["predictions"][str(target)] = pred
    log(f"[sweep] predicted final eval loss of size {target} ({entry['num_params']:,} params, "
        f"{entry['compute']:.3g} FLOPs): {loss:.4f}"
        + (f" (90% bootstrap interval over seeds {interval[0]:.4f} .. {interval[1]:.4f})" if interval else ""))
    if epochs and epochs > REPEAT_EPOCHS:
        log(f"[sweep] warning: size {target} would read the training data {epochs:.1f} times; past ~{REPEAT_EPOCHS} "
            "epochs repeated tokens are worth less than new ones and the law of compute alone predicts too low a "
            "loss: use a larger corpus (t5x-lite prepare) or fewer --tokens-per-param")


def plot_sweep(state: dict, path: str) -> str:
    """Loss against compute with the fitted curve and predictions; parameters against compute
    with the N_opt fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(state["runs"].values(), key=lambda r: r["compute"])
    fig, (ax_l, ax_n) = plt.subplots(1, 2, figsize=(12, 4.5))
    compute = np.array([r["compute"] for r in runs])
    seeds = max(r.get("num_seeds", 1) for r in runs)
    ax_l.errorbar(compute, [r["eval_loss"] for r in runs], yerr=[r.get("eval_loss_std", 0.0) for r in runs], fmt="o",
                  color="C0", capsize=3, label="trained" + (f" (mean ± std of up to {seeds} seeds)" if seeds > 1 else ""))
    for r in runs:
        ax_l.annotate(str(r["size"]), (r["compute"], r["eval_loss"]), textcoords="offset points", xytext=(4, 4))
    preds = state["predictions"]
    if state["fit"]:
        fit = state["fit"]
        top = max([compute.max()] + [p["compute"] for p in preds.values()])
        xs = np.geomspace(compute.min() / 1.5, top * 1.5, 200)
        ax_l.plot(xs, predict_loss(fit, xs), "-", color="C1", label=f"fit {law_text(fit)}")
    for size, p in preds.items():
        sources = ",".join(str(x) for x in p["from_sizes"])
        lo, hi = p.get("interval", (p["loss"], p["loss"]))
        ax_l.errorbar([p["compute"]], [p["loss"]], yerr=[[p["loss"] - lo], [hi - p["loss"]]], fmt="s", mfc="none",
                      ms=9, color="C3", capsize=3, label=f"size {size} predicted from {sources}"
                      + (" (90% interval)" if "interval" in p else "")
                      + (f", {p['epochs']:.1f} epochs: past ~{REPEAT_EPOCHS}, expect worse"
                         if p.get("epochs", 0) > REPEAT_EPOCHS else ""))
    ax_l.set(xscale="log", xlabel="training compute C (FLOPs)", ylabel="final eval loss", title="L(C)")
    ax_l.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2))  # below: never over a point
    ax_l.grid(alpha=0.3, which="both")
    ax_n.plot(compute, [r["num_params"] for r in runs], "o", color="C0")
    if state["n_opt"]:
        k, alpha = state["n_opt"]["k"], state["n_opt"]["alpha"]
        xs = np.geomspace(compute.min() / 1.5, compute.max() * 1.5, 50)
        ax_n.plot(xs, k * xs ** alpha, "-", color="C1", label=f"N_opt = {k:.3g} C^{alpha:.3f}")
        ax_n.legend(fontsize=8)
    ax_n.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel="parameters N",
             title=f"N_opt(C) at {state['tokens_per_param']:g} tokens / parameter")
    ax_n.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def run_sweep_cli(args) -> int:
    """``t5x-lite sweep``."""
    from t5x_lite.config import load_config

    cfg = load_config(args.config, args.overrides)
    name = os.path.splitext(os.path.basename(args.config))[0]
    if args.budgets:
        from t5x_lite.isoflop import parse_budgets, run_isoflop

        given = [flag for flag, value in (("--tokens-per-param", args.tokens_per_param), ("--predict", args.predict))
                 if value is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)} belong to the fixed-ratio ladder; with --budgets every size's "
                              "tokens follow from the budget. Drop them, or drop --budgets")

        workdir = args.workdir or os.path.join("runs", "isoflop_" + name)
        run_isoflop(cfg, parse_sizes(args.sizes), parse_budgets(args.budgets), workdir, seeds=args.seeds)
        return 0
    workdir = args.workdir or os.path.join("runs", "sweep_" + name)
    tokens_per_param = 20.0 if args.tokens_per_param is None else args.tokens_per_param
    run_sweep(cfg, parse_sizes(args.sizes), workdir, tokens_per_param, args.predict, seeds=args.seeds)
    return 0
