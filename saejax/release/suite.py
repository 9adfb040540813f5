"""Write a release: choose SAEs, fold, write both layouts, suite.json, cards and the README.

    <release>/suite.json                                      every SAE: paths and metrics (below)
    <release>/<kind>/layer_L/width_W/average_l0_N/params.npz  Gemma Scope layout (gemmascope.py)
    <release>/saelens/<kind>/layer_L/width_W/average_l0_N/    SAELens layout (saelens.py)
    <release>/cards/<sae>.html                                latent cards (from evaluate)
    <release>/README.md, *.png                                model card (card.py)

suite.json: {"format": "saejax-suite/1", "name", "model", "base_model", "contexts", "results_sha256", "saes": [{"site", "kind",
"layer", "width", "d", "arch", "k", "l0", "path", "saelens", "card", "metrics": {...},
"source": {"group", "member", "sparsity", "target_l0", "seed", "steps", "tokens"}}]}; paths are relative
to the release. A suite that was analyzed (saejax analyze) also holds "analysis" (annotate below).
A Matryoshka SAE's entry adds "matryoshka" (its prefix sizes) and metrics "fvu_prefix" (each
prefix's held-out FVU); its SAELens cfg.json has them as metadata "matryoshka_widths" (SAELens's
name). Inference is the kind's formula: nothing else differs. An SAE trained on a layer group
(sae.layer_groups) is released once per layer of the group, folded with that layer's norm scale, in
that layer's folders; its entries add "layer_group": {"site": "res.0-2", "sites": [the group's sites]}.
N in average_l0_N is the held-out L0, rounded, as Gemma Scope named theirs.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

from saejax import files
from saejax.log import progress
from saejax.release import card as model_card
from saejax.release import circuit_tracer, fold, gemmascope as gs, saelens
from saejax.release.errors import ReleaseError
from saejax.sae import io as sae_io
from saejax.sae import kinds

FORMAT = "saejax-suite/1"
METRIC_KEYS = ("l0", "fvu", "explained_variance", "dead_frac", "dense_1pct", "dense_10pct", "density_hist",
               "n_tokens", "delta_lm_loss", "ce_score", "kl", "ce_clean", "ce_sae", "ce_ablate", "kl_ablate")


def sae_dir(r: dict) -> str:
    """A result's release folder: Gemma Scope's, with ``_seed<S>`` appended for seed S > 0
    (``sae.seeds``; Gemma Scope's own parser skips those folders, suite.json lists them)."""
    rel = gs.sae_dir(r["kind"], r["layer"], r["width"], r["l0"])
    return f"{rel}_seed{r['seed']}" if r.get("seed") else rel


def choose(results: list[dict], targets=()) -> tuple[list[dict], list[str]]:
    """The SAEs to publish: per (site, width, seed), the one nearest each target L0, or all of them.
    Frozen (non-finite) SAEs and SAEs without a measured L0 are never published, and of SAEs whose
    rounded L0 would give the same folder name the one with the lowest FVU is. Returns (chosen,
    notes on what was left out)."""
    by = {}
    for r in results:
        if not r.get("frozen") and r.get("l0") is not None and r.get("fvu") is not None:
            by.setdefault((r["site"], r["width"], r.get("seed") or 0), []).append(r)
    out = []
    for _, cands in sorted(by.items()):
        if not targets:
            out += sorted(cands, key=lambda r: r["l0"])
            continue
        picked = {}
        for tgt in targets:
            best = min(cands, key=lambda r: (abs(r["l0"] - tgt), r["l0"]))
            picked[best["id"]] = best
        out += sorted(picked.values(), key=lambda r: r["l0"])
    best, notes = {}, []
    for r in out:
        key = sae_dir(r)
        if key in best:
            keep, drop = sorted((best[key], r), key=lambda x: x["fvu"])
            notes.append(f"{drop['id']} not released: {key} is {keep['id']} (same rounded L0, lower FVU)")
            r = keep
        best[key] = r
    skipped = [f"{r['id']} not released: frozen or unmeasured" for r in results
               if r.get("frozen") or r.get("l0") is None or r.get("fvu") is None]
    return [r for r in out if best[sae_dir(r)] is r], notes + skipped


def write(root: str, picked: list[dict], groups: dict, *, name: str, model: str, formats=("gemmascope", "saelens"),
          cards_dir: str | None = None, contexts: int = 0, context_size: int | None = None,
          base_model: str | None = None, repo: str | None = None, extra: dict | None = None,
          add=None) -> dict:
    """Write the release into ``root`` atomically (built as ``root.tmp-<pid>``, renamed at the end).
    ``groups`` maps a group name to its (arrays, meta) from saejax.sae.io.load_group. ``base_model``:
    the model's Hub id (SAELens's model_name, the card's base_model); ``repo``: the Hub repo the
    release goes to (named in the card)."""
    for r in picked:  # refused before anything is written
        if r.get("reads"):
            released = kinds.get(r["arch"]).release_name
            if "saelens" in formats and saelens.transcoder_architecture(released, bool(r.get("skip"))) is None:
                raise ReleaseError(f"{r['id']}: SAELens has no {r['arch']} transcoder class; release it without "
                                   f"'saelens' in release.formats (or train jumprelu or batchtopk transcoders)")
            if released != "jumprelu" and (("gemmascope" in formats and r.get("skip")) or "circuit_tracer" in formats):
                raise ReleaseError(f"{r['id']}: a {r['arch']} transcoder has no JumpReLU form for Gemma Scope 2's "
                                   f"skip-transcoder layout or circuit-tracer; drop those from release.formats")
    with files.atomic_dir(root) as tmp:
        entries = []
        bar = progress(len(picked), "release", unit="SAE")
        sets: dict = {}  # circuit-tracer: (width, member) -> {layer: folded arrays}
        for r in picked:
            arrays, meta = groups[r["group"]]
            pool = r.get("layer_group")  # sae.layer_groups: one SAE released on each layer it serves
            pool = {"site": pool, "sites": list(meta["layer_groups"][pool]["sites"])} if pool else None
            if pool:
                meta = sae_io.on_layer(meta, r["t"], r["site"])  # folded with this layer's norm scale
            folded, arch, k = fold.group_sae(arrays, meta, r["t"], r["member"])
            rel = sae_dir(r)
            tc = bool(r.get("reads"))
            if (folded["threshold"] < 0).any():
                print(f"saejax release: {r['id']}: {int((folded['threshold'] < 0).sum())} negative thresholds; "
                      f"Gemma Scope's formula and SAELens rectify, so those latents differ there", file=sys.stderr)
            e = {"site": r["site"], "kind": r["kind"], "layer": r["layer"], "width": r["width"], "d": r["d"],
                 "arch": arch, "k": k, "l0": r["l0"], "path": None, "saelens": None, "card": None,
                 "metrics": {m: r.get(m) for m in METRIC_KEYS},
                 "source": {"group": r["group"], "member": r["member"], "sparsity": r["sparsity"],
                            "target_l0": r.get("target_l0"), "seed": r.get("seed") or 0,
                            "arch": meta["arch"], "steps": meta.get("steps"), "tokens": meta.get("tokens")}}
            if pool:
                e["layer_group"] = pool
            if meta.get("matryoshka"):  # Matryoshka prefix sizes, and each prefix's held-out FVU
                e["matryoshka"] = list(meta["matryoshka"])
                e["metrics"]["fvu_prefix"] = r.get("fvu_prefix")
            if tc:
                e.update(reads=r["reads"], writes=r["writes"], d_out=r["d_out"], skip=bool(r.get("skip")))
            if "gemmascope" in formats and tc and r.get("skip"):  # Gemma Scope 2's skip-transcoder layout
                rel2 = gs.gs2_dir(r["layer"], r["width"], r["l0"])
                gs.write_gs2(os.path.join(tmp, rel2), folded, r["layer"], model)
                e["path"] = f"{rel2}/params.safetensors"
            elif "gemmascope" in formats:
                os.makedirs(os.path.join(tmp, rel))
                gs.write_params(os.path.join(tmp, rel, "params.npz"), folded, k)
                e["path"] = f"{rel}/params.npz"
            if "saelens" in formats:
                extra_md = {"saejax_l0": r["l0"], "saejax_fvu": r["fvu"],
                            **({"saejax_layer_group": pool["sites"]} if pool else {}),
                            **({"matryoshka_widths": list(meta["matryoshka"])} if meta.get("matryoshka") else {})}
                if tc:
                    cfg = saelens.transcoder_config(r["layer"], arch, r["d"], r["d_out"], r["width"],
                                                    bool(r.get("skip")), model=base_model or model, context_size=context_size,
                                                    extra=extra_md)
                else:
                    cfg = saelens.config(r["kind"], r["layer"], arch, r["d"], r["width"], k, model=base_model or model,
                                         context_size=context_size, extra=extra_md)
                saelens.write(os.path.join(tmp, "saelens", rel), folded, cfg, arch)
                e["saelens"] = f"saelens/{rel}"
            if "circuit_tracer" in formats and tc:
                sets.setdefault((r["width"], r["member"]), {})[r["layer"]] = folded
            if cards_dir and r.get("card") and os.path.isfile(os.path.join(cards_dir, r["card"])):
                os.makedirs(os.path.join(tmp, "cards"), exist_ok=True)
                shutil.copyfile(os.path.join(cards_dir, r["card"]), os.path.join(tmp, r["card"]))
                e["card"] = r["card"]
            entries.append(e)
            bar.update(1)
        bar.close()
        transcoder_sets = []
        for (width, member), layers in sorted(sets.items()):
            if sorted(layers) != list(range(len(layers))):
                print(f"saejax release: no circuit-tracer set for width {width} member {member}: its transcoders "
                      f"cover layers {sorted(layers)}, circuit-tracer needs every layer 0..n-1", file=sys.stderr)
                continue
            rel = circuit_tracer.set_dir(gs.width_name(width), member)
            circuit_tracer.write_set(os.path.join(tmp, rel), layers, True, model)
            transcoder_sets.append({"path": rel, "width": width, "member": member, "layers": len(layers)})
        more = add(tmp) if add else {}  # files other stages' objects add (CLTs), and their suite.json fields
        suite = {"format": FORMAT, "name": name, "model": model, "base_model": base_model, "contexts": contexts,
                 **(extra or {}), **more,
                 **({"circuit_tracer": transcoder_sets} if transcoder_sets else {}), "saes": entries}
        with open(os.path.join(tmp, "suite.json"), "w") as fh:
            json.dump(suite, fh, indent=1)
        model_card.write_readme(tmp, suite, repo=repo)
    return suite
