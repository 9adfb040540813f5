"""``load_suite``: a lazy index over a released suite, ours or Gemma Scope's.

    suite = saejax.load_suite("runs/x/release")              # a local folder
    suite = saejax.load_suite("google/gemma-scope-2b-pt-res") # a Hugging Face repo (network)
    suite.select(kind="res", layer=20, width="16k")           # -> [Entry, ...]
    suite.index()                                             # rows: site, width, L0, ...; no weights read
    sae = suite.get("res.20", width="16k", l0=80)             # nearest L0 (or get("res", 20, ...))
    sae = suite.canonical("res", 20, width="16k")             # L0 closest to 100
    sae.encode(x); sae.decode(f); model.apply(..., splice={"res.20": sae.splice(mask)})

Transcoders are entries of kind "transcoder" (site ``transcoder.L``): ``suite.get("transcoder.3")``
gives an SAE that reads mlp_in.3 and writes mlp.3 (``sae.reads``, ``sae.site``; splice it with
``splice={sae.site: sae.splice(mask)}``, a cross-site splice). Gemma Scope's own transcoders
(google/gemma-scope-2b-pt-transcoders, or a local folder in its layout) read the pre-MLP norm's
output before its gain: ``get(..., model=model)`` divides W_enc's input rows by
``model.mlp_in_gain(L)`` so they read mlp_in.L (docs/models.md); without ``model=`` they are refused.

The index comes from ``suite.json`` (saejax releases) or from the file listing (Gemma Scope
repositories hold hundreds of GB): nothing is read or downloaded until an SAE is asked for. The
canonical SAE of a (site, width) is the one whose L0 is closest to 100, SAELens's rule for Gemma
Scope. Paths that leave the release folder are refused; archives are read without unpickling.
"""
from __future__ import annotations

import dataclasses
import json
import os
import posixpath

import jax.numpy as jnp
import numpy as np

from saejax.release import gemmascope as gs
from saejax.release.errors import ReleaseError
from saejax.release.sae import SAE
from saejax.sae import forward, kinds

CANONICAL_L0 = 100.0


@dataclasses.dataclass(frozen=True)
class Entry:
    """One SAE of a suite, before its weights are read."""

    kind: str
    layer: int
    width: int  # nominal latent width (from the folder name or suite.json)
    l0: float | None  # average L0 (None: a Gemma Scope "canonical" folder)
    path: str | None  # release-relative posix path of params.npz (None: SAELens folder only)
    arch: str = gs.ARCH  # the released kind (saejax.sae.kinds)
    saelens: str | None = None  # release-relative SAELens folder
    k: int | None = None
    metrics: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)
    source: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)  # training provenance
    # transcoders: the site read; whether W_enc reads before the pre-MLP norm's gain (Gemma Scope's own)
    reads: str | None = None
    pre_gain: bool = False
    # an SAE trained on a layer group (sae.layer_groups): the group's sites, this entry's layer among them
    layer_group: tuple | None = None

    @property
    def site(self) -> str:
        return f"{self.kind}.{self.layer}"


def safe_relpath(rel: str, where: str) -> str:
    """A release-relative path, normalized; refused if absolute or leaving the folder."""
    if not isinstance(rel, str) or not rel:
        raise ReleaseError(f"{where}: empty or non-string path {rel!r}")
    norm = posixpath.normpath(rel.replace("\\", "/"))
    if norm.startswith("/") or norm == ".." or norm.startswith("../") or ":" in norm.split("/")[0]:
        raise ReleaseError(f"{where}: path {rel!r} leaves the release folder")
    return norm


def _kind_of_repo(name: str) -> str | None:
    """Gemma Scope repos hold one kind: ``gemma-scope-2b-pt-res(-canonical)`` -> "res",
    ``gemma-scope-2b-pt-transcoders`` -> "transcoder"."""
    for part in reversed(name.rstrip("/").split("/")[-1].split("-")):
        if part in gs.KINDS:
            return part
        if part in gs.REPO_KINDS:
            return gs.REPO_KINDS[part]
    return None


