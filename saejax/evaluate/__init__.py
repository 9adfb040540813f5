"""``saejax evaluate``: measure every trained SAE on the store's held-out split.

Reads  <workdir>/train/<group>/final/   (saejax.sae.io)   and   <workdir>/store/   (docs/store.md)
Writes <workdir>/evaluate/results.json  and  <workdir>/evaluate/cards/<sae>.html  (docs/evaluate.md)

Per SAE: reconstruction metrics on the held-out rows of its site (metrics.py), delta LM loss, CE
score and KL with its reconstruction spliced into the model (splice.py; skipped with
``evaluate.splice = False``), and a latent card for a sample of ``evaluate.latent_cards`` latents
(cards.py). The output folder is built under a
temporary name and renamed at the end, so a complete ``evaluate/`` is the completion marker.
With ``train.source = "synthetic"`` there is no model: reconstruction metrics only, on synthetic
rows training never drew.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import zlib

import numpy as np

from saejax import files, workdir as wd
from saejax.log import progress
from saejax.tracking import Tracker
from saejax.evaluate import cards, metrics, splice
from saejax.sae import io as sae_io

N_TOP = 8  # examples per latent on a card
SYNTHETIC_ROWS = 16384  # held-out synthetic rows per site
SYNTHETIC_STEP = 2 ** 40  # synthetic batches from here on are never drawn by training


class EvaluateError(ValueError):
    """Missing or inconsistent evaluation inputs; the message names the folder or file."""


def is_complete(config) -> bool:
    """results.json exists and covers every trained group (``saejax run`` then skips evaluate), with
    the per-site splice metrics if ``evaluate.splice`` asks for them, and the transcoders' replacement
    models if ``evaluate.replacement`` does."""
    path = wd.results_path(config)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as fh:
            doc = json.load(fh)
        done = set(doc.get("groups", [])) | {c["id"] for c in doc.get("clts", [])}
        if config.evaluate.splice and doc.get("splice", True) is False:
            return False  # made with evaluate.splice = False: the splice metrics are missing
        if (config.evaluate.replacement and not doc.get("synthetic") and "replacements" not in doc
                and any(e.get("kind") == "transcoder" for e in doc["saes"])):
            return False  # made with evaluate.replacement = False: the transcoders' replacement models are missing
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return False
    names = {wd.group_of(p) for p in wd.final_dirs(config) + wd.clt_final_dirs(config)}
    return bool(names) and names <= done


def _load_groups(config) -> list[tuple[str, dict, dict]]:
    paths = wd.final_dirs(config)
    if not paths and not wd.clt_final_dirs(config):
        raise EvaluateError(f"no trained SAE groups under {wd.train_dir(config)} "
                            f"(expected <group>/final/; run saejax train first)")
    out = []
    for p in paths:
        try:
            arrays, meta = sae_io.load_group(p)
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise EvaluateError(str(e).strip("'\"")) from None
        out.append((wd.group_of(p), arrays, meta))
    return out


class _Rows:
    """Held-out rows per site, from the store or from the synthetic source."""

    def __init__(self, config):
        self.synthetic = config.train.source == "synthetic"
        self.n_contexts = 0
        if self.synthetic:
            from saejax.sources import synthetic_source
            self.source = synthetic_source(config)
            self.model_name = ""
            return
        from saejax import store as storelib
        path = wd.store_dir(config)
        if not os.path.isfile(wd.manifest_path(config)):
            raise EvaluateError(f"no activation store at {path} (run saejax harvest first)")
        self.store = storelib.open_store(path)
        self.manifest = self.store.manifest
        self.model_name = self.store.model
        # Reconstruction metrics and cards use every held-out row (cheap); splicing, which runs the
        # model once per site, uses the first evaluate.contexts contexts.
        self.all_tokens = np.asarray(self.store.heldout_tokens())
        self.all_context_ids = np.asarray(self.store.heldout_contexts())
        self.n_contexts = min(int(config.evaluate.contexts), len(self.all_tokens))
        if self.n_contexts == 0:
            raise EvaluateError(f"{path}: the store has no held-out contexts (data.heldout_contexts = 0)")
        self.tokens = self.all_tokens[:self.n_contexts]

    @property
    def sites(self):
        return self.source.sites if self.synthetic else self.store.sites

    def width(self, site):
        return self.source.width(site) if self.synthetic else self.store.width(site)

    def rows(self, site):
        """(x [n, w] raw float32, meta [n, 3] or None): every held-out row of the site."""
        if self.synthetic:
            x = self.source.batch([site], SYNTHETIC_STEP, SYNTHETIC_ROWS)[0]
            return np.asarray(x, np.float32), None
        return self.store.rows(site, "heldout")

    def policy(self, site) -> splice.Policy:
        m = self.manifest
        pol = m.get("policy", {})
        ratio = float(pol.get("max_norm_ratio", 0.0) or 0.0)
        median = float(m["sites"][site].get("median_norm", 0.0))
        return splice.Policy(tuple(int(i) for i in m.get("special_ids", [])), int(pol.get("skip_first", 0)),
                             ratio * median if ratio > 0 else 0.0)


def _check(groups, data):
    for name, _, meta in groups:
        reads = meta.get("reads") or [s for t in range(len(meta["sites"])) for s in sae_io.layer_sites(meta, t)]
        d_out = meta.get("d_out") or meta["d"]
        for site, width in [(s, meta["d"]) for s in reads] + ([(s, d_out) for s in meta["sites"]]
                                                            if meta.get("reads") else []):
            if site not in data.sites:
                raise EvaluateError(f"group {name}: site {site!r} is not in the held-out data (sites {data.sites})")
            if data.width(site) != width:
                raise EvaluateError(f"group {name}: site {site} has width {data.width(site)} in the data, "
                                    f"the SAEs take {width}")


def sae_id(group: str, site: str, member: int) -> str:
    return f"{site}__{group}__{member}"


def entry_site(meta: dict, t: int) -> str:
    """The name results and releases give SAE site t of a group: its site (``res.3``), or for a
    transcoder ``transcoder.L`` (it reads mlp_in.L and writes mlp.L: results record both)."""
    site = meta["sites"][t]
    return f"transcoder.{site.split('.')[1]}" if meta.get("reads") else site


def run(config, dry_run: bool = False) -> dict | None:
    """Evaluate every trained group; write results.json and the latent cards; print a table."""
    groups = _load_groups(config)
    data = _Rows(config)
    _check(groups, data)
    n_sae = sum(len(m["sites"]) * len(m["sweep"]) for _, _, m in groups)  # a pooled SAE counts once
    splice_on = bool(config.evaluate.splice)
    print(f"saejax evaluate: {len(groups)} groups, {n_sae} SAEs"
          + (" on synthetic rows" if data.synthetic else f" on {len(data.all_tokens)} held-out contexts, "
             + (f"{data.n_contexts} of them spliced" if splice_on else "no per-site splicing (evaluate.splice)")),
          file=sys.stderr)
    if dry_run:
        for name, _, meta in groups:
            print(f"  {name}: sites {meta['sites']}, {len(meta['sweep'])} sweep members, "
                  + (f"{len(meta['sites'])} spliced passes per context batch" if splice_on else "not spliced"),
                  file=sys.stderr)
        return None
    import jax
    pc, pi = jax.process_count(), jax.process_index()
    # Work units: the sites of every group in order (a pooled site: once per layer it serves), then the
    # CLTs, then (evaluate.replacement) each transcoder group member's replacement model; unit u is
    # process u % pc's.
    units = [(g, t, site) for g in range(len(groups)) for t in range(len(groups[g][2]["sites"]))
             for site in sae_io.layer_sites(groups[g][2], t)]
    clt_paths = wd.clt_final_dirs(config)
    units += [("clt", j) for j in range(len(clt_paths))]
    if config.evaluate.replacement and not data.synthetic:
        units += [("rep", g, k) for g in range(len(groups)) if groups[g][2].get("reads")
                  for k in range(len(groups[g][2]["sweep"]))]
    mine = [u for i, u in enumerate(units) if i % pc == pi]
    model = None
    if not data.synthetic and mine:
        from saejax import models
        model = models.load(config.model.source, dtype=config.model.dtype)
        if data.model_name and model.name != data.model_name:
            raise EvaluateError(f"{wd.store_dir(config)}: harvested from model "
                                f"{data.model_name!r}, but config.model.source loads {model.name!r}")
    final = wd.evaluate_dir(config)
    tmp = f"{final}.tmp-{os.getpid()}" if pc == 1 else f"{final}.tmp-{pc}procs"  # one folder all processes share
    with wd.stage_lock(config, "evaluate", output=final):
        try:
            if pc > 1:
                _barrier("saejax-evaluate-start")  # every process has cleared old temporaries (stage_lock)
            os.makedirs(os.path.join(tmp, wd.CARDS), exist_ok=pc > 1)
            done = {}  # unit -> its results (a list of SAE entries, or a CLT's entry)
            with progress(sum(1 for u in mine if u[0] not in ("clt", "rep")), "evaluate", unit="site") as bar:
                for u in mine:
                    if u[0] == "clt":
                        # each CLT's card latents from its own stream, whichever process evaluates it
                        done[u] = _evaluate_clt(clt_paths[u[1]], data, model, config, tmp,
                                                np.random.default_rng([int(config.seed), u[1]]))
                        continue
                    if u[0] == "rep":
                        done[u] = _evaluate_replacement(*groups[u[1]], u[2], data, model, config)
                        continue
                    name, arrays, meta = groups[u[0]]
                    pooled = u[2] != meta["sites"][u[1]]  # sae.layer_groups: the pooled SAE on layer u[2]
                    done[u] = _evaluate_site(name, arrays, sae_io.on_layer(meta, u[1], u[2]), u[1], data, model,
                                             config, tmp, layer_group=meta["sites"][u[1]] if pooled else None)
                    bar.update(1)
            if pc > 1:
                print(f"saejax evaluate: process {pi} of {pc} evaluated {len(mine)} of {len(units)} work units",
                      file=sys.stderr)
                done = _gather(done, units, tmp, pc, pi)
            if pi == 0:
                results = [r for u in units if u[0] not in ("clt", "rep") for r in done[u]]
                doc = {"format": "saejax-eval/1", "model": data.model_name, "contexts": data.n_contexts,
                       **({} if splice_on or data.synthetic else {"splice": False}),  # absent: spliced
                       "heldout_contexts": 0 if data.synthetic else len(data.all_tokens),
                       "synthetic": data.synthetic, "groups": [g[0] for g in groups], "saes": results}
                clts = [done[u] for u in units if u[0] == "clt"]
                if clts:
                    doc["clts"] = clts
                reps = [done[u] for u in units if u[0] == "rep"]
                for r in reps:  # the member's L0 summed over the group's layers, as a CLT's l0_total
                    r["l0_total"] = float(sum(e["l0"] for e in results if e["group"] == r["group"]
                                              and e["member"] == r["member"]))
                if reps:
                    doc["replacements"] = reps
                with open(os.path.join(tmp, wd.RESULTS), "w") as fh:
                    json.dump(files.json_safe(doc), fh, indent=1, allow_nan=False)
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(tmp, final)
            if pc > 1:
                _barrier("saejax-evaluate-written")  # results.json is there when every process returns
        except BaseException:
            if pi == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    if pi != 0:
        return None
    print(table(results))
    for c in doc.get("clts", []):
        print(clt_table(c))
    for r in doc.get("replacements", []):
        print(replacement_line(r))
    _track(config, results)
    print(f"saejax evaluate: wrote {wd.results_path(config)}", file=sys.stderr)
    return doc


TRACKED = ("l0", "fvu", "dead_frac", "dense_10pct", "delta_lm_loss", "ce_score", "kl")  # to TensorBoard / W&B


def _track(config, results: list[dict]) -> None:
    """The results to the evaluate run of saejax.tracking: ``<metric>/<sae id>`` at the SAE's
    training steps, and the table."""
    with Tracker(config, "evaluate") as tracker:
        for r in results:
            tracker.scalars(r.get("steps") or 0, {f"{m}/{r['id']}": r.get(m) for m in TRACKED})
        tracker.table("evaluate/results", ["id", "site", "width", "arch", "sparsity", *TRACKED],
                      [[r["id"], r["site"], r["width"], r["arch"], r["sparsity"],
                        *(None if r.get(m) is None else round(float(r[m]), 5) for m in TRACKED)]
                       for r in files.json_safe(results)])


def _evaluate_clt(path, data, model, config, out_dir, rng) -> dict:
    """A CLT's per-layer metrics on the aligned held-out rows, its latent cards (one per layer, in
    ``out_dir``) and its replacement model (evaluate/clt.py)."""
    from saejax.evaluate import clt as clt_eval
    from saejax.sae import clt_io
    a, meta = clt_io.load(path)
    layers = meta["layers"]
    for site in [f"{k}.{l}" for l in layers for k in ("mlp_in", "mlp")]:
        if site not in data.sites:
            raise EvaluateError(f"CLT {wd.group_of(path)}: site {site!r} is not in the held-out data")
    rows_in = [data.rows(f"mlp_in.{l}")[0] for l in layers]
    rows_out = [data.rows(f"mlp.{l}")[0] for l in layers]
    per_layer = clt_eval.layer_metrics(a, meta, rows_in, rows_out)
    out = {"id": wd.group_of(path), "arch": meta["arch"], "layers": layers, "width": meta["width"],
           "sparsity": meta["sparsity"], "steps": meta.get("steps"), "tokens": meta.get("tokens"),
           "per_layer": [{"site": f"mlp.{l}", "layer": l, **m} for l, m in zip(layers, per_layer)],
           "l0_total": float(sum(m["l0"] for m in per_layer)),
           **({"matryoshka": list(meta["matryoshka"])} if meta.get("matryoshka") else {})}
    if model is not None and config.evaluate.latent_cards > 0:
        for m, rel in zip(out["per_layer"], _clt_cards(out, a, meta, data, model, config, rng, out_dir)):
            m["card"] = rel
    if model is not None:
        out["model_layers"] = int(model.config.n_layers)
        out["replacement"] = clt_eval.replacement_losses(model, model.params, a, meta, data.tokens,
                                                         data.policy(f"mlp.{layers[0]}"),
                                                         batch=int(config.evaluate.batch_contexts))
    return out


def _evaluate_replacement(name, arrays, meta, member, data, model, config) -> dict:
    """Transcoder group ``name``'s member ``member`` replacing every MLP output at once
    (splice.transcoder_replacement_losses), at the positions the store keeps (as a CLT's)."""
    layers = [int(s.split(".")[1]) for s in meta["sites"]]
    losses = splice.transcoder_replacement_losses(model, model.params, meta, arrays, data.tokens,
                                                  data.policy(meta["sites"][0]), member,
                                                  batch=int(config.evaluate.batch_contexts))
    return {"group": name, "member": member, "arch": meta["arch"], "width": meta["width"],
            "skip": bool(meta.get("skip")), "sparsity": meta["sweep"][member],
            "target_l0": meta["target_l0"][member] if meta.get("target_l0") else None,
            "layers": layers, **losses}


def replacement_line(r: dict) -> str:
    """A transcoder group member's replacement model: one line of the terminal table."""
    ce = "-" if r["ce_score"] is None else f"{r['ce_score']:.3f}"
    l0 = "" if r.get("l0_total") is None else f", total L0 {r['l0_total']:.1f}"
    return (f"transcoders {r['group']} member {r['member']} ({len(r['layers'])} layers{l0}): replacement model "
            f"(every MLP at once): dLM {r['delta_lm_loss']:.4f} CEscore {ce} KL {r['kl']:.4f}")


def _clt_cards(c: dict, a: dict, meta: dict, data, model, config, rng, out_dir: str) -> list[str]:
    """One latent card per CLT layer (``cards/clt.<layer>__<id>.html``): a sample of the layer's live
    latents, each with its top held-out contexts on mlp_in and the norm of its decoder to every layer
    it writes to (raw space, evaluate/clt.py ``writes``); return the cards' relative paths."""
    from saejax.evaluate import clt as clt_eval
    layers, M = meta["layers"], a["b_enc"].shape[1]
    S = min(int(config.evaluate.latent_cards), M)
    norms = clt_eval.writes(a, meta)
    row_of = {int(ctx): i for i, ctx in enumerate(data.all_context_ids)}
    decode = getattr(getattr(model, "tokenizer", None), "decode", None)
    paths = []
    for i, l in enumerate(layers):
        rows, rmeta = data.rows(f"mlp_in.{l}")
        density, _, _ = clt_eval.layer_top(a, meta, i, rows, np.zeros(1, np.int64), 1)
        live = np.flatnonzero(density > 0)
        latents = np.sort(rng.choice(live if len(live) >= S else np.arange(M), S, replace=False))
        _, acts, idx = clt_eval.layer_top(a, meta, i, rows, latents, N_TOP)
        lats = []
        for s, m in enumerate(latents):
            ex = [{"act": float(v), "tokens": data.all_tokens[row_of[int(rmeta[r, 1])]], "pos": int(rmeta[r, 2]),
                   "context": int(rmeta[r, 1])} for v, r in zip(acts[s], idx[s]) if v > 0]
            lats.append({"latent": int(m), "density": float(density[m]), "examples": ex,
                         "writes": [(f"mlp.{layers[j]}", float(norms[i, m, j])) for j in range(i, len(layers))]})
        rel = f"{wd.CARDS}/clt.{l}__{c['id']}.html"
        pl = c["per_layer"][i]
        cards.write_card(os.path.join(out_dir, rel), f"CLT {c['id']} layer {l} (reads mlp_in.{l})",
                         {"clt": c["id"], "layer": l, "arch": meta["arch"], "width": M,
                          "L0": pl["l0"], f"FVU of mlp.{l}": pl["fvu"]}, lats, decode)
        paths.append(rel)
    return paths


def clt_table(c: dict) -> str:
    """A CLT's lines of the terminal table: one per output layer, then the replacement model."""
    mat = c.get("matryoshka")
    lines = [f"CLT {c['id']}: {c['arch']}, {len(c['layers'])} layers x {c['width']} latents, "
             f"total L0 {c['l0_total']:.1f}" + (f", Matryoshka prefixes {mat}" if mat else ""),
             "  site     L0    FVU   dead" + ("   FVU of each prefix" if mat else "")]
    for m in c["per_layer"]:
        pre = " ".join(f"{v:.3f}" for v in m.get("fvu_prefix", ()))
        lines.append(f"{m['site']:>6} {m['l0']:6.1f} {m['fvu']:6.3f} {m['dead_frac']:6.1%}" + (f"   {pre}" if pre else ""))
    r = c.get("replacement")
    if r:
        ce = "-" if r["ce_score"] is None else f"{r['ce_score']:.3f}"
        lines.append(f"  replacement model (every MLP at once): dLM {r['delta_lm_loss']:.4f} CEscore {ce} "
                     f"KL {r['kl']:.4f}")
    return "\n".join(lines)


def _evaluate_site(name, arrays, meta, t, data, model, config, out, layer_group=None) -> list[dict]:
    """The entries of group ``name``'s SAEs at site t (one per sweep member); writes their cards.
    ``layer_group``: the pooled site whose SAEs these are, ``meta`` then being ``sae_io.on_layer``'s view
    of it on one of its layers (its entries say ``layer_group``)."""
    results = []
    frozen = np.asarray(meta.get("frozen") or np.zeros((len(meta["sites"]), len(meta["sweep"])), bool))
    seed = sae_io.seeds(meta)
    site = meta["sites"][t]
    rows, rmeta = data.rows(site)
    read = meta["reads"][t] if meta.get("reads") else None
    read_rows = data.rows(read)[0] if read else None
    recon, density = metrics.site_metrics(meta, arrays, t, rows, return_density=True, read_rows=read_rows)
    losses = [{}] * len(recon)
    if model is not None and config.evaluate.splice:
        policy = data.policy(site)
        if read:  # a position counts if both sites' policies keep it
            import dataclasses
            policy = dataclasses.replace(policy, read_max_norm=data.policy(read).max_norm)
        losses = splice.site_losses(model, model.params, site, meta, arrays, t, data.tokens, policy,
                                    batch=int(config.evaluate.batch_contexts), read=read,
                                    read_scale=meta["read_norm_scale"][t] if read else None)
    name_site = entry_site(meta, t)
    card_of = {}
    if model is not None and config.evaluate.latent_cards > 0:
        # The latent sample of each site's cards has its own stream: any process draws the same.
        rng = np.random.default_rng([int(config.seed), zlib.crc32(f"{name}/{name_site}".encode())])
        card_of = _cards(name, name_site, t, meta, arrays, rows if read is None else read_rows, rmeta, density,
                         recon, data, model, config, rng, out)
    for k, (r, lo) in enumerate(zip(recon, losses)):
        results.append({
            "id": sae_id(name, name_site, k), "group": name, "site": name_site, "kind": name_site.split(".")[0],
            **({"reads": read, "writes": site, "skip": bool(meta.get("skip")), "d_out": meta["d_out"]}
               if read else {}),
            "layer": int(site.split(".")[1]), "t": t, "member": k, "arch": meta["arch"], "d": meta["d"],
            "width": meta["width"], "sparsity": meta["sweep"][k],
            "target_l0": meta["target_l0"][k] if meta.get("target_l0") else None,
            "lam": meta["lam"][t][k] if meta.get("lam") else None,
            "k": int(meta["k"][k]) if meta["k"] else None,
            "seed": seed[k],
            "frozen": bool(frozen[t][k]), "steps": meta.get("steps"), "tokens": meta.get("tokens"),
            **({"layer_group": layer_group} if layer_group else {}),
            **r, **lo, "card": card_of.get(k)})
    return results


def _barrier(name: str) -> None:
    from saejax.store.harvest import _barrier as barrier  # the coordination service's, long timeout
    barrier(name)


def _gather(done: dict, units: list, tmp: str, pc: int, pi: int) -> dict:
    """Every process writes its units' results to ``<tmp>/part-<pi>.json`` (atomically); after a
    barrier process 0 reads them all and returns every unit's results (the others: their own)."""
    part = os.path.join(tmp, f"part-{pi}.json")
    index = {u: i for i, u in enumerate(units)}
    with open(part + ".partial", "w") as fh:
        json.dump([[index[u], files.json_safe(r)] for u, r in done.items()], fh, allow_nan=False)
    os.replace(part + ".partial", part)
    _barrier("saejax-evaluate-parts")
    if pi != 0:
        return done
    out = {}
    for p in range(pc):
        path = os.path.join(tmp, f"part-{p}.json")
        with open(path) as fh:
            for i, r in json.load(fh):
                out[units[i]] = r
        os.remove(path)
    missing = [u for u in units if u not in out]
    if missing:
        raise EvaluateError(f"{tmp}: the processes' parts lack {len(missing)} of {len(units)} work units")
    return out


def _cards(name, site, t, meta, arrays, rows, rmeta, density, recon, data, model, config, rng, out) -> dict:
    """Write the K cards of site t; return {member: relative path}."""
    K, M = density.shape
    S = min(int(config.evaluate.latent_cards), M)
    latents = np.zeros((K, S), np.int64)
    for k in range(K):  # a sample of live latents (dead ones have nothing to show), then any
        live = np.flatnonzero(density[k] > 0)
        pool = live if len(live) >= S else np.arange(M)
        latents[k] = np.sort(rng.choice(pool, S, replace=False))
    in_scale = float((meta.get("read_norm_scale") or meta["norm_scale"])[t])  # of the rows the latents read
    acts, idx = metrics.top_activations(meta, arrays, t, rows, latents, N_TOP, scale=in_scale)
    row_of = {int(c): i for i, c in enumerate(data.all_context_ids)}
    decode = getattr(getattr(model, "tokenizer", None), "decode", None)
    scale = 1.0 / in_scale  # cards show activations of the released (raw-input) SAE
    paths = {}
    for k in range(K):
        lats = []
        for s in range(S):
            ex = []
            for a, i in zip(acts[k, s], idx[k, s]):
                if a <= 0:
                    continue
                ctx, pos = int(rmeta[i, 1]), int(rmeta[i, 2])
                ex.append({"act": float(a) * scale, "tokens": data.all_tokens[row_of[ctx]], "pos": pos, "context": ctx})
            lats.append({"latent": int(latents[k, s]), "density": float(density[k, latents[k, s]]), "examples": ex})
        rel = f"{wd.CARDS}/{sae_id(name, site, k)}.html"
        summary = {"site": site, "group": name, "arch": meta["arch"], "width": meta["width"],
                   "sparsity": meta["sweep"][k], "L0": recon[k]["l0"], "FVU": recon[k]["fvu"]}
        cards.write_card(os.path.join(out, rel), f"{site} {meta['arch']} {meta['width']} (member {k})",
                         summary, lats, decode)
        paths[k] = rel
    return paths




def table(results: list[dict]) -> str:
    """The terminal table: one row per SAE; the splice columns only when some SAE was spliced."""
    sweep = ("target", "target_l0", "{:g}") if any(r.get("target_l0") for r in results) \
        else ("sparsity", "sparsity", "{:g}")  # calibrated runs: the L0 target; else lambda or k
    cols = [("site", "site", "{}"), *([("group", "layer_group", "{}")] if any(r.get("layer_group") for r in results)
                                      else []),  # sae.layer_groups: the pooled site an SAE was trained on
            ("width", "width", "{}"), ("arch", "arch", "{}"), sweep,
            ("L0", "l0", "{:.1f}"), ("FVU", "fvu", "{:.3f}"), ("dead", "dead_frac", "{:.1%}"),
            (">10%", "dense_10pct", "{:.1%}")]
    spliced = [("dLM", "delta_lm_loss", "{:.4f}"), ("CEscore", "ce_score", "{:.3f}"), ("KL", "kl", "{:.4f}")]
    if any(r.get(k) is not None for r in results for _, k, _ in spliced):
        cols += spliced
    rows = [[h for h, _, _ in cols]]
    for r in results:
        rows.append([("-" if r.get(k) is None else f.format(r[k])) for _, k, f in cols])
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)
