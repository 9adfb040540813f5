"""Feature absorption (Chanin et al. 2024, "A is for Absorption"): a latent that tracks a feature
stops firing where a more specific feature is present, because another latent whose decoder
carries the feature's direction fires instead.

For labelled rows (``labels`` [N, F]: which rows hold feature i) and each feature's direction
(``directions`` [F, d]: the planted one, or a linear probe's; by default the difference of the
mean row with and without the feature), with latents f [N, M] and decoder W_dec [M, d]:

    main latent of i   the latent whose firing (f > 0) best predicts the label (F1)
    recall             fraction of the feature's rows where its main latent fires
    absorbed           the feature's rows where its main latent does not fire but another latent
                       whose decoder row has cosine >= ``cos_min`` with the direction fires
    rate               absorbed rows / the feature's rows; ``rate`` of the SAE: the mean over features

Reusable: ``measure`` takes any SAE with ``encode`` and ``arrays["W_dec"]`` (saejax.release.SAE,
so also Gemma Scope's) and raw rows; ``absorption`` takes the latents themselves.
"""
from __future__ import annotations

import numpy as np


def mean_difference_directions(rows, labels) -> np.ndarray:
    """[F, d]: the mean of the rows holding each feature minus the mean of those that do not, unit norm."""
    rows, labels = np.asarray(rows, np.float64), np.asarray(labels, bool)
    with_ = labels.T @ rows / np.maximum(labels.sum(0), 1)[:, None]
    without = (~labels).T @ rows / np.maximum((~labels).sum(0), 1)[:, None]
    diff = with_ - without
    return diff / np.maximum(np.linalg.norm(diff, axis=1, keepdims=True), 1e-12)


def absorption(latents, w_dec, labels, directions, cos_min: float = 0.3) -> dict:
    """The measure of the module docstring from latents [N, M], W_dec [M, d], labels [N, F] and
    directions [F, d]. Returns {"rate", "recall"} (means over features) and per feature lists
    "rates", "recalls", "main_latent", "f1", "absorbers" (how many latents qualify as absorbing)."""
    fires = np.asarray(latents) > 0
    labels = np.asarray(labels, bool)
    if fires.shape[0] != labels.shape[0]:
        raise ValueError(f"absorption: {fires.shape[0]} rows of latents but {labels.shape[0]} rows of labels")
    w = np.asarray(w_dec, np.float64)
    cos = (w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)) @ np.asarray(directions, np.float64).T
    f32 = fires.astype(np.float64)
    out = {"rates": [], "recalls": [], "main_latent": [], "f1": [], "absorbers": []}
    for i in range(labels.shape[1]):
        y = labels[:, i]
        n = int(y.sum())
        if n == 0:
            raise ValueError(f"absorption: feature {i} has no labelled rows")
        tp = f32[y].sum(0)
        f1 = 2 * tp / (n + f32.sum(0))
        main = int(np.argmax(f1))
        others = cos[:, i] >= cos_min
        others[main] = False
        missed = y & ~fires[:, main]
        absorbed = missed & fires[:, others].any(1)
        out["rates"].append(float(absorbed.sum() / n))
        out["recalls"].append(float(fires[y, main].mean()))
        out["main_latent"].append(main)
        out["f1"].append(float(f1[main]))
        out["absorbers"].append(int(others.sum()))
    out["rate"] = float(np.mean(out["rates"]))
    out["recall"] = float(np.mean(out["recalls"]))
    return out


def measure(sae, rows, labels, directions=None, cos_min: float = 0.3, chunk: int = 8192) -> dict:
    """``absorption`` of a released SAE (``encode(x)``, ``arrays["W_dec"]``; saejax.release.SAE) on raw
    rows [N, d] with labels [N, F]; ``directions`` default to ``mean_difference_directions``."""
    rows = np.asarray(rows, np.float32)
    f = np.concatenate([np.asarray(sae.encode(rows[s:s + chunk])) for s in range(0, len(rows), chunk)])
    if directions is None:
        directions = mean_difference_directions(rows, labels)
    return absorption(f, sae.arrays["W_dec"], labels, directions, cos_min)
