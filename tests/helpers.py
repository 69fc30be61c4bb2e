"""Small configs and batches shared by the tests."""

from __future__ import annotations

import numpy as np

from t5x_lite.config import load_config

TINY = [
    "model.d_model=32", "model.num_heads=4", "model.d_ff=64", "model.num_layers=2", "model.vocab_size=61",
    "model.max_length=64", "data.seq_len=16", "data.target_len=16", "train.batch_size=8", "train.steps=3",
    "optim.warmup_steps=1", "optim.learning_rate=1e-2",
]


def tiny_cfg(family: str = "decoder", *overrides: str):
    extra = []
    if family == "encoder_decoder":
        extra = ["model.position=relative"]
    if family == "encoder":
        extra = ["model.position=learned"]
    return load_config(None, TINY + [f"model.family={family}"] + extra + list(overrides))


def random_batch(cfg, seed: int = 0, packed: bool = True) -> dict:
    """A batch in the train step's format: random tokens, two documents per row when packed."""
    from t5x_lite.trainer import batch_shapes

    rng = np.random.default_rng(seed)
    out = {}
    for key, spec in batch_shapes(cfg).items():
        b, n = spec.shape
        if key.endswith("segment_ids"):
            cut = n // 2 + 1 if packed else n
            seg = np.where(np.arange(n) < cut, 1, 2 if packed else 1)
            seg[-2:] = 0  # trailing padding
            out[key] = np.broadcast_to(seg, (b, n)).astype(np.int32).copy()
        elif key.endswith("positions"):
            continue
        elif key == "weights":
            out[key] = np.ones((b, n), np.float32)
        elif key == "prefix_mask":
            out[key] = np.zeros((b, n), bool)
            out[key][:, :4] = True
        else:
            out[key] = rng.integers(5, cfg.model.vocab_size, (b, n)).astype(np.int32)
    for prefix in ("", "encoder_"):
        seg = out.get(prefix + "segment_ids")
        if seg is not None:
            out[prefix + "positions"] = positions_from_segments(seg)
            if prefix == "":
                out["weights"] = (seg > 0).astype(np.float32)
    if cfg.objective == "mlm":  # like the objective: round(rate x m) of a row's m tokens are scored
        keys = np.where(out["weights"] > 0, rng.random(out["weights"].shape), np.inf)
        wanted = np.round(cfg.data.mlm_rate * out["weights"].sum(-1, keepdims=True))
        out["weights"] = (np.argsort(np.argsort(keys, -1), -1) < wanted).astype(np.float32)
    return out


def positions_from_segments(seg: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... restarting at every change of segment id; 0 on padding."""
    pos = np.zeros_like(seg)
    for r in range(seg.shape[0]):
        count = 0
        for c in range(seg.shape[1]):
            if c > 0 and seg[r, c] != seg[r, c - 1]:
                count = 0
            pos[r, c] = count if seg[r, c] else 0
            count += 1
    return pos


def undo_span_corruption(inputs, targets, sentinels) -> list:
    """The raw tokens behind span-corrupted ``inputs``/``targets`` (both end with eos, dropped):
    each sentinel in the inputs is replaced by the tokens that follow it in the targets."""
    fill, current = {}, None
    for t in targets[:-1]:
        if t in sentinels:
            current = t
            fill[current] = []
        else:
            fill[current].append(int(t))
    out = []
    for t in inputs[:-1]:
        out.extend(fill[t] if t in sentinels else [int(t)])
    return out


def cudnn_as_xla(monkeypatch):
    """``attention=auto`` believes it runs on a GPU, and jax's XLA reference (float32 allowed)
    stands behind every ``jax.nn.dot_product_attention`` call meant for cuDNN; records each call's
    mask type (``padding`` / ``causal`` with lengths, ``mask`` without), the bias's shape (None
    without one) and the query length."""
    import jax
    import jax.numpy as jnp

    from t5x_lite.models import layers

    seen, real = [], jax.nn.dot_product_attention

    def recorded(q, k, v, bias=None, mask=None, **kw):
        kind = "mask" if kw.get("query_seq_lengths") is None else ("causal" if kw.get("is_causal") else "padding")
        seen.append((kind, None if bias is None else tuple(bias.shape), q.shape[1]))
        return real(q, k, v, bias, mask, **kw)

    monkeypatch.setattr(layers, "on_gpu", lambda: True)
    monkeypatch.setattr(layers, "CUDNN_IMPL", "xla")
    monkeypatch.setattr(layers, "CUDNN_DTYPES", layers.CUDNN_DTYPES + (jnp.float32,))
    monkeypatch.setattr(jax.nn, "dot_product_attention", recorded)
    return seen
