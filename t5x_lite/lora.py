"""LoRA (``model.lora_rank``): which parameters train, and merging adapters into their kernels.

With LoRA every projection named in ``model.lora_targets`` adds ``x A B * alpha / rank`` to its
output (``layers.Dense``); ``A`` and ``B`` are the only parameters that train. The train step
differentiates the loss with respect to the adapters alone (the other parameters are constants
to it: no weight gradient is computed or accumulated for them) and the optimizer sets their
updates to zero, keeping no state for them. ``merge`` folds the adapters into the kernels (Hugging Face export).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

LORA_LEAVES = ("lora_a", "lora_b")


def is_lora(path) -> bool:
    return getattr(path[-1], "key", None) in LORA_LEAVES


def labels(params):
    """``"lora"`` on the adapters' leaves, ``"frozen"`` on the rest."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "lora" if is_lora(path) else "frozen", params)


def adapters(tree):
    """``tree`` (params, or anything shaped like them) with None in place of every non-adapter leaf."""
    return jax.tree_util.tree_map_with_path(lambda path, x: x if is_lora(path) else None, tree)


def trained(cfg, tree):
    """What of ``tree`` (params, or shaped like them) trains: the adapters under LoRA, else all of it."""
    return adapters(tree) if cfg.model.lora_rank else tree


def with_frozen(adapter_tree, params):
    """The full parameters: ``adapter_tree``'s leaves where it has them, ``params``' elsewhere."""
    return jax.tree.map(lambda a, p: p if a is None else a, adapter_tree, params, is_leaf=lambda x: x is None)


def zeros_for_frozen(adapter_grads, params):
    """Gradients of the full parameters: the adapters', zeros for the rest (the optimizer ignores them)."""
    return jax.tree.map(lambda g, p: jnp.zeros_like(p) if g is None else g, adapter_grads, params,
                        is_leaf=lambda x: x is None)


def only_adapters(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` on the adapters; zero updates and no state for the frozen parameters."""
    return optax.multi_transform({"lora": tx, "frozen": optax.set_to_zero()}, labels)


def merge(params, scale: float) -> dict:
    """Host copies of ``params`` with each ``A B * scale`` added to its kernel and the adapters
    dropped: the plain model (scanned layers too: a leading layers axis on all three)."""
    flat = flax.traverse_util.flatten_dict(jax.device_get(params), sep="/")
    out = {k: np.asarray(v) for k, v in flat.items() if k.rsplit("/", 1)[-1] not in LORA_LEAVES}
    for key in [k for k in flat if k.endswith("/lora_a")]:
        base = key[: -len("lora_a")]
        a, b = (np.asarray(flat[base + name], np.float32) for name in LORA_LEAVES)
        kernel = out[base + "kernel"]
        lead = a.ndim + b.ndim - 2 - kernel.ndim  # the layers axis when scanned
        n = int(np.prod(a.shape[:lead], dtype=np.int64))
        delta = np.matmul(a.reshape(n, -1, a.shape[-1]), b.reshape(n, b.shape[lead], -1)) * scale
        out[base + "kernel"] = (kernel.astype(np.float32) + delta.reshape(kernel.shape)).astype(kernel.dtype)
    return flax.traverse_util.unflatten_dict(out, sep="/")
