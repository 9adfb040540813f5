"""Synthetic activations with planted ground-truth features, for tests and demos.

Each site has its own dictionary of ``n_features`` random unit directions in ``d`` dimensions.
A row is a non-negative mix of exactly ``active`` distinct features, drawn with Zipf-like
frequencies (p_i proportional to 1/(i+1)^zipf), with magnitudes in [0.5, 1.5), plus Gaussian
noise of standard deviation ``noise`` per dimension. Batches are a pure function of
(seed, site, step): the same step always gives the same rows, on any number of processes.
"""
from __future__ import annotations

import numpy as np


class SyntheticSource:
    """A training source (see docs/architecture.md) of planted-feature activations."""

    def __init__(self, sites=("res.0",), d=64, n_features=512, active=4, zipf=1.0, noise=0.01, seed=0):
        self.sites = list(sites)
        self.d, self.n_features, self.active, self.noise, self.seed = d, n_features, active, noise, seed
        self._log_p = -zipf * np.log(np.arange(1, n_features + 1, dtype=np.float64))
        self._features = {}
        self._scale = {}

    def width(self, site: str) -> int:
        self._check(site)
        return self.d

    def features(self, site: str) -> np.ndarray:
        """The planted unit directions of ``site``: [n_features, d] float32."""
        self._check(site)
        if site not in self._features:
            rng = np.random.default_rng([self.seed, 1, self.sites.index(site)])
            f = rng.standard_normal((self.n_features, self.d))
            self._features[site] = (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)
        return self._features[site]

    def _draw(self, site: str, step: int, batch_size: int):
        """The whole global batch of a step: feature indices [B, active], magnitudes, noise [B, d]."""
        rng = np.random.default_rng([self.seed, 2, self.sites.index(site), step])
        gumbel = rng.gumbel(size=(batch_size, self.n_features))
        mags = rng.uniform(0.5, 1.5, size=(batch_size, self.active))
        noise = rng.standard_normal((batch_size, self.d)) * self.noise
        idx = np.argpartition(-(self._log_p + gumbel), self.active, axis=1)[:, : self.active]
        return idx, mags, noise

    def codes(self, site: str, step: int, batch_size: int) -> np.ndarray:
        """The ground-truth feature coefficients of the rows of ``batch`` at ``step``: [B, n_features]."""
        return self._codes_and_noise(site, step, batch_size)[0]

    def _codes_and_noise(self, site: str, step: int, batch_size: int):
        idx, mags, noise = self._draw(site, step, batch_size)
        codes = np.zeros((batch_size, self.n_features), np.float32)
        np.put_along_axis(codes, idx, mags.astype(np.float32), axis=1)
        return codes, noise

    def _rows(self, site: str, step: int, batch_size: int) -> np.ndarray:
        codes, noise = self._codes_and_noise(site, step, batch_size)
        return (codes @ self.features(site) + noise).astype(np.float32)

    def batch(self, sites, step: int, batch_size: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        """Raw rows [T, batch_size / process_count, d]: this process's share of the global batch."""
        if batch_size % process_count:
            raise ValueError(f"batch size {batch_size} does not split over {process_count} processes")
        n = batch_size // process_count
        return np.stack([self._rows(s, step, batch_size)[process_index * n:(process_index + 1) * n] for s in sites])

    def norm_scale(self, site: str) -> float:
        """1 / sqrt(E||x||^2), estimated on 8,192 rows of a step training never reaches."""
        if site not in self._scale:
            x = self._rows(site, 2 ** 31 - 1, 8192)
            self._scale[site] = float(1.0 / np.sqrt(np.mean(np.sum(x.astype(np.float64) ** 2, axis=1))))
        return self._scale[site]

    def _check(self, site: str) -> None:
        if site not in self.sites:
            raise KeyError(f"site {site!r} is not in this source (it has {self.sites})")
