"""``saejax analyze``: research analyses of a released suite over the activation store.

Reads  a released suite (``analyze.release``; default <workdir>/release, loaded with
       ``saejax.load_suite``, so Gemma Scope's folders and repos too)  and  <workdir>/store/
Writes <workdir>/analysis/{summary,dark_matter,seeds,layer_groups,absorption}.json and *.png (docs/analysis.md),
       as one folder renamed into place; then, when the suite is this workdir's own release, adds
       the "analysis" section to it (saejax.release.annotate: release/analysis/*.png, suite.json
       "analysis", a README section). Stages still flow one way: release never reads analysis/.

Each analysis is a function over released SAEs (saejax.release.SAE) and store rows:
dark_matter.py (Engels et al. 2024), seeds.py (Paulo and Belrose 2025), layers.py (Ghilardi et al. 2024),
absorption.py (Chanin et al. 2024; needs the model's tokenizer to decode the rows' token ids).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np

from saejax import files, workdir as wd
from saejax.analyze import absorption as ab, common, dark_matter as dm, layers, plots, seeds as seedlib

FORMAT = "saejax-analysis/1"
SECTION = "analysis"  # the release's section (suite.json key, README markers, files folder)


class AnalyzeError(ValueError):
    """Missing or inconsistent analysis inputs; the message names the folder, file or site."""


def _own_release(config) -> bool:
    return not config.analyze.release or os.path.abspath(config.analyze.release) == os.path.abspath(wd.release_dir(config))


def _suite_digest(suite) -> str:
    """What the analysis was made from: the suite's SAE list (suite.json "saes", or the file index)."""
    saes = suite.meta.get("saes") if suite.meta else None
    return hashlib.sha256(json.dumps(saes if saes is not None else suite.index(), sort_keys=True).encode()).hexdigest()


def is_complete(config) -> bool:
    """analysis/summary.json was made from the current suite with the configured analyses and, for
    this workdir's release, the release holds its section (``saejax run`` then skips analyze)."""
    from saejax.release import ReleaseError, load_suite
    path = os.path.join(wd.analysis_dir(config), "summary.json")
    try:
        with open(path) as fh:
            summary = json.load(fh)
        suite = load_suite(config.analyze.release or wd.release_dir(config))
    except (OSError, json.JSONDecodeError, ReleaseError):
        return False
    if summary.get("suite_sha256") != _suite_digest(suite) or summary.get("analyses") != list(config.analyze.analyses):
        return False
    return not _own_release(config) or suite.meta.get(SECTION, {}).get("suite_sha256") == summary["suite_sha256"]


def _open(config):
    from saejax import store as storelib
    from saejax.release import load_suite
    suite = load_suite(config.analyze.release or wd.release_dir(config))
    if not os.path.isfile(wd.manifest_path(config)):
        raise AnalyzeError(f"no activation store at {wd.store_dir(config)} (run saejax harvest first)")
    return suite, storelib.open_store(wd.store_dir(config))


class _Rows:
    """Rows of the store per site, read once: held-out (measuring) and train (fitting)."""

    def __init__(self, store, config):
        self.store, self.config, self._held, self._train = store, config, {}, {}

    def heldout(self, site):
        if site not in self._held:
            x, meta = self.store.rows(site, "heldout")
            n = min(len(x), int(self.config.analyze.rows))
            if n == 0:
                raise AnalyzeError(f"site {site} has no held-out rows in {self.store.path}")
            self._held[site] = (x[:n], meta[:n])
        return self._held[site]

    def train(self, site):
        if site not in self._train:
            n = min(self.store.n_rows(site, "train"), int(self.config.analyze.fit_rows))
            reader = self.store.reader(seed=int(self.config.seed), split="train", prefetch=0, sites=[site])
            try:
                self._train[site] = reader.batch([site], 0, n)[0]
            finally:
                reader.close()
        return self._train[site]


def _load(suite, entry, store):
    sae = suite.load(entry)
    if sae.d != store.width(entry.site):
        raise AnalyzeError(f"{sae.path}: SAE input width {sae.d} does not match {entry.site} width "
                           f"{store.width(entry.site)} in the store {store.path}")
    return sae