class Suite:
    """A lazy index of released SAEs; see the module docstring."""

    def __init__(self, entries: list[Entry], fetch, source: str, meta: dict | None = None):
        self.entries = sorted(entries, key=lambda e: (e.kind, e.layer, e.width, e.l0 if e.l0 is not None else -1))
        self._fetch = fetch  # release-relative path -> local file path
        self.source = source
        self.meta = meta or {}

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __repr__(self) -> str:
        return f"Suite({self.source!r}, {len(self)} SAEs, sites {self.sites()})"

    def clts(self) -> list[str]:
        """The ids of the release's cross-layer transcoders (suite.json "clts")."""
        return [c["id"] for c in self.meta.get("clts", [])]

    def clt(self, id: str | None = None):
        """A released CLT (saejax.release.clt.CLT): the one with ``id``, or the only one."""
        from safetensors.numpy import load_file

        from saejax.release.clt import CLT
        found = [c for c in self.meta.get("clts", []) if id is None or c["id"] == id]
        if len(found) != 1:
            raise ReleaseError(f"{self.source}: {'no CLT ' + repr(id) if id else str(len(found)) + ' CLTs'} "
                               f"(the release has {self.clts()})")
        rel = safe_relpath(found[0]["path"], f"{self.source}/suite.json")
        with open(self._fetch(f"{rel}/clt.json")) as fh:
            meta = json.load(fh)
        return CLT(load_file(self._fetch(f"{rel}/params.safetensors")), meta)

    def sites(self) -> list[str]:
        return sorted({e.site for e in self.entries}, key=lambda s: (s.split(".")[0], int(s.split(".")[1])))

    def index(self) -> list[dict]:
        """One row per SAE (site, kind, layer, width, L0, arch, path); reads no weights."""
        return [{"site": e.site, "kind": e.kind, "layer": e.layer, "width": e.width, "l0": e.l0,
                 "arch": e.arch, "path": e.path or e.saelens,
                 **({"layer_group": list(e.layer_group)} if e.layer_group else {})} for e in self.entries]

    def select(self, site: str | None = None, kind: str | None = None, layer: int | None = None,
               width: int | str | None = None) -> list[Entry]:
        """Entries matching every given filter; ``width`` an int or a name ("16k", "width_16k")."""
        w = gs.parse_width(width) if isinstance(width, str) else width
        return [e for e in self.entries if (site is None or e.site == site) and (kind is None or e.kind == kind)
                and (layer is None or e.layer == layer) and (w is None or e.width == w)]

    def find(self, site: str, layer: int | None = None, *, width: int | str | None = None,
             l0: float | None = None) -> Entry:
        """The entry of a site ("res.20", or "res" with layer=20) and width whose L0 is nearest
        ``l0``; with l0=None the canonical one (L0 closest to 100, or Gemma Scope's canonical folder)."""
        site = _site(site, layer)
        cands = self.select(site=site, width=width)
        if not cands:
            raise ReleaseError(f"{self.source}: no SAE for site {site!r}" + (f" width {width}" if width else ""))
        widths = sorted({e.width for e in cands})
        if len(widths) > 1:
            raise ReleaseError(f"{self.source}: site {site!r} has widths {widths}; pass width=")
        if l0 is None:
            marked = [e for e in cands if e.l0 is None]
            if marked:
                return marked[0]
            l0 = CANONICAL_L0
        known = [e for e in cands if e.l0 is not None]
        if not known:
            raise ReleaseError(f"{self.source}: site {site!r} has no SAE with a known L0")
        return min(known, key=lambda e: (abs(e.l0 - l0), e.l0))

    def get(self, site: str, layer: int | None = None, *, width: int | str | None = None,
            l0: float | None = None, model=None) -> SAE:
        """Read (or download) the SAE ``find`` chooses (``model``: for Gemma Scope's own transcoders)."""
        return self.load(self.find(site, layer, width=width, l0=l0), model=model)

    def canonical(self, site: str, layer: int | None = None, *, width: int | str | None = None) -> SAE:
        """The SAE with L0 closest to 100 (SAELens's Gemma Scope rule)."""
        return self.get(site, layer, width=width)

    def load(self, e: Entry, model=None) -> SAE:
        """Read (or download) one entry's weights; ``model`` divides the W_enc of a transcoder that
        reads before the pre-MLP norm's gain (``Entry.pre_gain``) by that gain."""
        if e.path and e.path.endswith(".safetensors"):  # Gemma Scope 2's layout
            path = self._fetch(e.path)
            arrays, k = gs.read_gs2(path), None
        elif e.path:
            path = self._fetch(e.path)
            arrays, k = gs.read_params(path)
        else:
            path = self._fetch(f"{e.saelens}/sae_weights.safetensors")
            arrays, k = _read_saelens(path, self._fetch(f"{e.saelens}/cfg.json"))
        arch, k = (kinds.released_with_k().name, k) if k is not None else (e.arch, e.k)
        if kinds.get(arch).infers_with_k and k is None:
            raise ReleaseError(f"{path}: a {arch} SAE without k")
        if e.pre_gain:
            if model is None:
                raise ReleaseError(f"{path}: Gemma Scope's transcoders read the pre-MLP norm's output before its "
                                   f"gain; pass model= so W_enc is divided by model.mlp_in_gain({e.layer})")
            gain = np.asarray(model.mlp_in_gain(e.layer), np.float64)
            arrays = dict(arrays, W_enc=(np.asarray(arrays["W_enc"], np.float64) / gain[:, None]).astype(np.float32))
        site = f"mlp.{e.layer}" if e.kind == "transcoder" else e.site
        reads = (e.reads or f"mlp_in.{e.layer}") if e.kind == "transcoder" else None
        return SAE(arch=arch, arrays={n: jnp.asarray(a) for n, a in arrays.items()}, k=k, site=site,
                   path=path, info={"l0": e.l0, "width": e.width, **e.metrics}, reads=reads)


