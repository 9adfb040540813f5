"""The analysis plots (matplotlib, no display needed).

    dark_matter.png    per SAE: FVU split into the part a linear map from the input predicts and the rest
    seeds.png          per seed pair: the fraction of latents shared against log10 firing frequency
    layer_groups.png   angular distance between res layers, with the groups outlined
    absorption.png     per SAE: the first-letter absorption rate (mean over letters, 95% interval)
"""
from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure


def _save(fig, path):
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def dark_matter(doc: dict, path: str) -> None:
    saes = doc["saes"]
    fig = Figure(figsize=(max(5.0, 0.35 * len(saes) + 2), 4.0))
    ax = fig.add_subplot()
    x = np.arange(len(saes))
    lin = [s["fvu_linear"] for s in saes]
    nonlin = [s["fvu_nonlinear"] for s in saes]
    ax.bar(x, lin, label="linearly predictable from x")
    ax.bar(x, nonlin, bottom=lin, label="nonlinear remainder")
    ax.set_xticks(x, [s["label"] for s in saes], rotation=70, fontsize=7)
    ax.set_ylabel("FVU (held-out)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def seeds(doc: dict, path: str) -> None:
    fig = Figure(figsize=(6.5, 4.0))
    ax = fig.add_subplot()
    for p in doc["pairs"]:
        f = p["by_frequency"]
        edges = np.asarray(f["log10_edges"])
        mid = (edges[:-1] + edges[1:]) / 2
        pts = [(m, v) for m, v, c in zip(mid, f["shared_decoder"][1:], f["count"][1:]) if v is not None and c]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{p['a']['label']} vs s{p['b']['seed']}")
    ax.set_xlabel("log10 firing frequency (first seed, held-out)")
    ax.set_ylabel(f"fraction shared (decoder cosine >= {doc['threshold']:g})")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if doc["pairs"] and len(doc["pairs"]) <= 16:
        ax.legend(fontsize=7)
    _save(fig, path)


def layer_groups(doc: dict, path: str) -> None:
    layers, dist = doc["layers"], np.asarray(doc["distance"])
    fig = Figure(figsize=(5.5, 4.6))
    ax = fig.add_subplot()
    im = ax.imshow(dist, cmap="viridis")
    fig.colorbar(im, ax=ax, label="mean angular distance / pi")
    ticks = np.arange(len(layers))
    ax.set_xticks(ticks, layers, fontsize=7)
    ax.set_yticks(ticks, layers, fontsize=7)
    pos = {layer: i for i, layer in enumerate(layers)}
    for g in doc["groups"]:
        i0, i1 = pos[g[0]] - 0.5, pos[g[-1]] + 0.5
        ax.plot([i0, i1, i1, i0, i0], [i0, i0, i1, i1, i0], color="red", lw=1.5)
    ax.set_xlabel("res layer")
    ax.set_ylabel("res layer")
    _save(fig, path)


def absorption(doc: dict, path: str) -> None:
    saes = doc["saes"]
    fig = Figure(figsize=(max(5.0, 0.35 * len(saes) + 2), 4.0))
    ax = fig.add_subplot()
    x = np.arange(len(saes))
    rate = np.array([np.nan if s["rate"] is None else s["rate"] for s in saes], float)
    lo = np.array([np.nan if s["rate_ci"][0] is None else s["rate_ci"][0] for s in saes], float)
    hi = np.array([np.nan if s["rate_ci"][1] is None else s["rate_ci"][1] for s in saes], float)
    ax.bar(x, np.nan_to_num(rate))
    ok = np.isfinite(lo) & np.isfinite(hi)
    ax.errorbar(x[ok], rate[ok], yerr=[rate[ok] - lo[ok], hi[ok] - rate[ok]], fmt="none", color="black", capsize=3)
    ax.set_xticks(x, [s["label"] for s in saes], rotation=70, fontsize=7)
    ax.set_ylabel("first-letter absorption rate (held-out)")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
