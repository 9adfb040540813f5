"""Synthetic aligned MLP inputs and outputs with a planted cross-layer map, for CLT tests.

Layer l has ``n_features`` features, each a unit input direction E_l[i] (d) and a decoder
D_l[i] [L - l, d] that writes a unit direction into its own layer's output and, for l < L - 1, one
into a later layer t_i (drawn per feature), zero elsewhere. A row draws ``active`` distinct
features per layer, uniformly (or, with ``zipf`` > 0, feature i with weight (i + 1)^-zipf: a few
frequent features and a tail, what Matryoshka prefixes are for), with magnitudes a in [0.5, 1.5):

    mlp_in.l  = sum_i a_{l,i} E_l[i] + noise
    mlp.l'    = sum_{l <= l'} sum_i a_{l,i} D_l[i, l' - l] + noise

So the output of layer l' holds features encoded at earlier layers: a per-layer transcoder cannot
recover them from mlp_in.l' alone, a CLT can. Batches are a pure function of (seed, step).
"""
from __future__ import annotations

import numpy as np


def _unit(a):
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


class SyntheticCLT:
    """A training source (docs/architecture.md) of sites mlp_in.l and mlp.l, l < layers, rows aligned."""

    def __init__(self, layers=3, d=32, n_features=32, active=3, noise=0.01, seed=0, zipf=0.0):
        self.L, self.d, self.n, self.active, self.noise, self.seed = layers, d, n_features, active, noise, seed
        self.zipf = zipf
        self.sites = [f"mlp_in.{l}" for l in range(layers)] + [f"mlp.{l}" for l in range(layers)]
        self.identity = {"synthetic_clt": {"layers": layers, "d": d, "n_features": n_features,
                                           "active": active, "noise": noise, "seed": seed,
                                           **({"zipf": zipf} if zipf else {})}}
        rng = np.random.default_rng([seed, 7])
        self.enc = [_unit(rng.standard_normal((n_features, d))) for _ in range(layers)]
        self.dec, self.targets = [], []
        for l in range(layers):
            D = np.zeros((n_features, layers - l, d), np.float32)
            D[:, 0] = _unit(rng.standard_normal((n_features, d)))
            t = rng.integers(l + 1, layers, n_features) if l < layers - 1 else np.full(n_features, l)
            for i in np.nonzero(t > l)[0]:
                D[i, t[i] - l] = _unit(rng.standard_normal(d))
            self.dec.append(D)
            self.targets.append(t)
        self._scale = {}

    def width(self, site: str) -> int:
        return self.d

    def _codes(self, step: int, B: int) -> np.ndarray:
        """[L, B, n] non-negative codes, ``active`` nonzero per layer and row."""
        rng = np.random.default_rng([self.seed, 8, step])
        u = rng.random((self.L, B, self.n))
        if self.zipf:  # Gumbel top-k: ``active`` distinct features drawn by weight without replacement
            u = -self.zipf * np.log(np.arange(1, self.n + 1)) - np.log(-np.log(u))
            pick = np.argsort(-u, -1)[..., :self.active]
        else:
            pick = np.argsort(u, -1)[..., :self.active]
        codes = np.zeros((self.L, B, self.n), np.float32)
        np.put_along_axis(codes, pick, rng.uniform(0.5, 1.5, (self.L, B, self.active)).astype(np.float32), -1)
        return codes

    def _all(self, step: int, B: int) -> dict:
        codes = self._codes(step, B)
        rng = np.random.default_rng([self.seed, 9, step])
        out = {}
        for l in range(self.L):
            out[f"mlp_in.{l}"] = codes[l] @ self.enc[l]
            out[f"mlp.{l}"] = sum(codes[s] @ self.dec[s][:, l - s] for s in range(l + 1))
        return {k: v + self.noise * rng.standard_normal(v.shape).astype(np.float32) for k, v in out.items()}

    def batch(self, sites, step: int, batch_size: int, process_index: int = 0, process_count: int = 1):
        n = batch_size // process_count
        rows = self._all(step, batch_size)
        return np.stack([rows[s][process_index * n:(process_index + 1) * n] for s in sites]).astype(np.float32)

    def heldout_batch(self, sites, batch_size: int, process_index: int = 0, process_count: int = 1):
        return self.batch(sites, 2 ** 40, batch_size, process_index, process_count)

    def norm_scale(self, site: str) -> float:
        if site not in self._scale:
            x = self._all(2 ** 31 - 1, 4096)[site].astype(np.float64)
            self._scale[site] = float(1.0 / np.sqrt(np.mean(np.sum(x ** 2, -1))))
        return self._scale[site]
