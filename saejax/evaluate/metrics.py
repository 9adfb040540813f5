"""Reconstruction metrics of trained groups on held-out rows.

Per SAE, over every held-out row of its site (streamed in chunks, one compiled pass per site for
all K sweep members at once):
    l0                    mean number of active latents per token
    fvu                   sum ||x - x_hat||^2 / sum ||x - mean(x)||^2   (variance around the data mean)
    explained_variance    1 - fvu
    fvu_prefix            Matryoshka groups: {m_i: the FVU of the first m_i latents alone}
    dead_frac             latents that never fire on the held-out rows
    dense_1pct/10pct      latents firing on more than 1% / 10% of tokens
    density_hist          histogram of log10 firing frequency of the live latents
All in the normalized space the SAE was trained in (x = x_raw * norm_scale); FVU is scale-free.
A transcoder's are of its output site: FVU of the written site's rows, latents from the read site's.
``top_activations`` finds, for chosen latents, the rows where each fires most (latent cards).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from saejax.sae import apply, matryoshka

HIST_BINS = np.linspace(-6.0, 0.0, 25)  # log10 firing frequency


ROW_BUDGET = 2 ** 28  # bytes of one [K, rows, M] float32 latent array per chunk


def _rows_per_chunk(chunk: int, K: int, M: int) -> int:
    """Rows per chunk so that the latents of all K SAEs stay within ROW_BUDGET (wide SAEs)."""
    return max(16, min(chunk, ROW_BUDGET // (4 * K * M)))


@partial(jax.jit, static_argnames=("arch", "ks", "prefixes"))
def _chunk_stats(arch, ks, arrays, x, y, prefixes=()):
    """arrays of one site [1, K, ...]; x [N, d] normalized, y [N, d_out] its target (x for an SAE)
    -> (sq_err [K], active [K], fires [K, M], each Matryoshka prefix's sq_err [n, K] (n = 0 without))."""
    f = apply.encode_stacked(arch, arrays, x[None], ks)  # [1, K, N, M]
    x_hat = apply.decode_stacked(arrays, f, x[None])
    err = jnp.sum(jnp.square(x_hat - y[None, None]), axis=(2, 3))[0]
    if prefixes:  # each prefix's reconstruction, plus whatever else x_hat holds (a skip term)
        hats = matryoshka.prefix_hats(f, arrays["W_dec"], arrays["b_dec"], prefixes, apply.HIGHEST)
        hats = hats + (x_hat - hats[-1])[None]
        err_prefix = jnp.sum(jnp.square(hats - y[None, None, None]), axis=(3, 4))[:, 0]
    else:
        err_prefix = jnp.zeros((0, err.shape[0]))
    active = f[0] != 0
    return err, jnp.sum(active, axis=(1, 2)), jnp.sum(active, axis=1), err_prefix


def site_metrics(meta: dict, arrays: dict, t: int, rows, chunk: int = 4096, return_density: bool = False,
                 read_rows=None):
    """Metrics of the K SAEs of site index ``t`` of a group over raw held-out ``rows`` [N, d].
    Transcoders: ``read_rows`` [N, d_in], the aligned rows of the site they read; FVU, the metrics'
    target, is then of the written site's ``rows``.

    Returns a list of K dicts (see the module docstring); with ``return_density`` also the firing
    frequency of every latent, [K, M] float64.
    """
    arch = meta["arch"]
    folded = apply.site_arrays(meta, arrays, t)
    scale = np.float32(meta["norm_scale"][t])
    if read_rows is not None and len(read_rows) != len(rows):
        raise ValueError(f"site {meta['sites'][t]}: {len(rows)} held-out rows, {len(read_rows)} of the site read")
    in_scale = np.float32(meta["read_norm_scale"][t]) if read_rows is not None else scale
    K, M = folded["b_enc"].shape[1], folded["b_enc"].shape[2]
    chunk = _rows_per_chunk(chunk, K, M)
    prefixes = tuple(meta.get("matryoshka", ()))
    sq_err, active, fires, sq_prefix = np.zeros(K), np.zeros(K), np.zeros((K, M)), np.zeros((len(prefixes), K))
    n, sum_x, sum_x2 = 0, 0.0, 0.0
    for start in range(0, len(rows), chunk):
        x = np.asarray(rows[start:start + chunk], np.float32) * scale
        x_in = x if read_rows is None else np.asarray(read_rows[start:start + chunk], np.float32) * in_scale
        e, a, f, ep = _chunk_stats(arch, apply.inference_ks(meta), folded, jnp.asarray(x_in), jnp.asarray(x),
                                   prefixes)
        sq_err += np.asarray(e, np.float64)
        sq_prefix += np.asarray(ep, np.float64)
        active += np.asarray(a, np.float64)
        fires += np.asarray(f, np.float64)
        n += len(x)
        sum_x = sum_x + x.astype(np.float64).sum(0)
        sum_x2 += float(np.sum(x.astype(np.float64) ** 2))
    if n == 0:
        raise ValueError(f"no held-out rows for site {meta['sites'][t]}")
    total_var = sum_x2 - float(np.sum(sum_x ** 2)) / n
    out = []
    for k in range(K):
        density = fires[k] / n
        live = density[density > 0]
        hist, _ = np.histogram(np.log10(live), bins=HIST_BINS)
        fvu = float(sq_err[k] / total_var)
        out.append({
            "l0": float(active[k] / n), "fvu": fvu, "explained_variance": 1.0 - fvu,
            "dead_frac": float(np.mean(density == 0)), "dense_1pct": float(np.mean(density > 0.01)),
            "dense_10pct": float(np.mean(density > 0.1)),
            "density_hist": {"log10_bins": HIST_BINS.tolist(), "counts": hist.tolist()}, "n_tokens": n,
        })
        if prefixes:  # Matryoshka: each prefix's latents alone
            out[-1]["fvu_prefix"] = {str(m): float(sq_prefix[i, k] / total_var) for i, m in enumerate(prefixes)}
    return (out, fires / n) if return_density else out


@partial(jax.jit, static_argnames=("arch", "ks", "n_top"))
def _chunk_top(arch, ks, n_top, arrays, latents, x, offset):
    """Top ``n_top`` activations of chosen latents in one chunk.

    latents [K, S] int; x [N, d] normalized -> (values [K, S, n], row indices [K, S, n])."""
    f = apply.encode_stacked(arch, arrays, x[None], ks)[0]  # [K, N, M]
    picked = jnp.take_along_axis(f, latents[:, None, :], axis=2)  # [K, N, S]
    vals, idx = jax.lax.top_k(jnp.swapaxes(picked, 1, 2), n_top)  # [K, S, n]
    return vals, idx + offset


def top_activations(meta: dict, arrays: dict, t: int, rows, latents: np.ndarray, n_top: int = 10,
                    chunk: int = 4096, scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For latents [K, S] of site t's K SAEs, the ``n_top`` rows of ``rows`` [N, d] (raw) where each
    fires most: (activations [K, S, n] in the training (normalized) scale, row indices [K, S, n]).
    Entries with activation 0 mean the latent fired on fewer than n rows. ``scale``: the rows' norm
    scale (default the site's; a transcoder's rows are those of the site it reads, at its scale)."""
    folded = apply.site_arrays(meta, arrays, t)
    scale = np.float32(meta["norm_scale"][t] if scale is None else scale)
    lat = jnp.asarray(latents, jnp.int32)
    chunk = _rows_per_chunk(chunk, *folded["b_enc"].shape[1:])
    n = min(n_top, len(rows), chunk)
    best_v = np.full(latents.shape + (n,), -np.inf, np.float32)
    best_i = np.zeros(latents.shape + (n,), np.int64)
    for start in range(0, len(rows), chunk):
        x = np.asarray(rows[start:start + chunk], np.float32) * scale
        if len(x) < n:  # top_k needs n rows: pad with rows that cannot win (never selected below)
            x = np.concatenate([x, np.zeros((n - len(x), x.shape[1]), np.float32)])
        v, i = _chunk_top(meta["arch"], apply.inference_ks(meta), n, folded, lat, jnp.asarray(x), start)
        v, i = np.asarray(v), np.asarray(i)
        v = np.where(i < len(rows), v, -np.inf)
        allv, alli = np.concatenate([best_v, v], -1), np.concatenate([best_i, i], -1)
        order = np.argsort(-allv, axis=-1, kind="stable")[..., :n]
        best_v, best_i = np.take_along_axis(allv, order, -1), np.take_along_axis(alli, order, -1)
    return np.maximum(best_v, 0.0), best_i
