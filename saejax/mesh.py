"""The device mesh, and shardings from partition rules.

The mesh has three named axes:
  data    splits the batch (pure data parallelism: narrow SAEs, Gemma Scope's default);
  stack   splits the stack of SAEs of a group (sites), so different SAEs live on different devices;
  latent  splits the SAE latent dimension (Megatron-style, for wide SAEs); language models use it
          for their heads and MLP hidden dimension (tensor parallelism).

How an array is split is decided by the module that owns it: a model publishes its partition rules
(``model.partition_rules()``), an SAE group its rules (``saejax.sae.group``) and the specs of the
step's intermediates (``saejax.sae.sharded``), a released SAE its specs (``saejax.release.sae``),
and the stage that feeds a batch (train, harvest) writes the batch's spec where it feeds it. A rule
list is ``(regex over the parameter path, PartitionSpec)``; ``tree_shardings`` turns it into
NamedShardings for a pytree. Axis types are given explicitly (Auto: XLA propagates shardings inside
jit) so the code means the same on jax 0.10 and on newer JAX whose default is Explicit.
"""
from __future__ import annotations

import math
import os
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


def abstract_mesh(sizes) -> jax.sharding.AbstractMesh:
    """The mesh's shape without devices (every axis size given), for dry runs on another machine."""
    shape = tuple(int(sizes[a]) for a in AXES)
    if -1 in shape:
        raise MeshError(f"mesh {dict(zip(AXES, shape))}: a dry run without the devices needs every axis size")
    return jax.sharding.AbstractMesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def make_mesh(sizes, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over all (or the given) devices from ``{"data": .., "stack": .., "latent": ..}``."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape({a: sizes[a] for a in AXES}, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def init_distributed() -> bool:
    """Join a multi-process run when the launcher says so; call before anything touches a device.

    The launcher (launch/launch.py) sets, for every process,
        SAEJAX_COORDINATOR    host:port of process 0
        SAEJAX_NUM_PROCESSES  number of processes
        SAEJAX_PROCESS_ID     this process's index
    and ``jax.distributed.initialize`` is called with them. On a Cloud TPU VM pod slice (or GKE)
    nothing is set: on a host with TPU chips (or with ``SAEJAX_DISTRIBUTED=auto``) JAX detects the
    cluster itself; ``SAEJAX_DISTRIBUTED=off`` disables that. Returns whether distributed mode is on.
    """
    env = os.environ
    coordinator = env.get("SAEJAX_COORDINATOR")
    if coordinator:
        for key in ("SAEJAX_NUM_PROCESSES", "SAEJAX_PROCESS_ID"):
            if not env.get(key, "").isdigit():
                raise MeshError(f"{key} must be set to an integer when SAEJAX_COORDINATOR is set")
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=int(env["SAEJAX_NUM_PROCESSES"]),
                                   process_id=int(env["SAEJAX_PROCESS_ID"]))
        return True
    if env.get("SAEJAX_DISTRIBUTED") == "auto" or (env.get("SAEJAX_DISTRIBUTED") != "off" and _on_tpu_vm()):
        jax.distributed.initialize()  # cluster auto-detection (TPU VMs, GKE, SLURM)
        return True
    return False


def _on_tpu_vm() -> bool:
    """Whether this host has TPU chips (read from PCI ids; touches no device)."""
    try:
        from jax._src import hardware_utils  # what JAX itself uses; absent in some versions
        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # noqa: BLE001 - no detection means no auto-initialization
        return False


def validate_group(sizes, T: int, width: int, batch_size: int, n_devices: int | None = None,
                   process_count: int | None = None, name: str = "") -> None:
    """One-line errors naming ``mesh.<axis>`` for a group that does not split over the mesh.

    stack must divide the T sites, latent the latent width M, data the batch; and the batch must
    split evenly over the processes, each of which feeds its own rows.
    """
    n = jax.device_count() if n_devices is None else n_devices
    shape = dict(zip(AXES, mesh_shape({a: sizes[a] for a in AXES}, n)))
    where = f" (group {name})" if name else ""
    if T % shape["stack"]:
        raise MeshError(f"mesh.stack={shape['stack']} does not divide the {T} sites{where}; "
                        f"or pad them with idle slots (mesh.pad_sites)")
    if width % shape["latent"]:
        raise MeshError(f"mesh.latent={shape['latent']} does not divide the latent width {width}{where}")
    if batch_size % shape["data"]:
        raise MeshError(f"mesh.data={shape['data']} does not divide train.batch_size={batch_size}{where}")
    procs = jax.process_count() if process_count is None else process_count
    if batch_size % procs:
        raise MeshError(f"train.batch_size={batch_size} does not split over {procs} processes{where}")


def shard_bytes(shape, dtype, sharding: NamedSharding) -> int:
    """Bytes one device holds of a global array of ``shape`` under ``sharding``."""
    return math.prod(sharding.shard_shape(tuple(shape))) * np.dtype(dtype).itemsize


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

