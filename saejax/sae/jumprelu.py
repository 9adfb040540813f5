"""JumpReLU and its L0 with straight-through pseudo-derivatives (Rajamanoharan et al. 2024).

    jumprelu(z, theta) = z * H(z - theta)
    L0(z, theta)       = sum_i H(z_i - theta_i)      (over the last axis: the latents of a row)

H has zero derivative almost everywhere, so the threshold gets a pseudo-derivative through a kernel
K of bandwidth eps (the rectangle: K(u) = 1 for |u| < 1/2):

    d jumprelu / d theta = -(theta / eps) K((z - theta) / eps)
    d L0       / d theta_i = -(1 / eps)   K((z_i - theta_i) / eps)

z gets the ordinary derivative of z * H(z - theta) with H held fixed (H for jumprelu) and nothing
through the L0. ``theta`` may broadcast against ``z``: its cotangent is summed back to its own shape.

``jumprelu_l0`` is both as one elementwise op (its backward pass sums theta's two terms in one
reduction); ``jumprelu`` is its first output. Training uses ``mse_l0``: a whole JumpReLU SAE's
reconstruction error and per-latent firing counts, over the batch in row blocks, with exactly the
gradients of autodiff through ``jumprelu_l0`` (tests/test_sae.py checks them against it), with the
batch given in row blocks (``row_blocks``). Why it is written this way: docs/training.md, XLA:CPU notes.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from saejax.sae import matryoshka as mat, sharded


def rectangle(u):
    """The rectangle kernel: 1 on (-1/2, 1/2), 0 elsewhere."""
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


def _sum_to(x, shape):
    """Sum ``x`` over the axes along which ``shape`` was broadcast to it."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, s in enumerate(shape) if s == 1 and x.shape[i + lead] != 1)
    return jnp.sum(x, axis=axes, keepdims=True).reshape(shape) if axes else x


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu_l0(z, theta, eps):
    """(jumprelu(z, theta), L0(z, theta)): latents [..., M] and each row's L0 [...].

    For theta > 0 (SAE thresholds always are): then a latent fires exactly where it is positive,
    and the L0 is counted from the latents themselves, in the reduction that reads them anyway.
    """
    f = jnp.where(z > theta, z, 0.0)
    return f, jnp.sum(jnp.sign(f), -1)


def _jumprelu_l0_fwd(z, theta, eps):
    return jumprelu_l0(z, theta, eps), (z, theta)


def _jumprelu_l0_bwd(eps, res, g):
    z, theta = res
    g_f, g_l0 = g
    dz = jnp.where(z > theta, g_f, 0.0)
    # jumprelu's -(theta/eps) K g_f plus the L0's -(1/eps) K g_l0 in one reduction, with theta
    # multiplied in after the sum (docs/training.md, XLA:CPU notes).
    window = rectangle((z - theta) / eps)
    d = _sum_to(window * (g_f + g_l0[..., None] / theta), jnp.shape(theta))
    return dz, -(theta * d) / eps


jumprelu_l0.defvjp(_jumprelu_l0_fwd, _jumprelu_l0_bwd)


def jumprelu(z, theta, eps):
    """z * H(z - theta), with the pseudo-derivative for theta (``jumprelu_l0``'s latents)."""
    return jumprelu_l0(z, theta, eps)[0]


@partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def mse_l0(xb, yb, w_enc, b_enc, w_dec, b_dec, theta, w_skip, eps, precision, prefixes=()):
    """A JumpReLU SAE's reconstruction error and firing counts, over a batch given in row blocks.

        pre = x W_enc + b_enc,  f = jumprelu(pre, theta),  y_hat = f W_dec + b_dec (+ x W_skip)
        mse    [T, K]     mean over the batch's rows of ||y - y_hat||^2
        counts [T, K, M]  rows each latent fires on (their sum over M / rows is the L0)

    for a batch xb [n, T, b, d] (n blocks of b rows; ``row_blocks``), its target yb [n, T, b, d_out]
    (a transcoder's output site; None: the target is x, an SAE) and the parameters of T x K
    SAEs (W_enc [T, K, d, M], b_enc [T, K, M], W_dec [T, K, M, d_out], b_dec [T, K, d_out],
    theta [T, K, M], W_skip [T, K, d, d_out] or None). The gradients are those of autodiff through
    ``jumprelu_l0`` (z, theta pseudo-derivatives as above; nothing to x or y). The blocks are a
    ``lax.scan``, so the step's [b, M] temporaries are small enough to be reused from step to step
    (docs/training.md, row blocks).
    Under ``jax.grad`` the forward pass also computes the parameter gradients and the backward pass
    only scales them by the cotangents: the five matmuls run once.

    ``prefixes`` (Matryoshka sizes m_1 < ... < m_n = M; () plain): mse is then the sum over the
    prefixes of each one's error, from one decode of the prefix blocks and suffix sums of the errors
    in the gradients (saejax.sae.matryoshka); counts are the full dictionary's. It then returns a
    third output, the full dictionary's mse [T, K] alone (a metric: no gradient flows from it).
    """
    return _mse_l0_scan(xb, yb, w_enc, b_enc, w_dec, b_dec, theta, w_skip, eps, precision, False, prefixes)[0]