def run_dark_matter(suite, entries, rows, config) -> dict:
    out, corr = [], {}
    for site in sorted({e.site for e in entries}):
        x_eval, _ = rows.heldout(site)
        x_fit = rows.train(site)
        labels, widths, norms = [], [], []
        for e in [e for e in entries if e.site == site]:
            numbers, norm = dm.dark_matter(_load(suite, e, rows.store), x_fit, x_eval, float(config.analyze.ridge))
            out.append({**common.entry_info(e), **numbers})
            labels.append(common.label(e)), widths.append(e.width), norms.append(norm)
        corr[site] = dm.norm_correlation(labels, widths, norms)
    return {"ridge": float(config.analyze.ridge), "saes": out, "norm_correlation": corr}


def seed_pairs(entries) -> list[tuple]:
    """(seed 0 entry, seed s entry) for every SAE trained with seed twins (same site, width, arch,
    sweep value and L0 target; suite.json "source")."""
    by = {}
    for e in entries:
        src = e.source or {}
        if "seed" in src:
            by.setdefault((e.site, e.width, e.arch, src.get("sparsity"), src.get("target_l0")), {})[src["seed"]] = e
    return [(twins[0], twins[s]) for _, twins in sorted(by.items(), key=lambda kv: str(kv[0]))
            if 0 in twins for s in sorted(twins) if s != 0]


def run_seeds(suite, entries, rows, config) -> dict:
    a = config.analyze
    pairs = []
    for ea, eb in seed_pairs(entries):
        x_eval, _ = rows.heldout(ea.site)
        res = seedlib.stability(_load(suite, ea, rows.store), _load(suite, eb, rows.store), x_eval,
                                float(a.seed_threshold), int(a.match_full_max), int(a.match_candidates))
        pairs.append({"a": common.entry_info(ea), "b": common.entry_info(eb), **res})
    return {"threshold": float(a.seed_threshold), "match_full_max": int(a.match_full_max),
            "match_candidates": int(a.match_candidates), "pairs": pairs}


def run_layer_groups(store, rows, config) -> dict | None:
    res = sorted(int(s.split(".")[1]) for s in store.sites if s.startswith("res."))
    if len(res) < 2:
        return None
    return layers.layer_groups({layer: rows.heldout(f"res.{layer}") for layer in res},
                               int(config.analyze.layer_groups), int(config.analyze.rows))


def run_absorption(suite, entries, rows, config, decode) -> dict:
    """The first-letter task per SAE (transcoders left out: their latents write another site)."""
    a = config.analyze
    out, letters = [], {}
    for site in sorted({e.site for e in entries if e.reads is None}):
        x, meta = rows.heldout(site)
        probes = ab.first_letter_probes(x, meta[:, 0], decode, float(a.absorption_min_probe_f1), seed=int(config.seed))
        letters[site] = {k: probes[k] for k in ("letters", "probe_f1", "skipped_few", "skipped_f1", "n_rows",
                                                "n_tokens", "n_train", "n_test")}
        for e in [e for e in entries if e.site == site and e.reads is None]:
            res = ab.first_letter(_load(suite, e, rows.store), probes, float(a.absorption_cos), float(a.absorption_share))
            out.append({**common.entry_info(e), **{k: res[k] for k in ("rate", "rate_ci", "recall", "rates", "recalls",
                                                                        "main_latent", "f1", "absorbers", "counted")}})
    return {"min_probe_f1": float(a.absorption_min_probe_f1), "cos_min": float(a.absorption_cos),
            "share_min": float(a.absorption_share), "sites": letters, "saes": out}


def _decode(config):
    from saejax import models
    tok = models.load(config.model.source, dtype=config.model.dtype).tokenizer
    if tok is None or not hasattr(tok, "decode"):
        raise AnalyzeError(f"absorption: model {config.model.source} has no tokenizer to decode token ids")
    return tok.decode


