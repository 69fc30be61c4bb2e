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
weight matrix) is placed: on the ZeRO axes (``fsdp``, or ``data`` x ``fsdp`` for the optimizer
state with ``sharding.shard_opt_over_data``) or nowhere. ZeRO partitions *every* array, so an
array the table leaves whole on those axes (a norm scale, a bias, Adafactor's factored
statistics, a width they don't divide) takes them on its widest other dimension; never on the
stacked ``layers`` dimension, which the layer scan slices. Tensor parallelism (``tensor`` > 1)
always splits ``heads``, ``kv_heads``, ``mlp`` and ``vocab`` (Megatron-style) where it divides
them. With ``sharding.expert_parallel`` a mixture of experts' ``experts`` axis takes ``fsdp``
before ``embed`` can (expert parallelism: whole experts per shard, tokens moved to them). The batch is split over ``data`` x ``fsdp``: both are data-parallel axes; ``fsdp`` is the one ZeRO shards state over,
and ``data`` x ``fsdp`` is the FSDP paper's hybrid sharding factor. Under stage 3, XLA gathers
each layer's weights inside the layer scan, just before use, and frees them afterwards.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t5x_lite.config import Config, ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
ZERO_AXIS = "embed"  # the logical axis whose mesh axes (if any) are the ones ZeRO shards state over


# ------------------------------------------------------------------------------ mesh


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def resolve_mesh_shape(cfg: Config, num_devices: int) -> tuple[int, int, int]:
    """Mesh sizes with ``-1`` filled in; a clear error when they cannot cover ``num_devices``."""
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    given = f"mesh.data={sizes[0]}, mesh.fsdp={sizes[1]}, mesh.tensor={sizes[2]}"
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"{given}: the fixed sizes multiply to {known}, which does not divide the {num_devices} devices; "
                f"their product must be one of {_divisors(num_devices)}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"{given} multiply to {math.prod(sizes)} devices, but {num_devices} are available; make them multiply "
            f"to {num_devices}, or set one axis to -1 for the rest of the devices (e.g. --set mesh.fsdp=-1)"
        )
    return tuple(sizes)


