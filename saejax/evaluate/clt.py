"""Evaluation of a cross-layer transcoder: per-layer metrics on held-out rows and the replacement model.

Per output layer l' (on the store's aligned held-out rows of mlp_in.l and mlp.l'):
    fvu_l'   sum over rows of ||y_l' - y_hat_l'||^2 / the rows' total variance (as metrics.site_metrics)
    fvu_prefix_l'  Matryoshka CLTs: the same for each prefix (latents [0, m_i) of every layer decoding)
    l0_l     active latents of layer l per row;  dead_frac_l  latents of layer l that never fired
Raw-space weights (``clt_io.fold``): every number is of the released CLT.

The replacement model: one forward pass in which every MLP output mlp.l' of the CLT's layers is
replaced by the CLT's reconstruction from mlp_in.l, l <= l', of the same pass (so errors compound
as they would in an attribution graph), through the model's cross-site splice (``splice.all_at_once_pass``, shared with a transcoder
group's replacement model). Three variants share
the pass (N x B, variant-major): clean, every MLP zero-ablated, the replacement. At positions the
store did not keep (position 0, ``skip_first``, special tokens) the activation is left alone.
delta_lm_loss = CE_replacement - CE_clean; ce_score = (CE_ablate - CE_rep) / (CE_ablate - CE_clean);
kl = KL(clean || replacement), per CE position (splice.ce_mask).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from saejax.evaluate import splice
from saejax.sae import clt_io


def _encode(f: dict, meta: dict, i: int, x):
    """Layer i's latents of raw rows x [N, d_in] (folded arrays ``f``)."""
    pre = x @ f["W_enc"][i] + f["b_enc"][i]
    if "threshold" in f:
        return jnp.where(pre > f["threshold"][i], pre, 0.0)
    k = int(meta["sparsity"])
    kth = jax.lax.top_k(pre, k)[0][..., k - 1:k]
    return jnp.where(pre >= kth, jax.nn.relu(pre), 0.0)


def layer_metrics(a: dict, meta: dict, rows_in: list, rows_out: list, chunk: int = 2048) -> list[dict]:
    """Per output layer: fvu, l0 and dead_frac of its source layer, over raw aligned rows
    (rows_in[i], rows_out[i]: [N, d] of mlp_in and mlp of the i-th CLT layer)."""
    f = {k: jnp.asarray(v) for k, v in clt_io.fold(a, meta).items()}
    L, N = len(rows_in), len(rows_in[0])

    prefixes = list(meta.get("matryoshka", ())) or [a["b_enc"].shape[1]]
    blocks = list(zip([0] + prefixes[:-1], prefixes))  # each block decoded once; prefixes are running sums

    @jax.jit
    def stats(xs, ys):
        lat = [_encode(f, meta, i, xs[i]) for i in range(L)]
        out = []  # [L, n]: each Matryoshka prefix's squared error (one prefix, the whole CLT, without)
        for j in range(L):
            y_hat, err = f["b_dec"][j], []
            for lo, hi in blocks:
                y_hat = y_hat + sum(lat[i][:, lo:hi] @ f[f"W_dec_{i}"][lo:hi, j - i] for i in range(j + 1))
                err.append(jnp.sum(jnp.square(ys[j] - y_hat)))
            out.append(jnp.stack(err))
        return jnp.stack(out).T, jnp.stack([jnp.sum(x > 0) for x in lat]), jnp.stack([jnp.any(x > 0, 0) for x in lat])

    sq, active = np.zeros((len(prefixes), L)), np.zeros(L)
    fired = np.zeros((L, a["b_enc"].shape[1]), bool)
    sum_y, sum_y2 = [0.0] * L, np.zeros(L)
    for s in range(0, N, chunk):
        xs = jnp.asarray(np.stack([np.asarray(r[s:s + chunk], np.float32) for r in rows_in]))
        ys_np = np.stack([np.asarray(r[s:s + chunk], np.float32) for r in rows_out])
        e, n_act, fi = stats(xs, jnp.asarray(ys_np))
        sq += np.asarray(e, np.float64)
        active += np.asarray(n_act, np.float64)
        fired |= np.asarray(fi)
        for j in range(L):
            sum_y[j] = sum_y[j] + ys_np[j].astype(np.float64).sum(0)
            sum_y2[j] += float(np.sum(ys_np[j].astype(np.float64) ** 2))
    out = []
    for j in range(L):
        var = sum_y2[j] - float(np.sum(sum_y[j] ** 2)) / N
        out.append({"fvu": float(sq[-1, j] / var), "l0": float(active[j] / N), "dead_frac": float(np.mean(~fired[j])),
                    "n_tokens": N, **({"fvu_prefix": [float(e / var) for e in sq[:, j]]} if len(prefixes) > 1 else {})})
    return out


