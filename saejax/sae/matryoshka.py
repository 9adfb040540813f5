"""Matryoshka training (Bussmann et al. 2025): nested prefixes of the dictionary, each trained to
reconstruct on its own.

For prefix sizes m_1 < ... < m_n = M (``GroupSpec.matryoshka``) the reconstruction term is

    sum_i  mean_rows ||y - y_hat_i||^2,   y_hat_i = f[:, :m_i] W_dec[:m_i] + b_dec (+ x W_skip)

(latents beyond m_i zeroed; the full dictionary is the last term), plus the kind's sparsity
term; f (its L0, the target-L0 term, the top-k selection) is computed once, on all M latents.

One decode, not n: the latents split into blocks j = [m_{j-1}, m_j), each block is decoded once
(d_j = f_j W_dec_j, together one full decode's FLOPs) and y_hat_i = b_dec + sum_{j<=i} d_j are
running sums. Backwards, with e_i = y_hat_i - y, the cotangent of d_j is the sum of the errors of
the prefixes that contain it, G_j = (2/B) sum_{i>=j} e_i (suffix sums), so f_j's gradient is
G_j W_dec_j^T and W_dec_j's is f_j^T G_j: again one decoder's FLOPs each (docs/sae.md).

Under latent sharding a device holds latents [s M_l, (s+1) M_l) and the block boundaries fall
anywhere in it. Its latents are cut at every boundary as seen from any shard ((m_i - s' M_l) within
(0, M_l)), which gives the same static segments on every device; each segment lies inside one block,
which block depending on the device (a [segments, n] one-hot from ``lax.axis_index``). The n partial
decodes are then summed over ``latent``: n [b, d] all-reduces of the decoder output instead of one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from saejax.sae import forward, sharded


def resolve(value, width: int) -> tuple[int, ...]:
    """The prefix sizes of config ``sae.matryoshka`` for one width: integers are the sizes themselves
    (the last must be the width); numbers in (0, 1] ending at 1 are fractions of every width, each
    size rounded to an integer. () (the default): plain training."""
    value = tuple(value)
    if not value:
        return ()
    if is_counts(value):
        return tuple(int(v) for v in value)
    return tuple(int(round(float(v) * width)) for v in value)


def is_counts(value) -> bool:
    """Whether config prefix sizes are latent counts (ints), not fractions of the width."""
    return all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)


def well_formed(value) -> bool:
    """Whether config prefix sizes are latent counts or fractions of the width in (0, 1]."""
    return is_counts(value) or all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1
                                   for v in value)


def problem(prefixes: tuple[int, ...], width: int) -> str | None:
    """Why ``prefixes`` are not prefix sizes of a ``width``-latent dictionary (None: they are)."""
    if not prefixes:
        return None
    if len(prefixes) < 2:
        return f"{prefixes} needs at least two prefix sizes (the last the width {width})"
    if any(p < 1 for p in prefixes) or any(b <= a for a, b in zip(prefixes, prefixes[1:])):
        return f"{prefixes} must be positive and strictly increasing"
    if prefixes[-1] != width:
        return f"{prefixes} must end at the width {width}"
    return None


def segments(prefixes: tuple[int, ...], m_local: int, shards: int) -> tuple[tuple[int, int], ...]:
    """Static cuts of a device's m_local latents at every prefix boundary of every shard."""
    cuts = sorted({p - s * m_local for p in prefixes for s in range(shards) if 0 < p - s * m_local < m_local})
    return tuple(zip([0] + cuts, cuts + [m_local]))


def _assignment(prefixes, segs, offset):
    """[segments, n] one-hot: the block of each segment, the device's latents starting at ``offset``."""
    starts = offset + jnp.asarray([lo for lo, _ in segs], jnp.int32)
    return jax.nn.one_hot(jnp.searchsorted(jnp.asarray(prefixes, jnp.int32), starts, side="right"),
                          len(prefixes), dtype=jnp.float32)


def layout(prefixes, m_local, latent_axis):
    """(segments, one-hot or None): None when the segments are the blocks themselves (one shard)."""
    shards = 1 if latent_axis is None else lax.axis_size(latent_axis)
    segs = segments(prefixes, m_local, shards)
    if shards == 1:
        return segs, None
    return segs, _assignment(prefixes, segs, lax.axis_index(latent_axis) * m_local)


def block_decodes(f, w_dec, prefixes, mm, latent_axis=None) -> list:
    """The n partial decodes d_j = f_j W_dec_j [T, K, b, d] (a device's part of them, to be summed
    over ``latent_axis``, inside a shard_map over it): f [T, K, b, M_l], W_dec [T, K, M_l, d]."""
    segs, onehot = layout(prefixes, f.shape[-1], latent_axis)
    parts = [mm(f[..., lo:hi], w_dec[..., lo:hi, :]) for lo, hi in segs]
    if onehot is None:
        return parts
    return [sum(onehot[s, j] * p for s, p in enumerate(parts)) for j in range(len(prefixes))]


def running_sums(parts: list) -> list:
    out = [parts[0]]
    for p in parts[1:]:
        out.append(out[-1] + p)
    return out


def suffix_sums(parts: list) -> list:
    out = [parts[-1]]
    for p in parts[-2::-1]:
        out.append(out[-1] + p)
    return out[::-1]


def decodes(spec, f, w_dec) -> list:
    """The n partial decodes [T, K, B, d] of a group's latents f [T, K, B, M] (autodiff path: TopK,
    BatchTopK); on a sharded mesh inside a shard_map with one sum over ``latent``."""
    mm = forward.spec_matmul(spec)
    mesh = sharded.current_mesh()
    if not sharded.is_sharded(mesh):
        return block_decodes(f, w_dec, spec.matryoshka, mm)

    def local(f, w):
        return lax.psum(block_decodes(f, w, spec.matryoshka, mm, "latent"), "latent")

    rec = P("stack", None, "data", None)
    return jax.shard_map(local, mesh=mesh, in_specs=(sharded.PRE_SPEC, P("stack", None, "latent", None)),
                         out_specs=[rec] * len(spec.matryoshka))(f, w_dec)


def prefix_mse(parts: list, base, y) -> tuple:
    """(sum over prefixes of the per-row squared error averaged over rows [T, K], the full
    dictionary's x_hat [T, K, B, d]) from the partial decodes, ``base`` = b_dec (+ skip)
    broadcastable to [T, K, B, d] and the target y [T, B, d]."""
    hats = [r + base for r in running_sums(parts)]
    sq = sum(jnp.mean(jnp.sum(jnp.square(h - y[:, None]), -1), -1) for h in hats)
    return sq, hats[-1]


def prefix_hats(f, w_dec, b_dec, prefixes, precision=lax.Precision.HIGHEST):
    """Each prefix's reconstruction [n, T, K, N, d] from inference latents f [T, K, N, M] (evaluation)."""
    mm = lambda a, b: jnp.matmul(a, b, precision=precision)  # noqa: E731
    hats = running_sums(block_decodes(f, w_dec, tuple(prefixes), mm))
    return jnp.stack([h + b_dec[:, :, None, :] for h in hats])