def _site(site: str, layer: int | None) -> str:
    if layer is not None:
        return f"{site}.{layer}"
    kind, dot, num = site.partition(".")
    if not dot or kind not in gs.KINDS or not num.isdigit():
        raise ReleaseError(f"site {site!r} is not '<kind>.<layer>' with kind in {gs.KINDS} (or pass layer=)")
    return site


def _read_saelens(weights: str, cfg_path: str):
    """A SAELens folder's float32 arrays (threshold 0 when absent) and its k (an architecture whose
    kind infers with k) or None."""
    from safetensors.numpy import load_file
    try:
        with open(cfg_path) as fh:
            cfg = json.load(fh)
        t = load_file(weights)
    except FileNotFoundError as e:
        raise ReleaseError(f"{e.filename}: file not found") from None
    except Exception as e:  # noqa: BLE001 - JSON or safetensors parse errors
        raise ReleaseError(f"{weights}: cannot read the SAELens folder ({type(e).__name__}: {e})".splitlines()[0]) from None
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        if key not in t:
            raise ReleaseError(f"{weights}: missing key {key!r}")
    arrays = {n: np.asarray(t[n], np.float32) for n in ("W_enc", "W_dec", "b_enc", "b_dec")}
    if "W_skip" in t:  # a SAELens skip-transcoder's [d_out, d_in]
        arrays["W_skip"] = np.ascontiguousarray(np.asarray(t["W_skip"], np.float32).T)
    arrays["threshold"] = np.asarray(t["threshold"], np.float32) if "threshold" in t \
        else np.zeros(arrays["b_enc"].shape, np.float32)
    if cfg.get("apply_b_dec_to_input"):  # (x - b_dec) @ W_enc + b_enc
        arrays["b_enc"] = forward.fold_pre_bias(arrays["b_enc"], arrays["b_dec"], arrays["W_enc"])
    kind = kinds.from_saelens(cfg.get("architecture"))
    return arrays, (int(cfg["k"]) if kind is not None and kind.infers_with_k else None)


def _local(root: str):
    real_root = os.path.realpath(root)

    def fetch(rel: str) -> str:
        rel = safe_relpath(rel, root)
        path = os.path.realpath(os.path.join(real_root, rel))
        if os.path.commonpath([path, real_root]) != real_root:
            raise ReleaseError(f"{os.path.join(root, rel)}: resolves outside the release folder {root}")
        return path
    return fetch