def validate_for_mesh(cfg: Config, mesh_shape: Sequence[int]) -> None:
    """Divisibility checks that depend on the mesh; raised before anything compiles."""
    data, fsdp, tensor = mesh_shape
    m, t = cfg.model, cfg.train
    errors = []
    shards = data * fsdp
    if t.batch_size % (shards * t.micro_batches):
        unit = shards * t.micro_batches
        sizes = [unit * k for k in range(1, 5)]
        micro = [k for k in _divisors(t.batch_size) if t.batch_size % (shards * k) == 0]
        errors.append(
            f"train.batch_size={t.batch_size} does not split into train.micro_batches={t.micro_batches} "
            f"micro-batches of a multiple of mesh.data x mesh.fsdp = {data} x {fsdp} = {shards} sequences; "
            f"batch sizes that fit: {sizes}..."
            + (f", or train.micro_batches in {micro}" if micro else "")
        )
    tensor_fits = [k for k in _divisors(m.num_heads) if m.d_ff % k == 0]
    if m.num_heads % tensor:
        errors.append(f"model.num_heads={m.num_heads} is not divisible by mesh.tensor={tensor}; "
                      f"mesh.tensor sizes that fit: {tensor_fits}")
    widths = [("d_ff", m.d_ff)] + ([("expert_d_ff", m.expert_width)] if m.num_experts else []) + (
        [("shared_expert_d_ff", m.shared_expert_d_ff)] if m.num_experts and m.shared_expert_d_ff else [])
    for name, width in widths:
        if width % tensor:
            fits = [k for k in tensor_fits if width % k == 0]
            errors.append(f"model.{name}={width} is not divisible by mesh.tensor={tensor}; "
                          f"mesh.tensor sizes that fit: {fits}")
    if cfg.sharding.expert_parallel and m.num_experts % fsdp:
        errors.append(f"sharding.expert_parallel splits model.num_experts={m.num_experts} over mesh.fsdp={fsdp}, "
                      f"which does not divide it; mesh.fsdp sizes that fit: {_divisors(m.num_experts)}")
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
    it puts ``embed`` (``ZERO_AXIS``) on the ZeRO axes from stage 1 on, the parameter table
    only at stage 3.
    """
    stage = cfg.sharding.zero_stage
    zero = stage >= 1 if optimizer else stage == 3
    zero_axes: Any = ("data", "fsdp") if (optimizer and cfg.sharding.shard_opt_over_data) else "fsdp"
    tensor = mesh.shape["tensor"] if mesh is not None else 1
    m = cfg.model

    def tp(size: int):  # tensor-parallel only along dimensions it divides
        return "tensor" if size % tensor == 0 else None

    # Expert parallelism: the experts axis takes fsdp first (rules are matched in order, a mesh axis
    # used once per array), so expert weights are split by expert, not by ZeRO over embed, and the
    # experts' inputs [E, groups, C, D] by expert, their groups over data alone (the second
    # act_batch rule): going from token groups to experts and back is an all-to-all over fsdp.
    experts = "fsdp" if cfg.sharding.expert_parallel else None
    return (
        ("experts", experts),
        ("act_experts", experts),
        # activations
        ("act_batch", BATCH_AXES),
        ("act_batch", "data"),
        ("act_length", None),
        ("act_embed", None),
        ("act_heads", tp(m.num_heads)),
        ("act_kv_heads", tp(m.kv_heads)),
        ("act_kv", None),
        ("act_mlp", tp(m.d_ff)),
        ("act_vocab", tp(m.vocab_size)),
        # parameters
        (ZERO_AXIS, zero_axes if zero else None),
        ("vocab", tp(m.vocab_size)),
        ("heads", tp(m.num_heads)),
        ("kv_heads", tp(m.kv_heads)),
        ("mlp", tp(m.d_ff)),
        ("kv", None),
        ("norm", None),
        ("layers", None),
        ("lora", None),
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


def _axes_tuple(axes) -> tuple:
    return () if axes is None else axes if isinstance(axes, tuple) else (axes,)


def _spread_zero(spec: P, shape: Sequence[int], names: Sequence[Optional[str]], zero_axes, mesh: Mesh) -> P:
    """Put the ZeRO axes on the widest dimension they divide (never ``layers``) of an array
    whose spec does not use them yet: ZeRO leaves no array whole on every device."""
    zero = _axes_tuple(zero_axes)
    full = list(spec) + [None] * (len(shape) - len(spec))
    if not zero or set(zero) & {a for axes in full for a in _axes_tuple(axes)}:
        return spec
    for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
        axes = _axes_tuple(full[i]) + zero
        if names[i] != "layers" and shape[i] % math.prod(mesh.shape[a] for a in axes) == 0:
            full[i] = axes if len(axes) > 1 else axes[0]
            return P(*full)
    return spec


def logical_sharding(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh, rules: tuple) -> NamedSharding:
    """The sharding of one array with logical axis ``names`` under ``rules``: mesh axes on the
    dimensions they divide, the ZeRO axes spread onto an array that would not use them."""
    spec = _fit_spec(nn.logical_to_mesh_axes(tuple(names), rules), shape, mesh)
    return NamedSharding(mesh, _spread_zero(spec, shape, names, dict(rules).get(ZERO_AXIS), mesh))


def logical_names(abstract_boxed) -> list[tuple]:
    """The logical axis names of every leaf (``None`` per dimension where there are none)."""
    specs = jax.tree.leaves(nn.get_partition_spec(abstract_boxed), is_leaf=lambda x: isinstance(x, P) or x is None)
    leaves = jax.tree.leaves(nn.meta.unbox(abstract_boxed))
    return [tuple(spec or ()) + (None,) * (leaf.ndim - len(spec or ())) for spec, leaf in zip(specs, leaves)]


def shardings_from_logical(abstract_boxed, mesh: Mesh, rules: tuple):
    """NamedShardings for a tree of boxed (logically partitioned) abstract arrays."""
    unboxed = nn.meta.unbox(abstract_boxed)
    leaves, treedef = jax.tree.flatten(unboxed)
    names = logical_names(abstract_boxed)
    return treedef.unflatten([logical_sharding(n, leaf.shape, mesh, rules) for n, leaf in zip(names, leaves)])


def _path_key(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _state_names(leaf_shape: tuple, param_shape: tuple, param_names: tuple) -> Optional[tuple]:
    """Logical names of an optimizer-state leaf that belongs to a parameter: the parameter's
    when the shapes agree (Adam's ``mu``/``nu``), the parameter's less one dimension when the
    leaf is the parameter's shape less that dimension (Adafactor's factored row / column
    second moments); None for anything else."""
    if leaf_shape == param_shape:
        return param_names
    if len(leaf_shape) == len(param_shape) - 1:
        for drop in range(len(param_shape)):
            if param_shape[:drop] + param_shape[drop + 1:] == leaf_shape:
                return param_names[:drop] + param_names[drop + 1:]
    return None


def opt_state_shardings(abstract_opt_state, abstract_params_boxed, mesh: Mesh, rules: tuple):
    """Shard each optimizer-state leaf like the parameter it belongs to.

    A leaf belongs to a parameter when the parameter's tree path is a suffix of the leaf's
    path and ``_state_names`` relates their shapes. Anything else (step counts, placeholders)
    is a scalar or nearly so and stays replicated.
    """
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract_params_boxed))[0]
    by_path = {_path_key(path): (tuple(leaf.shape), names)
               for (path, leaf), names in zip(flat, logical_names(abstract_params_boxed))}

    def one(path, leaf):
        key = _path_key(path)
        for start in range(len(key)):
            hit = by_path.get(key[start:])
            names = None if hit is None else _state_names(tuple(leaf.shape), *hit)
            if names is not None:
                return logical_sharding(names, leaf.shape, mesh, rules)
        return NamedSharding(mesh, P())

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


@contextlib.contextmanager
def mesh_rules(mesh: Mesh, rules: tuple):
    """The mesh and logical rules that tracing a model needs (its activation constraints)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def describe_mesh(mesh: Mesh) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
