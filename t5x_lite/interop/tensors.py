"""Safetensors files of a Hugging Face model directory, read lazily and written in one file.

Names, dtypes and shapes come from the file headers, so a checkpoint can be checked against a
config before a single tensor is read. ``safetensors.numpy`` reads every dtype numpy has;
bfloat16 tensors (numpy has none) go through ``safetensors.flax`` on the CPU. No torch needed.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np

from t5x_lite.config import ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
_RENAMES = ((".gamma", ".weight"), (".beta", ".bias"))


class InteropError(ConfigError):
    """A Hugging Face directory that cannot be imported, or a model that cannot be exported."""


def _normalized(name: str) -> str:
    for old, new in _RENAMES:
        if name.endswith(old):
            return name[: -len(old)] + new
    return name


class TensorFiles:
    """The tensors of ``path`` (``model.safetensors`` or shards listed in its index).

    ``strip`` is a prefix removed from the names that carry it (``bert.``, ``model.``...), so
    architectures can name the tensors of their base model one way whatever head was saved."""

    def __init__(self, path: str):
        from safetensors import safe_open

        index, single = os.path.join(path, INDEX_FILE), os.path.join(path, SINGLE_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            weight_map, files = None, [SINGLE_FILE]
        else:
            others = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
                      if os.path.exists(os.path.join(path, n))]
            hint = f" (found {', '.join(others)}: re-save it with safetensors)" if others else ""
            raise InteropError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
        self._where: dict[str, tuple[str, str]] = {}  # normalized name -> (file, name in file)
        self._meta: dict[str, tuple[str, tuple]] = {}  # normalized name -> (dtype, shape)
        for file in files:
            full = os.path.join(path, file)
            if not os.path.exists(full):
                raise InteropError(f"{INDEX_FILE} lists {file}, which is not in {path}")
            with safe_open(full, framework="numpy") as handle:
                for name in handle.keys():
                    part = handle.get_slice(name)
                    self._where[_normalized(name)] = (full, name)
                    self._meta[_normalized(name)] = (part.get_dtype(), tuple(part.get_shape()))
        if weight_map is not None:
            lost = sorted(n for n in weight_map if _normalized(n) not in self._meta)
            if lost:
                raise InteropError(f"{INDEX_FILE} lists tensors its shards lack: {_some(lost)}")
        self._handles: dict = {}

    def strip_prefix(self, prefix: str, keep: tuple = ()) -> None:
        """Drop ``prefix`` from every name that starts with it. Names starting with ``keep``
        (heads: ``cls.``, ``lm_head.``) never carry it: ``original`` leaves them alone."""
        for table in (self._where, self._meta):
            for name in [n for n in table if n.startswith(prefix)]:
                table[name[len(prefix):]] = table.pop(name)
        if any(stored.startswith(prefix) for _, stored in self._where.values()):
            self._stripped, self._keep = prefix, keep

    _stripped, _keep = "", ()

    def original(self, name: str) -> str:
        """The name as the checkpoint writes it (or would, for a tensor it lacks)."""
        if name in self._where:
            return self._where[name][1]
        return name if name.startswith(self._keep) else self._stripped + name

    def names(self) -> set[str]:
        return set(self._meta)

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def shape(self, name: str) -> tuple:
        return self._meta[name][1]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a numpy array (bfloat16 as ``ml_dtypes.bfloat16``)."""
        file, stored = self._where[name]
        bf16 = self._meta[name][0] == "BF16"
        key = (file, bf16)
        if key not in self._handles:
            from safetensors import safe_open

            self._handles[key] = safe_open(file, framework="flax" if bf16 else "numpy")
        if not bf16:
            return self._handles[key].get_tensor(stored)
        import jax

        with jax.default_device(jax.devices("cpu")[0]):
            return np.asarray(self._handles[key].get_tensor(stored))


def write(tensors: dict[str, np.ndarray], path: str) -> None:
    """One ``model.safetensors`` (``metadata format=pt``, which transformers expects), atomically."""
    os.makedirs(path, exist_ok=True)
    final = os.path.join(path, SINGLE_FILE)
    tmp = final + ".tmp"
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    if any(a.dtype.name == "bfloat16" for a in arrays.values()):
        import jax.numpy as jnp
        from safetensors.flax import save_file

        save_file({k: jnp.asarray(v) for k, v in arrays.items()}, tmp, metadata={"format": "pt"})
    else:
        from safetensors.numpy import save_file

        save_file(arrays, tmp, metadata={"format": "pt"})
    os.replace(tmp, final)


def _some(names: Iterable[str], limit: int = 8) -> str:
    names = list(names)
    more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
