"""What a run reports: log lines, ``metrics.jsonl``, TensorBoard events, a progress bar, plots,
and the FLOPs count behind MFU."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

from t5x_lite.config import Config

METRICS_FILE = "metrics.jsonl"


# ------------------------------------------------------------------------ FLOPs


def _layer_matmul_params(cfg: Config, cross: bool) -> int:
    """Weights one token's matmuls read in a layer; with ``cross``, also the cross-attention's
    query and output (its keys and values are projections of the encoder positions)."""
    m = cfg.model
    d, n, k, h, f = m.d_model, m.num_heads, m.kv_heads, m.dim_per_head, m.d_ff
    attn = d * n * h * 2 + d * k * h * 2  # q, out; k, v
    mlp = d * f * (3 if m.gated_mlp else 2)
    if m.num_experts:  # the router, the experts a token is sent to (not the dispatch einsums), a shared one
        per_width = mlp // f
        mlp = (d * m.num_experts + m.experts_per_token * per_width * m.expert_width
               + per_width * m.shared_expert_d_ff + (d if m.shared_expert_gate else 0))
    return attn + mlp + (d * n * h * 2 if cross else 0)


def _lora_params(cfg: Config, names: tuple) -> int:
    """Adapter weights (A and B) one token passes through in the projections ``names`` of a layer."""
    m = cfg.model
    d, f = m.d_model, m.d_ff
    q, kv = m.num_heads * m.dim_per_head, m.kv_heads * m.dim_per_head
    sizes = {"query": d + q, "key": d + kv, "value": d + kv, "out": q + d, "wo": f + d,
             "wi_0": d + f if m.gated_mlp else 0, "wi_1": d + f if m.gated_mlp else 0,
             "wi": 0 if m.gated_mlp else d + f}
    return m.lora_rank * sum(sizes[n] for n in names if n in m.lora_names)


def _matmul_flops(cfg: Config, frozen: float, adapters: float = 0.0) -> float:
    """Training FLOPs per token of matmul weights: 6 per weight (forward, input and weight
    gradients); a frozen one under LoRA needs no weight gradient: 4."""
    return (4 if cfg.model.lora_rank else 6) * frozen + 6 * adapters


def causal_keys_seen(length: int, window: int = 0, pattern: int = 0) -> float:
    """Keys a causal query sees on average: ``length / 2``; with a sliding ``window`` below the
    length, the mean of ``min(i, window)`` over ``[0, length]`` (``window - window^2 / (2 length)``);
    with a ``pattern`` P (``model.sliding_window_pattern``), over P - 1 windowed layers and a global one."""
    if not window or window >= length:
        return length / 2
    local = window - window * window / (2 * length)
    return ((pattern - 1) * local + length / 2) / pattern if pattern else local


def train_flops_per_step(cfg: Config) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward), as in PaLM/Chinchilla:
    6 x (matmul weights a token passes through) per token, plus attention scores and values
    (12 x keys seen x heads x head_dim per token and layer; a causal stack sees half its keys on
    average, fewer with ``model.sliding_window``). Embedding lookups are free; the output layer
    counts (d_model x vocab, plus BERT's d_model x d_model transform). Cross-attention keys and
    values are projected once per encoder position and decoder layer. A mixture of experts
    counts its router and the ``k`` experts each token goes to: the model's FLOPs, not the
    extra a capacity above one (``model.expert_capacity_factor``) or the dispatch costs. The same count serves
    ``plan`` and the training log's MFU. With LoRA (``model.lora_rank``) the frozen weights
    count 4 (no weight gradient) and the adapters 6, less the input gradient of each stack's
    first q / k / v (it would only reach the frozen embeddings)."""
    m, b = cfg.model, cfg.train.batch_size
    attn_width = m.num_heads * m.dim_per_head
    self_names, cross_q = ("query", "key", "value", "out", "wi_0", "wi_1", "wi", "wo"), ("query", "out")
    layer = _matmul_flops(cfg, _layer_matmul_params(cfg, False), _lora_params(cfg, self_names))
    head = _matmul_flops(cfg, m.d_model * m.vocab_size + (m.d_model * m.d_model if m.mlm_head_transform else 0))
    first_qkv = 2 * m.d_model * (attn_width + 2 * m.kv_heads * m.dim_per_head) if m.lora_rank else 0
    if m.family == "encoder_decoder":
        t_enc, t_dec = cfg.data.seq_len, target_length(cfg)
        cross_kv = m.decoder_layers * _matmul_flops(cfg, 2 * m.d_model * m.kv_heads * m.dim_per_head,
                                                    _lora_params(cfg, ("key", "value")))
        enc = t_enc * (m.num_layers * layer + 12 * m.num_layers * t_enc * attn_width + cross_kv - first_qkv)
        dec_layer = layer + _matmul_flops(cfg, 2 * m.d_model * attn_width, _lora_params(cfg, cross_q))
        dec = t_dec * (m.decoder_layers * dec_layer + head - first_qkv
                       + 12 * m.decoder_layers * attn_width
                       * causal_keys_seen(t_dec, m.sliding_window, m.sliding_window_pattern)
                       + 12 * m.decoder_layers * t_enc * attn_width)  # cross-attention
        return float(b * (enc + dec))
    t = cfg.data.seq_len
    keys_seen = causal_keys_seen(t, m.sliding_window, m.sliding_window_pattern) if m.family == "decoder" else t
    per_token = m.num_layers * layer + head + 12 * m.num_layers * keys_seen * attn_width - first_qkv
    return float(b * t * per_token)


