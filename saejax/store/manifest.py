"""The store's manifest: the commit record (format in docs/store.md).

A shard exists for readers only once a manifest lists it. During a harvest every process keeps its
own part record, ``parts/<process>.json``, rewritten (temp file + rename) after each commit; when
all processes are done, process 0 merges the parts into ``manifest.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath

FORMAT = "saejax-store/2"  # /2 added per-chunk crc32 checksums of every shard file (and optional "pairs")
READABLE = ("saejax-store/1", FORMAT)  # /1 stores are read after a full sha256 verify (reader.py)
SPLITS = ("train", "heldout")
DTYPES = ("float32", "float16", "bfloat16")
REQUIRED = ("format", "model", "corpus", "context_len", "context_start_id", "special_ids", "dtype",
            "policy", "splits", "sites", "shards")


class StoreError(ValueError):
    """A store that cannot be read as asked; the message names the file or site."""


def local_path(path: str) -> str:
    """``path`` itself; StoreError for object-store URLs (mount them with gcsfuse: docs/store.md)."""
    if "://" in str(path):
        raise StoreError(f"{path}: saejax reads and writes file paths; mount the bucket with gcsfuse "
                         f"and use the mount point (docs/store.md, 'gs:// through gcsfuse')")
    return str(path)


def write_json(path: str, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temp name, fsync, rename)."""
    from saejax import files
    text = json.dumps(obj, indent=1)
    with files.atomic(path, len(text), "w") as f:
        f.write(text)


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise StoreError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: not valid JSON ({e})") from None


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def align_keys(sites, pairs) -> dict[str, str]:
    """{site: key site}: sites joined by ``pairs`` (directly or through other pairs) share one key,
    the first of them in ``sites`` order; an unpaired site is its own key. Aligned sites share the
    harvest's keep mask, shuffle and shard boundaries, and the reader's block order."""
    sites = list(sites)
    parent = {s: s for s in sites}

    def root(s):
        while parent[s] != s:
            s = parent[s]
        return s
    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            first, second = sorted((ra, rb), key=sites.index)
            parent[second] = first
    return {s: root(s) for s in sites}


def check_pairs(m: dict, path: str) -> None:
    """The optional ``pairs`` field: [[in_site, out_site], ...] of listed sites, whose shards in each
    split hold the same numbers of rows in the same order. StoreError naming the pair otherwise."""
    pairs = m.get("pairs", [])
    if not isinstance(pairs, list):
        raise StoreError(f"{path}: pairs {pairs!r} is not a list")
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and all(p in m["sites"] for p in pair)
                and pair[0] != pair[1]):
            raise StoreError(f"{path}: pair {pair!r} is not [in_site, out_site] of two sites the manifest lists")
        for split in SPLITS:
            a, b = ([sh["rows"] for sh in m["shards"] if sh["site"] == s and sh["split"] == split] for s in pair)
            if a != b:
                raise StoreError(f"{path}: pair {pair[0]}, {pair[1]}: their {split} shards differ in rows "
                                 f"({sum(a)} in {len(a)} shards, {sum(b)} in {len(b)}); paired rows must align")


def validate(m: dict, path: str) -> None:
    """Check the manifest's structure; StoreError naming ``path`` and the field or site."""
    for key in REQUIRED:
        if key not in m:
            raise StoreError(f"{path}: missing field {key!r}")
    if m["format"] not in READABLE:
        raise StoreError(f"{path}: format {m['format']!r} is not one of {READABLE}")
    if m["dtype"] not in DTYPES:
        raise StoreError(f"{path}: dtype {m['dtype']!r} is not one of {DTYPES}")
    for site, s in m["sites"].items():
        for key in ("width", "mean_sq_norm"):
            if key not in s:
                raise StoreError(f"{path}: site {site} has no {key!r}")
        if not (isinstance(s["width"], int) and s["width"] > 0):
            raise StoreError(f"{path}: site {site} has width {s['width']!r}")
    for i, sh in enumerate(m["shards"]):
        for key in ("site", "split", "file", "meta", "rows", "sha256"):
            if key not in sh:
                raise StoreError(f"{path}: shard {i} has no {key!r}")
        if sh["site"] not in m["sites"]:
            raise StoreError(f"{path}: shard {sh['file']} names site {sh['site']!r}, which the manifest does not list")
        if sh["split"] not in SPLITS:
            raise StoreError(f"{path}: shard {sh['file']} has split {sh['split']!r}")
        if not (isinstance(sh["rows"], int) and sh["rows"] >= 0):
            raise StoreError(f"{path}: shard {sh['file']} has rows {sh['rows']!r}")
    seen = set()
    for sh in m["shards"]:
        for key in ("file", "meta"):
            rel = confined(sh[key], f"{path}: shard entry {key!r}")
            if rel in seen:
                raise StoreError(f"{path}: {rel} is listed more than once")
            seen.add(rel)
        if m["format"] != "saejax-store/1":
            for key in ("chunk_bytes", "chunks", "meta_chunks", "bytes", "meta_bytes"):
                if key not in sh:
                    raise StoreError(f"{path}: shard {sh['file']} has no {key!r}")
            cb = sh["chunk_bytes"]
            if not (isinstance(cb, int) and cb > 0):
                raise StoreError(f"{path}: shard {sh['file']} has chunk_bytes {cb!r}")
            for n, key in (("bytes", "chunks"), ("meta_bytes", "meta_chunks")):
                if not isinstance(sh[key], list) or len(sh[key]) != -(-sh[n] // cb):
                    raise StoreError(f"{path}: shard {sh['file']}: {key!r} does not cover its {sh[n]} bytes "
                                     f"in chunks of {cb}")
    check_pairs(m, path)


def confined(rel, where: str) -> str:
    """A store-relative path as listed in a manifest: a normalized relative posix path that stays
    inside the store (no absolute path, no '..'); StoreError naming ``where`` and the path otherwise.
    Symbolic links are resolved when the store is opened (reader.Store)."""
    if not isinstance(rel, str) or not rel:
        raise StoreError(f"{where}: path {rel!r} is not a file name")
    if rel.startswith("/") or "\\" in rel or ":" in rel or posixpath.normpath(rel) != rel \
            or rel.split("/")[0] == "..":
        raise StoreError(f"{where}: path {rel!r} is not a plain relative path inside the store")
    return rel
