"""Synthetic activations with planted ground-truth features, for tests and demos.

Each site has its own dictionary of ``n_features`` random unit directions in ``d`` dimensions.
A row is a non-negative mix of exactly ``active`` distinct features, drawn with Zipf-like
frequencies (p_i proportional to 1/(i+1)^zipf), with magnitudes in [0.5, 1.5), plus Gaussian
noise of standard deviation ``noise`` per dimension. The ``active`` features of a row are drawn
i.i.d. from p by inverse-CDF lookup, and the rows that drew a feature twice are redrawn until all
are distinct (a set S has probability proportional to prod_{i in S} p_i). That costs O(B * active)
per batch instead of a Gumbel top-k over all n_features (O(B * n_features)), which made data
generation, not the SAE step, the bottleneck of small CPU runs. Batches are a pure function of
(seed, site, step): the same step always gives the same rows, on any number of processes.
"""
from __future__ import annotations

import numpy as np


class SyntheticSource:
    """A training source (see docs/architecture.md) of planted-feature activations."""

    def __init__(self, sites=("res.0",), d=64, n_features=512, active=4, zipf=1.0, noise=0.01, seed=0):
        self.sites = list(sites)
        self.d, self.n_features, self.active, self.noise, self.seed = d, n_features, active, noise, seed
        # what the rows are, for a resumed run's check (docs/architecture.md: Training sources)
        self.identity = {"synthetic": {"d": d, "n_features": n_features, "active": active, "zipf": zipf,
                                       "noise": noise, "seed": seed}}
        p = np.arange(1, n_features + 1, dtype=np.float64) ** -zipf
        self.frequencies = p / p.sum()  # probability of each feature per draw
        self._cdf = np.cumsum(self.frequencies)
        self._cdf[-1] = 1.0
        if active > n_features:
            raise ValueError(f"active={active} exceeds n_features={n_features}")
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
        idx = self._sample(rng, batch_size)
        while True:  # redraw the rows that hold a feature twice
            srt = np.sort(idx, axis=1)
            dup = np.any(srt[:, 1:] == srt[:, :-1], axis=1)
            if not dup.any():
                break
            idx[dup] = self._sample(rng, int(dup.sum()))
        mags = rng.uniform(0.5, 1.5, size=(batch_size, self.active)).astype(np.float32)
        noise = rng.standard_normal((batch_size, self.d), dtype=np.float32) * np.float32(self.noise)
        return idx, mags, noise

    def _sample(self, rng, n: int) -> np.ndarray:
        return np.searchsorted(self._cdf, rng.random((n, self.active)), side="right").astype(np.int64)

    def codes(self, site: str, step: int, batch_size: int) -> np.ndarray:
        """The ground-truth feature coefficients of the rows of ``batch`` at ``step``: [B, n_features]."""
        return self._codes_and_noise(site, step, batch_size)[0]

    def _codes_and_noise(self, site: str, step: int, batch_size: int):
        idx, mags, noise = self._draw(site, step, batch_size)
        codes = np.zeros((batch_size, self.n_features), np.float32)
        np.put_along_axis(codes, idx, mags.astype(np.float32), axis=1)
        return codes, noise

    def _rows(self, site: str, step: int, batch_size: int) -> np.ndarray:
        idx, mags, noise = self._draw(site, step, batch_size)
        return np.einsum("ba,bad->bd", mags, self.features(site)[idx]) + noise

    def batch(self, sites, step: int, batch_size: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        """Raw rows [T, batch_size / process_count, d]: this process's share of the global batch."""
        if batch_size % process_count:
            raise ValueError(f"batch size {batch_size} does not split over {process_count} processes")
        n = batch_size // process_count
        return np.stack([self._rows(s, step, batch_size)[process_index * n:(process_index + 1) * n] for s in sites])

    def heldout_batch(self, sites, batch_size: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        """Rows of a step training never reaches (2^40, as saejax evaluate uses): the quick evaluation."""
        return self.batch(sites, 2 ** 40, batch_size, process_index, process_count)

    def norm_scale(self, site: str) -> float:
        """1 / sqrt(E||x||^2), estimated on 8,192 rows of a step training never reaches."""
        if site not in self._scale:
            x = self._rows(site, 2 ** 31 - 1, 8192)
            self._scale[site] = float(1.0 / np.sqrt(np.mean(np.sum(x.astype(np.float64) ** 2, axis=1))))
        return self._scale[site]

    def _check(self, site: str) -> None:
        if site not in self.sites:
            raise KeyError(f"site {site!r} is not in this source (it has {self.sites})")


class SyntheticPairs(SyntheticSource):
    """Aligned (input, output) sites with a planted sparse map, for transcoders: sites ``mlp_in.L``
    and ``mlp.L`` for each of ``layers``.

    Row i of a step is one draw of the sparse code c (as SyntheticSource draws it, one draw per
    layer shared by its two sites) and, with ``dense`` > 0, a dense Gaussian z [dense] of standard deviation 0.5:

        x = c @ F_in + [0, z] + noise        F_in's unit rows span the first d - dense dimensions only
        y = c @ F_out + z @ A + noise        F_out [n_features, d] unit rows; A [dense, d], the planted
                                             linear part (``linear_map``), entries N(0, 1/dense)

    So a transcoder maps x's latents to F_out's rows, and the dense part, outside the span of the
    features, reaches y only linearly: what a skip-transcoder's W_skip recovers.
    """

    def __init__(self, layers=(0,), d=64, n_features=512, active=4, zipf=1.0, noise=0.01, seed=0, dense=0):
        sites = [s for layer in layers for s in (f"mlp_in.{layer}", f"mlp.{layer}")]
        super().__init__(sites, d=d, n_features=n_features, active=active, zipf=zipf, noise=noise, seed=seed)
        self.layers, self.dense = list(layers), dense
        self.identity["synthetic"].update(pairs=self.layers, dense=dense)

    def _layer(self, site: str) -> int:
        self._check(site)
        return self.layers.index(int(site.rsplit(".", 1)[1]))

    def _reads(self, site: str) -> bool:
        return site.startswith("mlp_in.")

    def features(self, site: str) -> np.ndarray:
        """The planted unit directions of ``site``: [n_features, d] float32 (an input site's are zero in
        its last ``dense`` dimensions)."""
        if site not in self._features:
            i = self._layer(site)
            rng = np.random.default_rng([self.seed, 1, i, 0 if self._reads(site) else 1])
            f = rng.standard_normal((self.n_features, self.d))
            if self._reads(site) and self.dense:
                f[:, self.d - self.dense:] = 0.0
            self._features[site] = (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)
        return self._features[site]

    def linear_map(self, layer: int) -> np.ndarray:
        """A [dense, d] float32: the planted linear part of layer ``layer``'s output."""
        rng = np.random.default_rng([self.seed, 4, self.layers.index(layer)])
        return (rng.standard_normal((self.dense, self.d)) / np.sqrt(max(self.dense, 1))).astype(np.float32)

    def _draw(self, site: str, step: int, batch_size: int):
        # one draw per layer: both sites of a pair see the same code (the noise is the site's own)
        idx, mags, _ = super()._draw(f"mlp_in.{self.layers[self._layer(site)]}", step, batch_size)
        rng = np.random.default_rng([self.seed, 5, self.sites.index(site), step])
        return idx, mags, rng.standard_normal((batch_size, self.d), dtype=np.float32) * np.float32(self.noise)

    def _rows(self, site: str, step: int, batch_size: int) -> np.ndarray:
        rows = super()._rows(site, step, batch_size)
        if self.dense:
            layer = self.layers[self._layer(site)]
            z = np.random.default_rng([self.seed, 6, self._layer(site), step]).standard_normal(
                (batch_size, self.dense), dtype=np.float32) * np.float32(0.5)
            if self._reads(site):
                rows[:, self.d - self.dense:] += z
            else:
                rows += z @ self.linear_map(layer)
        return rows


class HierarchicalSource(SyntheticSource):
    """Planted features in a hierarchy, for feature absorption (Chanin et al. 2024): ``n_parents``
    parents, each with ``children`` children that imply it.

    A row holds ``active`` distinct parents (uniformly drawn); each parent present brings, with
    probability ``p_child``, one of its own children (uniformly drawn), so a child never fires
    without its parent. Magnitudes in [0.5, 1.5), Gaussian noise as in ``SyntheticSource``. The
    features (``features``, ``codes``) are the parents, then parent p's children at
    n_parents + p * children + c; ``labels`` gives which parents a row holds. Batches are a pure
    function of (seed, site, step).
    """

    def __init__(self, sites=("res.0",), d=64, n_parents=8, children=4, active=2, p_child=0.75,
                 noise=0.01, seed=0):
        if active > n_parents:
            raise ValueError(f"active={active} exceeds n_parents={n_parents}")
        super().__init__(sites, d, n_parents * (1 + children), 1, 0.0, noise, seed)
        self.n_parents, self.children, self.active, self.p_child = n_parents, children, active, p_child
        self.identity = {"hierarchical": {"d": d, "n_parents": n_parents, "children": children, "active": active,
                                          "p_child": p_child, "noise": noise, "seed": seed}}

    def _draw(self, site: str, step: int, batch_size: int):
        """Feature indices [B, 2 * active] (-1: no child), magnitudes, noise [B, d]."""
        rng = np.random.default_rng([self.seed, 3, self.sites.index(site), step])
        parents = np.argsort(rng.random((batch_size, self.n_parents)), axis=1)[:, :self.active]
        child = self.n_parents + parents * self.children + rng.integers(0, self.children, parents.shape)
        child = np.where(rng.random(parents.shape) < self.p_child, child, -1)
        mags = rng.uniform(0.5, 1.5, size=(batch_size, 2 * self.active)).astype(np.float32)
        noise = rng.standard_normal((batch_size, self.d), dtype=np.float32) * np.float32(self.noise)
        return np.concatenate([parents, child], 1), mags, noise

    def _codes_and_noise(self, site: str, step: int, batch_size: int):
        idx, mags, noise = self._draw(site, step, batch_size)
        codes = np.zeros((batch_size, self.n_features + 1), np.float32)  # column -1: absent children
        np.put_along_axis(codes, np.where(idx < 0, self.n_features, idx), mags, axis=1)
        return codes[:, :-1], noise

    def _rows(self, site: str, step: int, batch_size: int) -> np.ndarray:
        codes, noise = self._codes_and_noise(site, step, batch_size)
        return codes @ self.features(site) + noise

    def labels(self, site: str, step: int, batch_size: int) -> np.ndarray:
        """Which parents each row of ``batch`` at ``step`` holds: [B, n_parents] bool."""
        return self.codes(site, step, batch_size)[:, :self.n_parents] > 0
