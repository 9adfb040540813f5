"""Layer groups (Ghilardi et al., "Efficient Training of Sparse Autoencoders for Large Language
Models via Layer Groups", 2024): how far the residual stream turns from layer to layer.

On held-out tokens present at every res site (matched by context and position), the angular
distance between two layers' residual streams is arccos(cos(x_i, x_j)) / pi per token, averaged.
The layers are then grouped by agglomerative clustering of that distance matrix
(``scipy.cluster.hierarchy.linkage``, average linkage) cut into ``k`` groups (``fcluster``
"maxclust"); the paper trains one SAE per group of adjacent layers, so ``contiguous`` says whether
every group is a run of adjacent layers. ``config_value`` writes the grouping as a value of the
config key ``sae.layer_groups`` (each group cut into its runs of adjacent layers), which trains one
SAE per group on its layers' pooled rows.
"""
from __future__ import annotations

import numpy as np


def align(rows: dict[int, tuple[np.ndarray, np.ndarray]], limit: int | None = None) -> tuple[np.ndarray, int]:
    """Held-out rows of several layers -> [L, n, d] float32 of the tokens every layer has (by
    context and position, in one order), at most ``limit`` of them; and n."""
    keys = {}
    for layer, (x, meta) in rows.items():
        meta = np.asarray(meta, np.int64)
        keys[layer] = (meta[:, 1] << 32) + meta[:, 2]  # (context, position)
    common = None
    for k in keys.values():
        common = np.unique(k) if common is None else np.intersect1d(common, k)
    common = common[:limit] if limit else common
    out = []
    for layer, (x, _) in rows.items():
        order = np.argsort(keys[layer], kind="stable")
        pos = order[np.searchsorted(keys[layer], common, sorter=order)]
        out.append(np.asarray(x, np.float32)[pos])
    return np.stack(out), len(common)


def angular_distances(x: np.ndarray, block: int = 8192) -> np.ndarray:
    """x [L, n, d] -> [L, L]: the mean over tokens of arccos(cos(x_i, x_j)) / pi."""
    u = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    n_layers, n = x.shape[:2]
    d = np.zeros((n_layers, n_layers))
    for i in range(n_layers):
        for j in range(i + 1, n_layers):
            tot = 0.0
            for s in range(0, n, block):
                c = np.einsum("nd,nd->n", u[i, s:s + block], u[j, s:s + block], dtype=np.float64)
                tot += float(np.arccos(np.clip(c, -1.0, 1.0)).sum())
            d[i, j] = d[j, i] = tot / max(1, n) / np.pi
    return d


def groups(layers: list[int], dist: np.ndarray, k: int) -> dict:
    """Agglomerative grouping of ``layers`` by their distance matrix into at most ``k`` groups."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform
    k = max(1, min(k, len(layers)))
    if len(layers) == 1:
        return {"k": 1, "groups": [list(layers)], "contiguous": True, "linkage": []}
    z = linkage(squareform(dist, checks=False), method="average")
    label = fcluster(z, k, criterion="maxclust")
    out = []
    for c in sorted(set(label), key=lambda c: min(i for i, lab in enumerate(label) if lab == c)):
        out.append([layers[i] for i in range(len(layers)) if label[i] == c])
    pos = {layer: i for i, layer in enumerate(layers)}
    contiguous = all(pos[g[-1]] - pos[g[0]] == len(g) - 1 for g in out)
    return {"k": len(out), "groups": out, "contiguous": contiguous, "linkage": np.round(z, 6).tolist()}


def config_value(groups: list[list[int]]) -> str:
    """The grouping as a ``sae.layer_groups`` value, e.g. ``((0, 1, 2), (3, 4))``: every group cut into
    runs of adjacent layers (the training mode pools adjacent layers only), ordered by first layer."""
    runs = []
    for g in groups:
        g = sorted(g)
        start = 0
        for i in range(1, len(g) + 1):
            if i == len(g) or g[i] != g[i - 1] + 1:
                runs.append(tuple(g[start:i]))
                start = i
    return "(" + ", ".join("(" + ", ".join(map(str, r)) + ("," if len(r) == 1 else "") + ")"
                           for r in sorted(runs)) + ("," if len(runs) == 1 else "") + ")"


def layer_groups(rows: dict[int, tuple[np.ndarray, np.ndarray]], k: int = 0, limit: int | None = None) -> dict:
    """Held-out res rows per layer ({layer: (x [n, d], meta [n, 3])}) -> the JSON of layer_groups.json:
    layers, tokens, the distance matrix, adjacent distances, and the grouping (``k`` 0: n // 4, at least 2)."""
    layers = sorted(rows)
    x, n = align({layer: rows[layer] for layer in layers}, limit)
    dist = angular_distances(x)
    k = k or min(len(layers), max(2, len(layers) // 4))
    g = groups(layers, dist, k)
    return {"layers": layers, "n_tokens": n, "distance": np.round(dist, 6).tolist(),
            "adjacent": [{"a": a, "b": b, "angular_distance": float(dist[i, i + 1])}
                         for i, (a, b) in enumerate(zip(layers, layers[1:]))],
            **g, "config": config_value(g["groups"])}