def run(config, dry_run: bool = False) -> dict | None:
    """Run the configured analyses; write <workdir>/analysis/ and the release's section."""
    suite, store = _open(config)
    entries = [e for e in suite.entries if e.site in store.sites]
    missing = sorted({e.site for e in suite.entries} - set(store.sites))
    if not entries:
        raise AnalyzeError(f"{suite.source}: none of its sites {suite.sites()} is in the store {store.path}")
    todo = list(config.analyze.analyses)
    print(f"saejax analyze: {', '.join(todo)} on {len(entries)} SAEs of {suite.source} over {store.path}"
          + (f" (sites not in the store, skipped: {missing})" if missing else ""), file=sys.stderr)
    if dry_run:
        if "seeds" in todo:
            print(f"  seeds: {len(seed_pairs(entries))} seed pairs", file=sys.stderr)
        return None
    import jax
    if jax.process_index() != 0:  # small next to training: process 0 does it all
        return None
    rows = _Rows(store, config)
    docs = {}
    if "dark_matter" in todo:
        docs["dark_matter"] = run_dark_matter(suite, entries, rows, config)
    if "seeds" in todo:
        docs["seeds"] = run_seeds(suite, entries, rows, config)
        if not docs["seeds"]["pairs"]:
            print("saejax analyze: seeds: no SAEs with seed twins (train with sae.seeds >= 2)", file=sys.stderr)
    if "layer_groups" in todo:
        docs["layer_groups"] = run_layer_groups(store, rows, config)
        if docs["layer_groups"] is None:
            print("saejax analyze: layer_groups: the store has fewer than two res sites", file=sys.stderr)
    if "absorption" in todo:
        docs["absorption"] = run_absorption(suite, entries, rows, config, _decode(config))
    summary = {"format": FORMAT, "suite": str(suite.source), "suite_sha256": _suite_digest(suite),
               "store_manifest_sha256": store.manifest_sha256, "analyses": todo, **_summary(docs)}
    final = wd.analysis_dir(config)
    with wd.stage_lock(config, "analyze", output=final):
        with files.atomic_dir(final) as tmp:
            for name, doc in docs.items():
                if doc is None:
                    continue
                with open(os.path.join(tmp, f"{name}.json"), "w") as fh:
                    json.dump(files.json_safe(doc), fh, indent=1, allow_nan=False)
                getattr(plots, name)(doc, os.path.join(tmp, f"{name}.png"))
            with open(os.path.join(tmp, "summary.json"), "w") as fh:
                json.dump(files.json_safe(summary), fh, indent=1, allow_nan=False)
        if _own_release(config):
            from saejax.release import annotate
            pngs = {f"{n}.png": os.path.join(final, f"{n}.png") for n, d in docs.items() if d is not None}
            annotate(wd.release_dir(config), SECTION, files.json_safe(summary), markdown(summary, pngs), pngs)
    print(markdown(summary, {}), file=sys.stderr)
    print(f"saejax analyze: wrote {final}", file=sys.stderr)
    return summary


def _summary(docs: dict) -> dict:
    """The short numbers suite.json and the README carry."""
    out = {}
    if docs.get("dark_matter"):
        d = docs["dark_matter"]
        out["dark_matter"] = {
            "saes": [{k: s[k] for k in ("label", "fvu", "fvu_linear", "fvu_nonlinear", "linear_frac_variance",
                                         "norm_r2")} for s in d["saes"]],
            "cross_width_norm_r": [p for c in d["norm_correlation"].values() for p in c["cross_width"]]}
    if docs.get("seeds") is not None:
        out["seeds"] = [{"a": p["a"]["label"], "b_seed": p["b"]["seed"], "method": p["method"],
                         **{k: p[k] for k in ("shared_decoder", "shared_encoder", "shared_both", "mean_cos_decoder")}}
                        for p in docs["seeds"]["pairs"]]
    if docs.get("layer_groups"):
        g = docs["layer_groups"]
        out["layer_groups"] = {"groups": g["groups"], "contiguous": g["contiguous"], "adjacent": g["adjacent"],
                               "config": g["config"]}
    if docs.get("absorption"):
        out["absorption"] = [{"label": s["label"], "rate": s["rate"], "rate_ci": s["rate_ci"], "recall": s["recall"],
                              "letters": len(s["rates"])} for s in docs["absorption"]["saes"]]
    return out