def target_length(cfg: Config) -> int:
    if cfg.data.target_len:
        return cfg.data.target_len
    if cfg.objective == "supervised":
        return cfg.data.seq_len
    from t5x_lite.objectives import span_corruption_raw_length

    return span_corruption_raw_length(cfg.data.seq_len, cfg.data.noise_density, cfg.data.mean_span_length)[1]


# Epochs of the training data past which repeated tokens are worth clearly less than new ones
# (Muennighoff et al. 2023): the trainer warns, sweeps flag or skip runs beyond it.
REPEAT_EPOCHS = 4


def tokens_per_step(cfg: Config) -> int:
    """Token positions one step processes (encoder + decoder positions for encoder_decoder)."""
    per_row = cfg.data.seq_len + (target_length(cfg) if cfg.model.family == "encoder_decoder" else 0)
    return cfg.train.batch_size * per_row


# Dense bf16 TFLOP/s per device, by a substring of ``jax.Device.device_kind``.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L4": 121.0}


def peak_flops(device_kind: str, configured_tflops: Optional[float] = None) -> Optional[float]:
    """FLOP/s one device can do at most (for MFU): the configured value, else the datasheet value
    of a known GPU, else None (no MFU is reported)."""
    if configured_tflops:
        return configured_tflops * 1e12
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in device_kind), None)


# ---------------------------------------------------------------------- logging


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class Logger:
    """Timestamped lines on stdout (through tqdm so a progress bar stays intact) and in
    ``train.log``; silent on processes other than 0."""

    def __init__(self, workdir: Optional[str] = None, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "train.log") if (workdir and enabled) else None

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        try:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stdout)
        except ImportError:  # pragma: no cover
            print(line, flush=True)
        sys.stdout.flush()
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors the scalars to
    TensorBoard. On resume, rows after ``resume_step`` (logged after the checkpoint the run
    restarts from) are dropped first, so no step appears twice."""

    def __init__(self, workdir: str, enabled: bool = True, resume_step: Optional[int] = None):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if not enabled:
            return
        if resume_step is not None and os.path.exists(self.path):
            truncate_metrics(self.path, resume_step)
        writer_cls = _summary_writer_class()
        self._tb = writer_cls(os.path.join(workdir, "tb")) if writer_cls is not None else None

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: (float(v) if not isinstance(v, str) else v) for k, v in scalars.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if self._tb is not None and k != "step" and isinstance(v, float) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch (tensorboardX imports torch only to
    accept torch tensors, which we never pass: that import costs seconds per process); None,
    with a notice, where tensorboardX is not installed."""
    import importlib

    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        return importlib.import_module("tensorboardX").SummaryWriter
    except ImportError:
        print("note: tensorboardX is not installed: no TensorBoard events (pip install tensorboardX)",
              file=sys.stderr)
        return None
    finally:
        if hide_torch:
            del sys.modules["torch"]


def read_metrics(path: str) -> list[dict]:
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut by a crash mid-write
                        continue
    return rows


def truncate_metrics(path: str, last_step: int) -> None:
    """Keep only rows with ``step <= last_step`` (atomic rewrite)."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, mininterval=0.5,
                unit="step", file=sys.stdout, leave=True)


# ------------------------------------------------------------------------- plot


def plot_metrics(workdir: str, output: Optional[str] = None) -> str:
    """Loss and eval loss (and each corpus's of a mixture), learning rate and tokens/s against
    step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(os.path.join(workdir, METRICS_FILE))
    if not rows:
        raise FileNotFoundError(f"no metrics in {os.path.join(workdir, METRICS_FILE)}: train first")

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if key in r and isinstance(r[key], (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    corpora = sorted({k for r in rows for k in r if k.startswith("eval_loss/")})  # data.mixture: a corpus each
    for key, style in [("loss", "-"), ("eval_loss", "o-")] + [(k, "o--") for k in corpora]:
        xs, ys = series(key)
        if xs:
            ax.plot(xs, ys, style, label=key, markersize=4)
    ax.set_title("loss")
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    for ax, key in zip(axes[1:], ("learning_rate", "tokens_per_sec")):
        xs, ys = series(key)
        ax.plot(xs, ys)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.abspath(workdir))
    fig.tight_layout()
    output = output or os.path.join(workdir, "metrics.png")
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