def _mse_l0_scan(xb, yb, w_enc, b_enc, w_dec, b_dec, theta, w_skip, eps, precision, with_grads, prefixes=()):
    """(mse, counts) and the sums over the blocks (with the gradients' parts if ``with_grads``).

    On a sharded mesh the block scan runs inside ``jax.shard_map``: each device sums its own rows'
    terms over the blocks, the decoder output is all-reduced over ``latent`` in each block, and the
    sums (the gradients among them) are all-reduced over ``data`` once, after the scan
    (docs/training.md, communication). Without one, the same scan on the whole arrays.
    """
    B = xb.shape[0] * xb.shape[2]
    mesh = sharded.current_mesh()
    if not sharded.is_sharded(mesh):
        acc = _block_sums(xb, w_enc, b_enc, w_dec, b_dec, theta, opt(yb, w_skip), eps, precision, with_grads, B, None,
                          prefixes)
        return _outputs(acc, B, prefixes), acc
    lat, row = P("stack", None, "latent"), P("stack", None, None)
    out_specs = {"sq": P("stack", None), "counts": lat}
    if prefixes:
        out_specs["sq_full"] = P("stack", None)
    if with_grads:
        out_specs.update(w_dec_t=P("stack", None, None, "latent"), b_dec=row, w_enc=P("stack", None, None, "latent"),
                         b_enc=lat, window_g=lat, window=lat)
        if w_skip is not None:
            out_specs.update(w_skip=P("stack", None, None, None))

    def local(*args):
        acc = _block_sums(*args, eps, precision, with_grads, B, "latent", prefixes)
        return lax.psum(acc, "data")  # one all-reduce of the sums per step, after the block scan

    acc = jax.shard_map(local, mesh=mesh, out_specs=out_specs,
                        in_specs=(P(None, "stack", "data", None), P("stack", None, None, "latent"), lat,
                                  P("stack", None, "latent", None), row, lat,
                                  opt(None if yb is None else P(None, "stack", "data", None),
                                      None if w_skip is None else P("stack", None, None, None))),
                        )(xb, w_enc, b_enc, w_dec, b_dec, theta, opt(yb, w_skip))
    return _outputs(acc, B, prefixes), acc


def _outputs(acc, B, prefixes):
    """mse_l0's outputs from the block sums: (mse, counts), and with prefixes the full dictionary's mse."""
    if prefixes:
        return acc["sq"] / B, acc["counts"], acc["sq_full"] / B
    return acc["sq"] / B, acc["counts"]


def opt(yb, w_skip) -> dict:
    """The optional arguments of ``_block_sums``: the target's blocks and W_skip, where given."""
    return {k: v for k, v in (("yb", yb), ("w_skip", w_skip)) if v is not None}