def _f(v, fmt="{:.3f}"):
    return "-" if v is None or not np.isfinite(v) else fmt.format(v)


def markdown(summary: dict, pngs: dict) -> str:
    """The release README's analysis section (also printed to the terminal)."""
    lines = ["## Analyses", "", "Made by `saejax analyze` on held-out rows of the activation store "
             "(docs/analysis.md in saejax).", ""]
    if "dark_matter" in summary:
        lines += ["### Dark matter (Engels et al. 2024)", "",
                  "The SAE error e = x - x_hat regressed linearly on x (fit on train rows, measured on held-out "
                  "rows): the FVU it recovers, the nonlinear remainder, and R^2 of the error norm.", "",
                  "| SAE | FVU | linear | nonlinear | linear share of error variance | error norm R^2 |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {s['label']} | {_f(s['fvu'])} | {_f(s['fvu_linear'])} | {_f(s['fvu_nonlinear'])} | "
                  f"{_f(s['linear_frac_variance'])} | {_f(s['norm_r2'])} |" for s in summary["dark_matter"]["saes"]]
        cross = summary["dark_matter"]["cross_width_norm_r"]
        if cross:
            lines += ["", "Correlation of per-token error norms across widths: "
                      + ", ".join(f"{p['a']} / {p['b']}: {p['r']:.3f}" for p in cross)]
        lines += [""] + ([f"![dark matter](analysis/dark_matter.png)", ""] if "dark_matter.png" in pngs else [])
    if "seeds" in summary:
        lines += ["### Seed stability (Paulo and Belrose 2025)", ""]
        if summary["seeds"]:
            lines += ["Latents of two seeds matched one to one (Hungarian) by decoder and by encoder cosine; "
                      "shared: cosine >= the threshold.", "",
                      "| SAE | vs seed | matching | shared (decoder) | shared (encoder) | both | mean decoder cos |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {p['a']} | {p['b_seed']} | {p['method']} | {_f(p['shared_decoder'])} | "
                      f"{_f(p['shared_encoder'])} | {_f(p['shared_both'])} | {_f(p['mean_cos_decoder'])} |"
                      for p in summary["seeds"]]
            lines += [""] + (["![seed stability](analysis/seeds.png)", ""] if "seeds.png" in pngs else [])
        else:
            lines += ["No SAEs with seed twins in this suite (train with `sae.seeds` >= 2).", ""]
    if "layer_groups" in summary:
        g = summary["layer_groups"]
        lines += ["### Layer groups (Ghilardi et al. 2024)", "",
                  "Mean angular distance between adjacent residual-stream layers: "
                  + ", ".join(f"{a['a']}-{a['b']}: {a['angular_distance']:.3f}" for a in g["adjacent"]) + ".",
                  f"Average-linkage groups: {g['groups']}" + ("" if g["contiguous"] else " (not all contiguous)") + ".",
                  "One SAE per group (each cut into runs of adjacent layers), trained on its layers' pooled rows: "
                  f"`--config.sae.layer_groups='{g['config']}'`.", ""]
        lines += ["![layer groups](analysis/layer_groups.png)", ""] if "layer_groups.png" in pngs else []
    if "absorption" in summary:
        lines += ["### Feature absorption (Chanin et al. 2024)", "",
                  "First-letter task on the store's word tokens: a linear probe per letter, each letter's main "
                  "latent, and the share of tokens (probe right) where it is silent while latents aligned with "
                  "the probe carry the letter; mean over letters with a 95% interval.", "",
                  "| SAE | letters | absorption rate | 95% interval | main-latent recall |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {s['label']} | {s['letters']} | {_f(s['rate'])} | {_f(s['rate_ci'][0])} - {_f(s['rate_ci'][1])} "
                  f"| {_f(s['recall'])} |" for s in summary["absorption"]]
        lines += [""] + (["![absorption](analysis/absorption.png)", ""] if "absorption.png" in pngs else [])
    return "\n".join(lines)


