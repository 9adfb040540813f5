"""``saejax release``: publish evaluated SAEs in Gemma Scope's and SAELens's layouts; ``load_suite``.

Reads  <workdir>/evaluate/results.json (+ cards/)  and  <workdir>/train/<group>/final/
Writes <workdir>/release/  (suite.py; formats in docs/formats.md), atomically: a complete
release folder (with suite.json) is the completion marker.
"""
from __future__ import annotations

import json
import os
import sys

from saejax import workdir as wd
from saejax.release.annotate import annotate
from saejax.release.errors import ReleaseError
from saejax.release.load import Entry, Suite, load_suite
from saejax.release.sae import SAE

__all__ = ["annotate", "ReleaseError", "Entry", "Suite", "SAE", "load_suite", "run", "is_complete"]


def _digest(path: str) -> str:
    import hashlib
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def is_complete(config) -> bool:
    """A release exists and was made from the current evaluation results (``saejax run`` skips it).
    With ``release.push_to_hub`` set, never: the release is rewritten and uploaded (the Hub skips
    the files it already holds)."""
    if config.release.push_to_hub:
        return False
    path = wd.suite_path(config)
    if not (os.path.isfile(path) and os.path.isfile(wd.results_path(config))):
        return False
    try:
        with open(path) as fh:
            made_from = json.load(fh).get("results_sha256")
    except (OSError, json.JSONDecodeError):
        return False
    return made_from == _digest(wd.results_path(config))


def _results(config) -> dict:
    path = wd.results_path(config)
    if not os.path.isfile(path):
        raise ReleaseError(f"no evaluation results at {path} (run saejax evaluate first)")
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except json.JSONDecodeError as e:
        raise ReleaseError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc.get("saes"), list):
        raise ReleaseError(f"{path}: no 'saes' list")
    return doc


def _add_clts(config, doc: dict, tmp: str) -> dict:
    """Every evaluated CLT into ``clt/<id>/`` of the release being built: the saejax layout and, when
    circuit-tracer can read it (JumpReLU/BatchTopK over every layer of the model), its layout in
    ``clt/<id>/circuit_tracer/``; else one line saying why not; its per-layer latent cards into
    ``cards/`` (each ``per_layer[i]["card"]``, None where evaluate wrote none). Returns suite.json's "clts"."""
    import shutil

    from saejax.sae import clt_io
    out = []
    for c in doc.get("clts", []):
        src = wd.final_dir(config, c["id"])
        rel = f"clt/{c['id']}"
        os.makedirs(os.path.join(tmp, rel))
        for name in ("params.safetensors", "clt.json"):
            shutil.copyfile(os.path.join(src, name), os.path.join(tmp, rel, name))
        a, meta = clt_io.load(src)
        ct = None
        try:
            clt_io.write_circuit_tracer(os.path.join(tmp, rel, "circuit_tracer"), a, meta,
                                        c.get("model_layers") or len(meta["layers"]))
            ct = f"{rel}/circuit_tracer"
        except clt_io.ExportError as e:
            print(f"saejax release: CLT {c['id']}: {e}", file=sys.stderr)
        per_layer = [dict(m) for m in c.get("per_layer") or []]
        for m in per_layer:  # the card paths are relative to evaluate/ and to the release alike
            card = m.get("card")
            if card and os.path.isfile(os.path.join(wd.evaluate_dir(config), card)):
                os.makedirs(os.path.join(tmp, wd.CARDS), exist_ok=True)
                shutil.copyfile(os.path.join(wd.evaluate_dir(config), card), os.path.join(tmp, card))
            else:
                m["card"] = None
        out.append({"id": c["id"], "path": rel, "circuit_tracer": ct, "arch": c["arch"], "layers": c["layers"],
                    "width": c["width"], "l0_total": c.get("l0_total"), "per_layer": per_layer or None,
                    "replacement": c.get("replacement"), **({"matryoshka": c["matryoshka"]} if c.get("matryoshka") else {})})
    return {"clts": out} if out else {}


def _replacements(doc: dict, picked: list[dict]) -> dict:
    """suite.json's "replacements": results.json's replacement models of the transcoder group members
    the release holds (evaluate.replacement; docs/evaluate.md), as evaluate measured them."""
    held = {(r["group"], r["member"]) for r in picked}
    out = [dict(r) for r in doc.get("replacements", []) if (r["group"], r["member"]) in held]
    return {"replacements": out} if out else {}


def run(config, dry_run: bool = False) -> dict | None:
    """Choose, fold and write the release; see suite.py."""
    from saejax.release import hub, suite as writer
    from saejax.sae import io as sae_io
    doc = _results(config)
    repo = config.release.push_to_hub or None
    picked, notes = writer.choose(doc["saes"], tuple(config.release.l0))
    for note in notes:
        print(f"saejax release: {note}", file=sys.stderr)
    if not picked and not doc.get("clts"):
        raise ReleaseError(f"{wd.results_path(config)}: no SAE or CLT to release "
                           f"(all frozen or unmeasured)")
    base = hub.base_model(config, doc.get("model", ""))
    n_clt = len(doc.get("clts", []))
    what = " and ".join(([f"{len(picked)} of {len(doc['saes'])} SAEs"] if doc["saes"] else [])
                        + ([f"{n_clt} CLT{'s' if n_clt > 1 else ''}"] if n_clt else []))
    print(f"saejax release: {what} -> {wd.release_dir(config)} "
          f"({', '.join(config.release.formats)}; base model {base or 'without a Hub id'})"
          + (f", then uploaded to https://huggingface.co/{repo}" if repo else ""), file=sys.stderr)
    if dry_run:
        for r in picked:
            print(f"  {r['site']} width {r['width']} L0 {r['l0']:.1f} FVU {r['fvu']:.3f}", file=sys.stderr)
        return None
    import jax
    if jax.process_index() != 0:
        return None
    groups = {}
    for name in sorted({r["group"] for r in picked}):
        path = wd.final_dir(config, name)
        try:
            groups[name] = sae_io.load_group(path)
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise ReleaseError(str(e).strip("'\"")) from None
    with wd.stage_lock(config, "release", output=wd.release_dir(config)):
        suite = writer.write(wd.release_dir(config), picked, groups, name=config.release.name,
                             model=doc.get("model", ""), formats=tuple(config.release.formats),
                             cards_dir=wd.evaluate_dir(config), contexts=doc.get("contexts", 0),
                             context_size=int(config.data.context_len), base_model=base, repo=repo,
                             extra={"results_sha256": _digest(wd.results_path(config)),
                                    "heldout_contexts": doc.get("heldout_contexts", 0),
                                    "context_size": int(config.data.context_len)},
                             add=lambda tmp: {**_add_clts(config, doc, tmp), **_replacements(doc, picked)})
    print(f"saejax release: wrote {wd.suite_path(config)}", file=sys.stderr)
    if repo:
        url = hub.push(wd.release_dir(config), repo, private=bool(config.release.private))
        print(f"saejax release: uploaded to {url}", file=sys.stderr)
    return suite