def _block_sums(xb, w_enc, b_enc, w_dec, b_dec, theta, extra, eps, precision, with_grads, B, latent_axis,
                prefixes=()):
    """The sums over the row blocks of xb [n, T, b, d] (``_mse_l0_scan``); B the batch's total rows;
    ``extra`` (``opt``): the target's blocks "yb" (absent: the target is x) and "w_skip" (absent:
    no skip term); ``latent_axis``: the shard_map axis over which the latents are split (its
    partial decoder outputs are summed), or None; ``prefixes``: Matryoshka sizes (``_prefix_block``)."""
    w_skip = extra.get("w_skip")
    mm = precision if callable(precision) else partial(jnp.matmul, precision=precision)
    tr = partial(jnp.swapaxes, axis1=-1, axis2=-2)
    th = theta[:, :, None, :]
    w_dec_t = tr(w_dec)  # once per step, not in every block (docs/training.md, XLA:CPU notes)

    if prefixes:  # Matryoshka: the latents' static segments and their weight slices, once per step
        cuts, onehot = mat.layout(prefixes, w_enc.shape[-1], latent_axis)
        segs = [(w_enc[..., lo:hi], b_enc[..., lo:hi], w_dec[..., lo:hi, :], w_dec_t[..., lo:hi], th[..., lo:hi])
                for lo, hi in cuts]

    def block(xc, yc):  # one block's terms of the sums; xc [T, b, d], yc its target (None: xc)
        if prefixes:
            return _prefix_block(xc, yc, segs, onehot, b_dec, w_skip, eps, mm, with_grads, B, latent_axis)
        pre = mm(xc[:, None], w_enc) + b_enc[:, :, None, :]  # [T, K, b, M]
        fired = pre > th
        f = jnp.where(fired, pre, 0.0)
        dec = mm(f, w_dec)
        if latent_axis is not None:
            dec = lax.psum(dec, latent_axis)
        if w_skip is not None:  # replicated over ``latent``: added once, after the sum
            dec = dec + mm(xc[:, None], w_skip)
        e = dec + b_dec[:, :, None, :] - (xc if yc is None else yc)[:, None]  # [T, K, b, d]
        out = {"sq": jnp.sum(jnp.square(e), (-2, -1), dtype=jnp.float32),
               "counts": jnp.sum(jnp.sign(f), -2, dtype=jnp.float32)}
        if with_grads:  # cotangent 1 on the mse: d mse / d x_hat = 2 e / B
            g = (2.0 / B) * e
            g_f = mm(g, w_dec_t)  # [T, K, b, M]
            dz = jnp.where(fired, g_f, 0.0)
            window = rectangle((pre - th) / eps)
            out.update(
                # W_dec's gradient transposed, g^T f, transposed once at the end (docs/training.md, XLA:CPU notes).
                w_dec_t=mm(tr(g), f), b_dec=jnp.sum(g, -2),
                w_enc=mm(tr(xc)[:, None], dz), b_enc=jnp.sum(dz, -2),
                window_g=jnp.sum(window * g_f, -2), window=jnp.sum(window, -2))
            if w_skip is not None:
                out.update(w_skip=mm(tr(xc)[:, None], g))
        return out

    # The sums start from the first block's terms, not from zeros (docs/training.md, XLA:CPU notes).
    yb = extra.get("yb")
    if yb is None:
        acc, _ = lax.scan(lambda acc, xc: (jax.tree_util.tree_map(jnp.add, acc, block(xc, None)), None),
                          block(xb[0], None), xb[1:])
    else:
        acc, _ = lax.scan(lambda acc, c: (jax.tree_util.tree_map(jnp.add, acc, block(*c)), None),
                          block(xb[0], yb[0]), (xb[1:], yb[1:]))
    # Matryoshka's per-segment sums, joined along the latents once per step.
    return {k: jnp.concatenate(v, -1) if isinstance(v, list) else v for k, v in acc.items()}


def _prefix_block(xc, yc, segs, onehot, b_dec, w_skip, eps, mm, with_grads, B, latent_axis):
    """``_block_sums``' block terms with Matryoshka prefixes, segment by segment (``segs``: each
    static cut of the latents with its slices of W_enc, b_enc, W_dec, W_dec^T and theta, taken once
    per step): the blocks' partial decodes d_j once, the prefixes' reconstructions as their running
    sums, the blocks' cotangents as suffix sums of the prefixes' errors (saejax.sae.matryoshka).
    Latent-sized terms come back as lists over the segments, joined once after the scan."""
    tr = partial(jnp.swapaxes, axis1=-1, axis2=-2)
    pres = [mm(xc[:, None], w_enc) + b_enc[:, :, None, :] for w_enc, b_enc, _, _, _ in segs]  # [T, K, b, m_s]
    fired = [pre > th for pre, (_, _, _, _, th) in zip(pres, segs)]
    fs = [jnp.where(fi, pre, 0.0) for fi, pre in zip(fired, pres)]
    parts = [mm(f, w_dec) for f, (_, _, w_dec, _, _) in zip(fs, segs)]
    if onehot is not None:  # segments -> blocks (latent sharding: the block of a segment depends on the device)
        parts = [sum(onehot[s, j] * p for s, p in enumerate(parts)) for j in range(onehot.shape[1])]
    if latent_axis is not None:
        parts = lax.psum(parts, latent_axis)
    base = b_dec[:, :, None, :] - (xc if yc is None else yc)[:, None]
    if w_skip is not None:
        base = base + mm(xc[:, None], w_skip)
    es = [r + base for r in mat.running_sums(parts)]  # each prefix's error [T, K, b, d]
    out = {"sq": sum(jnp.sum(jnp.square(e), (-2, -1), dtype=jnp.float32) for e in es),
           "sq_full": jnp.sum(jnp.square(es[-1]), (-2, -1), dtype=jnp.float32),
           "counts": [jnp.sum(jnp.sign(f), -2, dtype=jnp.float32) for f in fs]}
    if with_grads:
        G = [(2.0 / B) * g for g in mat.suffix_sums(es)]  # block j's cotangent: the errors of prefixes j..n
        Gs = G if onehot is None else [sum(onehot[s, j] * G[j] for j in range(len(G))) for s in range(len(segs))]
        g_fs = [mm(g, w_dec_t) for g, (_, _, _, w_dec_t, _) in zip(Gs, segs)]  # [T, K, b, m_s]
        dzs = [jnp.where(fi, g_f, 0.0) for fi, g_f in zip(fired, g_fs)]
        windows = [rectangle((pre - th) / eps) for pre, (_, _, _, _, th) in zip(pres, segs)]
        out.update(w_dec_t=[mm(tr(g), f) for g, f in zip(Gs, fs)], b_dec=jnp.sum(G[0], -2),
                   w_enc=[mm(tr(xc)[:, None], dz) for dz in dzs], b_enc=[jnp.sum(dz, -2) for dz in dzs],
                   window_g=[jnp.sum(w * g_f, -2) for w, g_f in zip(windows, g_fs)],
                   window=[jnp.sum(w, -2) for w in windows])
        if w_skip is not None:
            out.update(w_skip=mm(tr(xc)[:, None], G[0]))
    return out