def writes(a: dict, meta: dict) -> np.ndarray:
    """[L, M, L]: the norm of each latent's decoder block to each output layer in raw space (the
    released CLT's, ``clt_io.fold``; 0 before its own layer): the layers a latent writes to, for
    latent cards."""
    f = clt_io.fold(a, meta)
    L = len(meta["layers"])
    out = np.zeros((L, a["b_enc"].shape[1], L), np.float32)
    for i in range(L):
        out[i, :, i:] = np.linalg.norm(f[f"W_dec_{i}"], axis=-1)
    return out


def layer_top(a: dict, meta: dict, i: int, rows, latents: np.ndarray, n_top: int,
              chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer i's latents on its raw held-out rows of mlp_in [N, d_in]: (density [M], the fraction
    of rows each fires on; activations [S, n] and row indices [S, n] of the ``n_top`` rows where each
    of ``latents`` [S] fires most, strongest first; activation 0: fired on fewer rows)."""
    f = {k: jnp.asarray(v) for k, v in clt_io.fold(a, meta).items()}
    lat = jnp.asarray(latents, jnp.int32)
    n = min(n_top, len(rows))

    @jax.jit
    def stats(x, valid):
        act = jnp.where((jnp.arange(x.shape[0]) < valid)[:, None], _encode(f, meta, i, x), 0.0)
        v, j = jax.lax.top_k(act[:, lat].T, n)
        return jnp.sum(act > 0, 0), v, j

    fired = np.zeros(a["b_enc"].shape[1], np.int64)
    best_v = np.full((len(latents), n), -np.inf, np.float32)
    best_i = np.zeros((len(latents), n), np.int64)
    for s in range(0, len(rows), chunk):
        x = np.asarray(rows[s:s + chunk], np.float32)
        valid = len(x)
        if valid < n:  # top_k needs n rows: pad with rows that are dropped below
            x = np.concatenate([x, np.zeros((n - valid, x.shape[1]), np.float32)])
        c, v, j = (np.asarray(t) for t in stats(jnp.asarray(x), valid))
        fired += c
        v = np.where(j < valid, v, -np.inf)
        allv, alli = np.concatenate([best_v, v], -1), np.concatenate([best_i, j + s], -1)
        order = np.argsort(-allv, axis=-1, kind="stable")[:, :n]
        best_v, best_i = np.take_along_axis(allv, order, -1), np.take_along_axis(alli, order, -1)
    return fired / max(1, len(rows)), np.maximum(best_v, 0.0), best_i


def replacement_losses(model, params, a: dict, meta: dict, tokens: np.ndarray, policy: splice.Policy,
                       batch: int = 8) -> dict:
    """Delta LM loss, CE score and KL of the replacement model over held-out ``tokens`` [n, T]
    (``splice.all_at_once_pass``)."""
    f = {k: jnp.asarray(v) for k, v in clt_io.fold(a, meta).items()}
    layers = list(meta["layers"])

    def y_hat(j):
        def fn(f, ins):
            return f["b_dec"][j] + sum(_encode(f, meta, i, ins[i]) @ f[f"W_dec_{i}"][:, j - i] for i in range(j + 1))
        return fn

    writes = {f"mlp.{layers[j]}": (tuple(f"mlp_in.{layers[i]}" for i in range(j + 1)), y_hat(j))
              for j in range(len(layers))}
    return splice.all_at_once_losses(splice.all_at_once_pass(model, writes, policy), params, f, tokens, batch,
                                     splice.vocab_size(model))
