"""One mesh, one rules table, and ZeRO stages as sharding choices.

Every parameter carries logical axis names (``embed``, ``heads``, ``mlp``, ...). The table
below maps them onto the mesh axes ``data``, ``fsdp``, ``tensor``. Shardings of parameters,
gradients and optimizer state are all *derived* from it:

======  ==========================  ================================  ===========================
stage   parameters                  gradients (fed to the optimizer)  optimizer state
======  ==========================  ================================  ===========================
0       replicated                  all-reduced, replicated           replicated
1       replicated                  all-reduced, replicated           sharded over ``fsdp``
2       replicated                  reduce-scattered (= opt. state)   sharded over ``fsdp``
3       sharded over ``fsdp``       reduce-scattered                  sharded over ``fsdp``
======  ==========================  ================================  ===========================

The only difference between the stages is where the logical ``embed`` axis (present in every
weight matrix) is placed: on ``fsdp`` or nowhere. Tensor parallelism (``tensor`` > 1) always
splits ``heads``, ``kv_heads``, ``mlp`` and ``vocab`` (Megatron-style). The batch is split over
``data`` x ``fsdp``: both are data-parallel axes; ``fsdp`` is the one ZeRO shards state over,
and ``data`` x ``fsdp`` is the FSDP paper's hybrid sharding factor. Under stage 3, XLA gathers
each layer's weights inside the layer scan, just before use, and frees them afterwards.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t5x_lite.config import Config, ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


# ------------------------------------------------------------------------------ mesh


def resolve_mesh_shape(cfg: Config, num_devices: int) -> tuple[int, int, int]:
    """Mesh sizes with ``-1`` filled in; a clear error when they cannot cover ``num_devices``."""
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"mesh.data={cfg.mesh.data}, mesh.fsdp={cfg.mesh.fsdp}, mesh.tensor={cfg.mesh.tensor}: the fixed "
                f"sizes multiply to {known}, which does not divide the {num_devices} devices"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh.data={sizes[0]} x mesh.fsdp={sizes[1]} x mesh.tensor={sizes[2]} = {math.prod(sizes)} devices, "
            f"but {num_devices} are available; set one axis to -1 (e.g. --set mesh.fsdp=-1) or make them "
            f"multiply to {num_devices}"
        )
    return tuple(sizes)


def validate_for_mesh(cfg: Config, mesh_shape: Sequence[int]) -> None:
    """Divisibility checks that depend on the mesh; raised before anything compiles."""
    data, fsdp, tensor = mesh_shape
    m, t = cfg.model, cfg.train
    errors = []
    shards = data * fsdp
    per_micro = t.batch_size // t.micro_batches
    if t.batch_size % (shards * t.micro_batches):
        fits = [b for b in range(shards * t.micro_batches, 4 * t.batch_size + 1, shards * t.micro_batches)]
        errors.append(
            f"train.batch_size={t.batch_size} must split into train.micro_batches={t.micro_batches} micro-batches "
            f"of a multiple of mesh.data x mesh.fsdp = {shards} sequences (got {per_micro} per micro-batch); "
            f"batch sizes that fit: {fits[:6]}..."
        )
    if m.num_heads % tensor:
        ok = [k for k in range(1, m.num_heads + 1) if m.num_heads % k == 0]
        errors.append(f"model.num_heads={m.num_heads} is not divisible by mesh.tensor={tensor}; "
                      f"tensor sizes that fit: {ok}")
    if m.d_ff % tensor:
        errors.append(f"model.d_ff={m.d_ff} is not divisible by mesh.tensor={tensor}")
    if errors:
        raise ConfigError("config does not fit the mesh:\n  - " + "\n  - ".join(errors))


def make_mesh(cfg: Config, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh over ``devices`` (default: every process's devices).

    Devices are ordered by (process, id) and laid out row-major, so ``tensor`` and then
    ``fsdp`` vary fastest: they stay inside a host (fast links) and ``data`` spans hosts.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(cfg, len(devices))
    validate_for_mesh(cfg, shape)
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


# ----------------------------------------------------------------------------- rules


def logical_rules(cfg: Config, mesh: Optional[Mesh] = None, *, optimizer: bool = False) -> tuple:
    """The logical-axis -> mesh-axis table.

    ``optimizer=True`` gives the table for optimizer state (and, from stage 2, gradients):
    it shards ``embed`` from stage 1 on, the parameter table only at stage 3.
    """
    stage = cfg.sharding.zero_stage
    shard_embed = stage >= 1 if optimizer else stage == 3
    zero_axes: Any = ("data", "fsdp") if (optimizer and cfg.sharding.shard_opt_over_data) else "fsdp"
    tensor = mesh.shape["tensor"] if mesh is not None else 1
    m = cfg.model

    def tp(size: int):  # tensor-parallel only along dimensions it divides
        return "tensor" if size % tensor == 0 else None

    return (
        # activations
        ("act_batch", BATCH_AXES),
        ("act_length", None),
        ("act_embed", None),
        ("act_heads", tp(m.num_heads)),
        ("act_kv_heads", tp(m.kv_heads)),
        ("act_kv", None),
        ("act_mlp", tp(m.d_ff)),
        ("act_vocab", tp(m.vocab_size)),
        # parameters
        ("embed", zero_axes if shard_embed else None),
        ("vocab", tp(m.vocab_size)),
        ("heads", tp(m.num_heads)),
        ("kv_heads", tp(m.kv_heads)),
        ("mlp", tp(m.d_ff)),
        ("kv", None),
        ("norm", None),
        ("layers", None),
        ("relpos_buckets", None),
        ("abspos", None),
    )


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drop mesh axes from dimensions they do not divide (e.g. a 2-wide dim on 8 devices)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        kept = []
        for name in names:
            if dim % (math.prod(mesh.shape[n] for n in kept) * mesh.shape[name]) == 0:
                kept.append(name)
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return P(*out)


def shardings_from_logical(abstract_boxed, mesh: Mesh, rules: tuple):
    """NamedShardings for a tree of boxed (logically partitioned) abstract arrays."""
    specs = nn.get_partition_spec(abstract_boxed)
    unboxed = nn.meta.unbox(abstract_boxed)

    def one(spec, leaf):
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if spec is not None else P()
        return NamedSharding(mesh, _fit_spec(mesh_spec, leaf.shape, mesh))

    return jax.tree.map(one, specs, unboxed, is_leaf=lambda x: isinstance(x, P))


def _path_key(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def opt_state_shardings(abstract_opt_state, abstract_params_boxed, mesh: Mesh, rules: tuple):
    """Shard each optimizer-state leaf like the parameter it belongs to.

    A leaf belongs to a parameter when the parameter's tree path is a suffix of the leaf's
    path and the shapes agree (Adam's ``mu``/``nu``); anything else (step counts, Adafactor's
    factored row/column statistics) is small and stays replicated.
    """
    param_shardings = shardings_from_logical(abstract_params_boxed, mesh, rules)
    flat_shardings = jax.tree_util.tree_flatten_with_path(param_shardings)[0]
    shapes = [leaf.shape for leaf in jax.tree.leaves(nn.meta.unbox(abstract_params_boxed))]
    by_path = {_path_key(path): (sharding, shape) for (path, sharding), shape in zip(flat_shardings, shapes)}
    replicated = NamedSharding(mesh, P())

    def one(path, leaf):
        key = _path_key(path)
        for start in range(len(key)):
            hit = by_path.get(key[start:])
            if hit is not None and tuple(hit[1]) == tuple(leaf.shape):
                return hit[0]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Every batch array is ``[B, ...]`` split over ``data`` x ``fsdp``."""
    return NamedSharding(mesh, P(BATCH_AXES))


def bytes_per_device(abstract_tree, shardings) -> int:
    """Bytes one device holds of ``abstract_tree`` under ``shardings`` (the largest shard)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        shard = sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def describe_mesh(mesh: Mesh) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
