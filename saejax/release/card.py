"""The release's README.md model card and its PNG plots (matplotlib, no display needed).

    l0_fvu.png        L0 against FVU, one line per (site, width): the sparsity-fidelity frontier
    delta_loss.png    delta LM loss against layer, per site kind (every released SAE a point)
    density.png       latent-density histograms (log10 firing frequency), per site kind
"""
from __future__ import annotations

import os

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

KIND_NAMES = {"res": "residual stream", "att": "attention output", "mlp_in": "MLP input", "mlp": "MLP output",
              "transcoder": "transcoders (MLP input to MLP output)"}


def _save(fig, path):
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plot_l0_fvu(saes: list[dict], path: str) -> None:
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    lines = {}
    for s in saes:
        lines.setdefault((s["site"], s["width"]), []).append((s["metrics"]["l0"], s["metrics"]["fvu"]))
    for (site, width), pts in sorted(lines.items()):
        pts = sorted(p for p in pts if p[0] is not None and p[1] is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{site} w{width}")
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("fraction of variance unexplained")
    ax.grid(alpha=0.3)
    if len(lines) <= 16:
        ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def plot_delta_loss(saes: list[dict], path: str) -> None:
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    l0s = np.log10(np.maximum([s["metrics"]["l0"] for s in saes], 1e-3))
    norm = Normalize(vmin=float(l0s.min()), vmax=float(max(l0s.max(), l0s.min() + 1e-3)))  # one scale for all
    for kind, marker in (("res", "o"), ("att", "s"), ("mlp_in", "v"), ("mlp", "^"), ("transcoder", "D")):
        pts = [(s["layer"], s["metrics"].get("delta_lm_loss"), s["metrics"]["l0"]) for s in saes if s["kind"] == kind]
        pts = [p for p in pts if p[1] is not None]
        if pts:
            x, y, c = zip(*pts)
            sc = ax.scatter(x, y, c=np.log10(np.maximum(c, 1e-3)), marker=marker, cmap="viridis", norm=norm,
                            label=KIND_NAMES[kind])
    if ax.collections:
        fig.colorbar(sc, ax=ax, label="log10 L0")
        ax.legend(fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("delta LM loss (nats)")
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_density(saes: list[dict], path: str) -> None:
    kinds = [k for k in KIND_NAMES if any(s["kind"] == k for s in saes)] or ["res"]
    fig = Figure(figsize=(4.0 * len(kinds), 3.4))
    for i, kind in enumerate(kinds):
        ax = fig.add_subplot(1, len(kinds), i + 1)
        for s in saes:
            h = s["metrics"].get("density_hist")
            if s["kind"] != kind or not h:
                continue
            bins, counts = np.asarray(h["log10_bins"]), np.asarray(h["counts"])
            ax.stairs(counts / max(1, counts.sum()), bins, alpha=0.6)
        ax.set_title(KIND_NAMES[kind], fontsize=9)
        ax.set_xlabel("log10 firing frequency")
        if i == 0:
            ax.set_ylabel("fraction of live latents")
    _save(fig, path)


def _f(v, fmt):
    return "-" if v is None else fmt.format(v)


def write_readme(root: str, suite: dict) -> None:
    """Plots and README.md into the release folder ``root``; ``suite`` is suite.json's content."""
    saes = suite["saes"]
    plot_l0_fvu(saes, os.path.join(root, "l0_fvu.png"))
    plot_delta_loss(saes, os.path.join(root, "delta_loss.png"))
    plot_density(saes, os.path.join(root, "density.png"))
    kinds = sorted({s["kind"] for s in saes})
    lines = [
        "---", "library_name: saejax", "tags: [sparse-autoencoder, interpretability, gemma-scope]", "---", "",
        f"# {suite['name']}", "",
        f"{len(saes)} sparse autoencoders on `{suite.get('model') or 'synthetic activations'}` "
        f"({', '.join(KIND_NAMES[k] for k in kinds)}), trained with saejax, released in Gemma Scope's layout "
        "(`<kind>/layer_L/width_W/average_l0_N/params.npz`) and as SAELens folders (`saelens/...`).", "",
        "The input normalization is folded into the weights: every SAE takes raw activations.",
        "Metrics are measured on held-out contexts"
        + (f" ({suite['heldout_contexts']} contexts of {suite.get('context_size')} tokens)"
           if suite.get("heldout_contexts") else "")
        + "; delta LM loss"
        + (f" (on {suite['contexts']} of them)" if suite.get("contexts") else "") + " is the "
        "increase in next-token cross-entropy with the reconstruction spliced in, CE score "
        "(CE_ablate - CE_sae) / (CE_ablate - CE_clean) with zero ablation.", "",
        "```python", "import saejax", f"suite = saejax.load_suite(\"<this folder or repo>\")",
        "sae = suite.canonical(\"" + saes[0]["site"] + "\")   # L0 closest to 100", "f = sae.encode(x)", "```", "",
        "![L0 vs FVU](l0_fvu.png)", "", "![delta LM loss per layer](delta_loss.png)", "",
        "![latent density](density.png)", "",
        "| site | width | arch | L0 | FVU | dead | delta LM loss | CE score | KL | weights | latent card |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in saes:
        m = s["metrics"]
        weights = " ".join(f"[{n}]({s[k]})" for n, k in (("npz", "path"), ("SAELens", "saelens")) if s.get(k))
        card = f"[card]({s['card']})" if s.get("card") else "-"
        lines.append(f"| {s['site']} | {s['width']} | {s['arch']}{'' if s.get('k') is None else ' k=' + str(s['k'])} "
                     f"| {_f(m['l0'], '{:.1f}')} | {_f(m['fvu'], '{:.3f}')} | {_f(m.get('dead_frac'), '{:.1%}')} "
                     f"| {_f(m.get('delta_lm_loss'), '{:.4f}')} | {_f(m.get('ce_score'), '{:.3f}')} "
                     f"| {_f(m.get('kl'), '{:.4f}')} | {weights} | {card} |")
    tmp = os.path.join(root, f"README.md.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(root, "README.md"))