def _mse_l0_fwd(xb, yb, w_enc, b_enc, w_dec, b_dec, theta, w_skip, eps, precision, prefixes):
    out, acc = _mse_l0_scan(xb, yb, w_enc, b_enc, w_dec, b_dec, theta, w_skip, eps, precision, True, prefixes)
    return out, (acc, theta, xb, yb)


def _mse_l0_bwd(eps, precision, prefixes, res, g):
    acc, theta, xb, yb = res
    g_mse, g_counts = g[:2]  # with prefixes, the full dictionary's mse (g[2]) is a metric without gradient
    s = lambda a: g_mse.reshape(g_mse.shape + (1,) * (a.ndim - 2)) * a  # noqa: E731
    # theta: jumprelu's -(theta/eps) sum K g_f (scaled by the mse cotangent) and the counts'
    # -(1/eps) sum K (by theirs).
    d_theta = -(theta * s(acc["window_g"]) + g_counts * acc["window"]) / eps
    w_dec = jnp.swapaxes(acc["w_dec_t"], -1, -2)
    d_skip = s(acc["w_skip"]) if "w_skip" in acc else None
    return (jnp.zeros_like(xb), None if yb is None else jnp.zeros_like(yb), s(acc["w_enc"]), s(acc["b_enc"]),
            s(w_dec), s(acc["b_dec"]), d_theta, d_skip)


mse_l0.defvjp(_mse_l0_fwd, _mse_l0_bwd)


ROW_BLOCK_BYTES = 10 << 20  # ~10 MiB ran the step fastest on XLA:CPU (docs/training.md, row blocks)


def row_block_count(B: int, M: int, max_bytes: int | None = None) -> int:
    """Into how many row blocks ``mse_l0`` takes a batch of B rows: the fewest whose per-device
    [rows, M] float32 block is at most ``max_bytes`` (~10 MiB ran the step fastest on XLA:CPU;
    docs/training.md, row blocks)."""
    max_bytes = ROW_BLOCK_BYTES if max_bytes is None else max_bytes
    D, L = sharded.axis_sizes(sharded.current_mesh(), "data", "latent")
    fits = [n for n in range(1, B // D + 1) if (B // D) % n == 0]
    return next((n for n in fits if (B // D // n) * -(-M // L) * 4 <= max_bytes), fits[-1])


def row_blocks(x, n: int):
    """x [T, B, d] -> [n, T, B / n, d]. Block c takes the c-th n-th of each ``data`` shard's rows,
    so a batch sharded over its rows stays sharded the same way within every block, and with one
    data shard the blocks are consecutive rows (a reshape, no copy)."""
    T, B, d = x.shape
    D = sharded.axis_sizes(sharded.current_mesh(), "data")[0]
    return jnp.moveaxis(x.reshape(T, D, n, B // (D * n), d), 2, 0).reshape(n, T, B // n, d)
