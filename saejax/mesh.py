"""The device mesh and the one place where shardings are derived.

The mesh has three named axes:
  data    splits the batch (pure data parallelism: narrow SAEs, Gemma Scope's default);
  stack   splits the stack of SAEs of a group (sites), so different SAEs live on different devices;
  latent  splits the SAE latent dimension (Megatron-style, for wide SAEs); language models use it
          for their heads and MLP hidden dimension (tensor parallelism).

Modules and steps never place arrays by hand: they publish partition rules, a list of
``(regex over the parameter path, PartitionSpec)``, and ``tree_shardings`` turns those into
NamedShardings for a pytree. Axis types are given explicitly (Auto: XLA propagates shardings
inside jit) so the code means the same on jax 0.10 and on newer JAX whose default is Explicit.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "stack", "latent")


class MeshError(ValueError):
    """A mesh that does not fit the devices, or a rule that does not fit an array."""


def mesh_shape(sizes: dict[str, int], n_devices: int) -> tuple[int, ...]:
    """Resolve one ``-1`` axis to the remaining devices; check the product."""
    shape = [int(sizes[a]) for a in AXES]
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known:
            raise MeshError(f"mesh {dict(zip(AXES, shape))} does not divide {n_devices} devices")
        shape[shape.index(-1)] = n_devices // known
    if math.prod(shape) != n_devices:
        raise MeshError(f"mesh {dict(zip(AXES, shape))} needs {math.prod(shape)} devices, "
                        f"there are {n_devices}")
    return tuple(shape)


def make_mesh(sizes, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over all (or the given) devices from ``{"data": .., "stack": .., "latent": ..}``."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape({a: sizes[a] for a in AXES}, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def path_str(path) -> str:
    """A pytree key path as ``a/b/c``."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def spec_for(path: str, shape: tuple[int, ...], rules, mesh: Mesh) -> P:
    """The first rule whose regex matches ``path``; axes that do not divide the dim are dropped."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            break
    else:
        return P()
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    if len(spec) > len(shape):
        raise MeshError(f"partition rule {pattern!r} has {len(spec)} axes, {path} has shape {shape}")
    out = []
    for dim, axis in zip(shape, spec):
        names = axis if isinstance(axis, tuple) else (axis,) if axis else ()
        size = math.prod(mesh.shape[n] for n in names)
        out.append(axis if size > 1 and dim % size == 0 else None if size > 1 else axis)
    return P(*out)


def tree_shardings(tree, rules, mesh: Mesh):
    """NamedShardings for every leaf of ``tree`` (arrays or ShapeDtypeStructs) from ``rules``."""
    def one(path, leaf):
        return NamedSharding(mesh, spec_for(path_str(path), tuple(np.shape(leaf)), rules, mesh))
    return jax.tree_util.tree_map_with_path(one, tree)


def shard_tree(tree, rules, mesh: Mesh):
    """Place a pytree of host or device arrays on the mesh by ``rules``."""
    return jax.device_put(tree, tree_shardings(tree, rules, mesh))


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0, stack_axis: int | None = None) -> NamedSharding:
    """Sharding of a data batch: batch dim over ``data``, optional stack dim over ``stack``."""
    spec = [None] * ndim
    spec[batch_axis] = "data"
    if stack_axis is not None:
        spec[stack_axis] = "stack"
    return NamedSharding(mesh, P(*spec))
