"""Top-k thresholds of pre-activations sharded over the mesh, without gathering them.

TopK keeps, for each row, the k largest of the M pre-activations; BatchTopK keeps the k*B largest
of a whole batch's B*M. Both reduce to a threshold: the k-th largest value ``kth``, after which

    f = where(pre >= kth, relu(pre), 0)

is elementwise and stays sharded. On any sharded mesh (``pre [T, K, B, M]`` laid out as
``P("stack", None, "data", "latent")``) XLA's partitioner would gather the [B, M] block for a plain
``lax.top_k``, even when only ``stack`` or ``data`` is split. Here the threshold is found in two stages inside ``jax.shard_map``:

    1. each device takes the top n_loc = min(k, local size) of its own block;
    2. the candidates are gathered over the sharded axes (``latent`` for TopK's rows; ``data`` and
       ``latent`` for BatchTopK's batch) and their k-th largest is the threshold.

This is exact, not an approximation: a shard holds at most k of the global top k, so every one of
them is among its shard's candidates, and the k-th largest candidate is the global k-th largest
value, bit for bit. Gathered per device are [T/S, K, B/D, L * k] candidates (TopK) or at most
D * L * min(k * B, B * M / (D * L)) per SAE (BatchTopK); never the [B, M] pre-activations.

The trainer sets the mesh for the duration of tracing with ``use_mesh(mesh)``; without it (one
device, inference code) the functions compute the same thresholds with a plain ``lax.top_k``.
"""
from __future__ import annotations

import contextlib
import threading

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

_current = threading.local()
PRE_SPEC = P("stack", None, "data", "latent")  # pre-activations [T, K, B, M]


@contextlib.contextmanager
def use_mesh(mesh):
    """Trace code under ``mesh``: top-k thresholds are then computed shard by shard."""
    old = getattr(_current, "mesh", None)
    _current.mesh = mesh
    try:
        yield
    finally:
        _current.mesh = old


def current_mesh():
    return getattr(_current, "mesh", None)


def _pick(top, ks: tuple[int, ...]):
    """top [T, K, N, S] sorted descending -> the ks[k]-th largest for each member k: [T, K, N, 1]."""
    idx = jnp.asarray([k - 1 for k in ks], jnp.int32)[None, :, None, None]
    return jnp.take_along_axis(top, jnp.broadcast_to(idx, top.shape[:-1] + (1,)), axis=-1)


def _local_kth(values, ks: tuple[int, ...]):
    """The ks-th largest along the last axis of values [T, K, N, S] (one device): [T, K, N, 1]."""
    return _pick(lax.top_k(values, max(ks))[0], ks)


def _two_stage(values, ks: tuple[int, ...], axes: tuple[str, ...]):
    """Inside shard_map: local top-n, gather candidates over ``axes``, global ks-th largest."""
    kmax = max(ks)
    local, _ = lax.top_k(values, min(kmax, values.shape[-1]))
    # "invarying": the gathered candidates are the same on every device of ``axes``.
    cand = lax.all_gather(local, axes, axis=local.ndim - 1, tiled=True, to="invarying") if axes else local
    return _pick(lax.top_k(cand, kmax)[0], ks)


def axis_sizes(mesh, *axes: str) -> tuple[int, ...]:
    """Sizes of ``mesh``'s ``axes``: 1 for an axis the mesh lacks, and for every axis without a mesh."""
    sizes = dict(mesh.shape) if mesh is not None else {}
    return tuple(sizes.get(a, 1) for a in axes)


def is_sharded(mesh) -> bool:
    """Whether pre-activations are split over any device axis under ``mesh``: then thresholds are
    found shard by shard (XLA's partitioner would gather the whole [B, M] block for a top-k, even
    one along an unsharded axis)."""
    return mesh is not None and any(s > 1 for s in axis_sizes(mesh, "stack", "data", "latent"))


def row_kth(pre, ks: tuple[int, ...]):
    """TopK threshold: the k-th largest of each row of pre [T, K, B, M], per member k -> [T, K, B, 1].

    Not differentiated (the mask ``pre >= kth`` has no gradient).
    """
    pre = lax.stop_gradient(pre)
    mesh = current_mesh()
    if not is_sharded(mesh):
        return _local_kth(pre, ks)
    fn = jax.shard_map(lambda v: _two_stage(v, ks, ("latent",)), mesh=mesh,
                       in_specs=PRE_SPEC, out_specs=P("stack", None, "data", None))
    return fn(pre)


def batch_kth(pre, ks: tuple[int, ...]):
    """BatchTopK threshold: the (k*B)-th largest of all of pre [T, K, B, M] per SAE -> [T, K, 1, 1]."""
    pre = lax.stop_gradient(pre)
    T, K, B, M = pre.shape
    kb = tuple(k * B for k in ks)
    mesh = current_mesh()
    if not is_sharded(mesh):
        return _local_kth(pre.reshape(T, K, 1, B * M), kb)

    def local(v):  # v [t, K, b, m] -> this shard's flat block [t, K, 1, b * m]
        t, k_, b, m = v.shape
        return _two_stage(v.reshape(t, k_, 1, b * m), kb, ("data", "latent"))

    fn = jax.shard_map(local, mesh=mesh, in_specs=PRE_SPEC, out_specs=P("stack", None, None, None))
    return fn(pre)