def _index(files: list[str], read_json, source: str, default_kind: str | None):
    """Entries from suite.json if listed, else from params.npz paths in the listing."""
    if "suite.json" in files:
        suite = read_json("suite.json")
        where = f"{source}/suite.json"
        if not isinstance(suite, dict) or not isinstance(suite.get("saes"), list):
            raise ReleaseError(f"{where}: expected an object with a 'saes' list")
        entries = []
        for i, s in enumerate(suite["saes"]):
            try:
                rel = safe_relpath(s["path"], where) if s.get("path") else None
                sl = safe_relpath(s["saelens"], where) if s.get("saelens") else None
                if rel is None and sl is None:
                    raise ReleaseError(f"{where}: entry {i} has neither 'path' nor 'saelens'")
                entries.append(Entry(kind=s["kind"], layer=int(s["layer"]), width=int(s["width"]),
                                     l0=None if s.get("l0") is None else float(s["l0"]), path=rel,
                                     arch=s.get("arch", gs.ARCH), k=s.get("k"), saelens=sl,
                                     metrics=dict(s.get("metrics") or {}), source=dict(s.get("source") or {}),
                                     reads=s.get("reads"),
                                     layer_group=tuple((s.get("layer_group") or {}).get("sites") or ()) or None))
            except (KeyError, TypeError, ValueError) as e:
                if isinstance(e, ReleaseError):
                    raise
                raise ReleaseError(f"{where}: entry {i} is malformed ({e!r})") from None
        return entries, suite
    entries = []
    for rel in files:
        parsed = gs.parse_path(rel, default_kind)
        if parsed is not None:
            entries.append(Entry(kind=parsed["kind"], layer=parsed["layer"], width=parsed["width"],
                                 l0=parsed["l0"], path=safe_relpath(rel, source),
                                 pre_gain=parsed["kind"] == "transcoder"))  # Gemma Scope's own transcoders
    return entries, {}


def load_suite(path_or_repo: str, revision: str | None = None) -> Suite:
    """Index a released suite (a local folder, or a Hugging Face repo id); see the module docstring."""
    src = os.fspath(path_or_repo)
    if os.path.isdir(src):
        fetch = _local(src)
        files = []
        for dirpath, _, names in os.walk(src):
            for n in names:
                files.append(os.path.relpath(os.path.join(dirpath, n), src).replace(os.sep, "/"))

        def read_json(rel):
            p = fetch(rel)
            try:
                with open(p) as fh:
                    return json.load(fh)
            except json.JSONDecodeError as e:
                raise ReleaseError(f"{p}: not valid JSON ({e})") from None
        default_kind = _kind_of_repo(os.path.basename(os.path.abspath(src)))
    elif os.path.exists(src):
        raise ReleaseError(f"{src}: not a folder")
    elif src.count("/") == 1 and not src.startswith((".", "/")):
        fetch, files, read_json = _hub(src, revision)
        default_kind = _kind_of_repo(src)
    else:
        raise ReleaseError(f"{src}: no such release folder (and not a Hugging Face repo id)")
    entries, meta = _index(sorted(files), read_json, src, default_kind)
    if not entries and not meta.get("clts"):
        raise ReleaseError(f"{src}: no SAEs found (no suite.json and no <kind>/layer_L/width_W/average_l0_N/params.npz)")
    return Suite(entries, fetch, src, meta)


def _hub(repo: str, revision: str | None):
    """Listing and on-demand download from a Hugging Face repo (needs the network)."""
    try:
        import huggingface_hub as hub
        files = hub.list_repo_files(repo, revision=revision)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: all one message
        raise ReleaseError(f"{repo}: cannot list the Hugging Face repo ({type(e).__name__}: {e})".splitlines()[0]) from None

    def fetch(rel: str) -> str:
        rel = safe_relpath(rel, repo)
        try:
            return hub.hf_hub_download(repo, rel, revision=revision)
        except Exception as e:  # noqa: BLE001
            raise ReleaseError(f"{repo}/{rel}: download failed ({type(e).__name__})") from None

    def read_json(rel):
        p = fetch(rel)
        try:
            with open(p) as fh:
                return json.load(fh)
        except json.JSONDecodeError as e:
            raise ReleaseError(f"{repo}/{rel}: not valid JSON ({e})") from None
    return fetch, files, read_json
