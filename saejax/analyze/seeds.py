"""Seed stability (Paulo and Belrose, "Sparse Autoencoders Trained on the Same Data Learn Different
Features", 2025).

Two SAEs of one site and width that differ only in their random init (``sae.seeds``: stacked
members that read the same rows). Their latents are matched one to one, maximizing the summed cosine
of the decoder rows (and, separately, of the encoder columns); a latent is *shared* when its match's
cosine is at least ``threshold``. Reported overall and per bin of the latent's firing frequency
(in the first SAE, on held-out rows).

Matching. Up to ``full_max`` latents: the Hungarian algorithm on the full cosine matrix
(``scipy.optimize.linear_sum_assignment``; M^2 float64: 2.1 GB at 16,384, 137 GB at 131,072).
Above it: each latent's ``candidates`` best partners by cosine (both directions, computed in row
blocks) form a sparse bipartite graph, solved exactly by
``scipy.sparse.csgraph.min_weight_full_bipartite_matching`` after adding a dummy partner per latent
(cost 1 per unmatched side, so every candidate pair with cosine > -1 beats leaving both unmatched):
the best one-to-one matching among the candidate pairs; latents left without one count as unshared.
"""
from __future__ import annotations

import numpy as np

from saejax.analyze.common import frequency

EPS = 1e-6  # csgraph drops zero-weight edges: every edge costs at least this
BINS = np.arange(-5.0, 0.01, 0.5)  # log10 firing frequency bin edges (rarer live latents go in the first)


def unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float32)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def top_candidates(a: np.ndarray, b: np.ndarray, c: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``a`` (unit rows [M, d]) its ``c`` most cosine-similar rows of ``b`` [N, d]:
    (index [M, c], cosine [M, c]), computed ``block`` rows at a time."""
    c = min(c, len(b))
    idx = np.empty((len(a), c), np.int64)
    cos = np.empty((len(a), c), np.float32)
    for i in range(0, len(a), block):
        s = a[i:i + block] @ b.T
        j = np.argpartition(-s, c - 1, axis=1)[:, :c] if c < len(b) else np.broadcast_to(np.arange(len(b)), s.shape)
        idx[i:i + block], cos[i:i + block] = j, np.take_along_axis(s, j, axis=1)
    return idx, cos


def match(a: np.ndarray, b: np.ndarray, full_max: int = 4608, candidates: int = 16) -> tuple[np.ndarray, np.ndarray, str]:
    """One-to-one matching of the rows of ``a`` [M, d] to the rows of ``b`` [N, d] by cosine:
    (partner [M] int, -1 where unmatched; cosine [M], 0 where unmatched; method "hungarian" or
    "candidates")."""
    from scipy.optimize import linear_sum_assignment
    a, b = unit(a), unit(b)
    m, n = len(a), len(b)
    partner, cos = np.full(m, -1, np.int64), np.zeros(m, np.float32)
    if max(m, n) <= full_max:
        c = a @ b.T
        r, j = linear_sum_assignment(c, maximize=True)
        partner[r], cos[r] = j, c[r, j]
        return partner, cos, "hungarian"
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching
    ia, ca = top_candidates(a, b, candidates)
    ib, cb = top_candidates(b, a, candidates)
    rows = np.concatenate([np.repeat(np.arange(m), ia.shape[1]), ib.ravel()])
    cols = np.concatenate([ia.ravel(), np.repeat(np.arange(n), ib.shape[1])])
    w = np.concatenate([ca.ravel(), cb.ravel()]).astype(np.float64)
    _, first = np.unique(rows * n + cols, return_index=True)  # each candidate pair once
    rows, cols, w = rows[first], cols[first], w[first]
    # Left nodes: a_i (0..m-1), dummy_b_j (m..m+n-1); right nodes: b_j (0..n-1), dummy_a_i (n..n+m-1).
    er = np.concatenate([rows, np.arange(m), m + np.arange(n), m + cols])
    ec = np.concatenate([cols, n + np.arange(m), np.arange(n), n + rows])
    ew = np.concatenate([1.0 - w + EPS, np.full(m, 1.0 + EPS), np.full(n, 1.0 + EPS), np.full(len(w), EPS)])
    g = csr_matrix((ew, (er, ec)), shape=(m + n, n + m))
    r, c = min_weight_full_bipartite_matching(g)
    got = np.full(m + n, n, np.int64)
    got[r] = c
    got = got[:m]
    ok = got < n
    partner[ok] = got[ok]
    cos[ok] = np.einsum("id,id->i", a[ok], b[got[ok]])
    return partner, cos, "candidates"


def stability(sae_a, sae_b, x_eval: np.ndarray, threshold: float = 0.7, full_max: int = 4608,
              candidates: int = 16) -> dict:
    """Two released SAEs of one site (seed twins): the matched latents' cosines and the fraction
    shared, overall and per bin of log10 firing frequency of ``sae_a``'s latents on ``x_eval``."""
    wa, wb = np.asarray(sae_a.arrays["W_dec"]), np.asarray(sae_b.arrays["W_dec"])
    ea, eb = np.asarray(sae_a.arrays["W_enc"]).T, np.asarray(sae_b.arrays["W_enc"]).T
    _, cos_dec, method = match(wa, wb, full_max, candidates)
    _, cos_enc, _ = match(ea, eb, full_max, candidates)
    freq = frequency(sae_a, x_eval)
    shared_dec, shared_enc = cos_dec >= threshold, cos_enc >= threshold
    live = freq > 0
    logf = np.log10(np.where(live, freq, 1.0))
    which = np.clip(np.searchsorted(BINS, logf, side="right") - 1, 0, len(BINS) - 2)
    count, dec, enc = [int((~live).sum())], [_frac(shared_dec[~live])], [_frac(shared_enc[~live])]
    for i in range(len(BINS) - 1):
        sel = live & (which == i)
        count.append(int(sel.sum()))
        dec.append(_frac(shared_dec[sel]))
        enc.append(_frac(shared_enc[sel]))
    return {"method": method, "latents": int(len(cos_dec)), "threshold": threshold,
            "shared_decoder": _frac(shared_dec), "shared_encoder": _frac(shared_enc),
            "shared_both": _frac(shared_dec & shared_enc),
            "mean_cos_decoder": float(cos_dec.mean()), "mean_cos_encoder": float(cos_enc.mean()),
            "shared_decoder_live": _frac(shared_dec[live]),
            "by_frequency": {"bins": ["dead"] + [f"[{lo:g}, {hi:g})" for lo, hi in zip(BINS[:-1], BINS[1:])],
                             "log10_edges": BINS.tolist(), "count": count,
                             "shared_decoder": dec, "shared_encoder": enc}}


def _frac(mask: np.ndarray) -> float | None:
    return float(mask.mean()) if mask.size else None
