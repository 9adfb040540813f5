"""Writing shards: atomic ``.npy`` files with their checksums, and whole stores from arrays.

Every file is written to ``<name>.tmp-<pid>`` and renamed into place, so a reader (or a resumed
harvest) never sees a half-written file under a final name. The file's sha256 and the crc32 of each
``CHUNK_BYTES`` chunk of it (which the reader checks as training reads them) are computed from the
bytes as they are written (no second read).
"""
from __future__ import annotations

import glob
import hashlib
import os
import zlib

import ml_dtypes
import numpy as np

from saejax import files
from saejax.store.manifest import FORMAT, StoreError, write_json

STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
CHUNK_BYTES = 1 << 22  # 4 MiB: the unit of the reader's checks (one block of rows spans one or two)


def crc(b) -> str:
    """The checksum of one chunk as the manifest records it (crc32, 8 hex digits)."""
    return f"{zlib.crc32(b):08x}"


class _HashingFile:
    """A write-only file object that also feeds a sha256 and the crc32 of each ``chunk``-byte chunk."""

    def __init__(self, f, chunk: int):
        self.f, self.h, self.n, self.chunk = f, hashlib.sha256(), 0, chunk
        self.crcs, self._crc = [], 0

    def write(self, b):
        b = memoryview(b).cast("B")
        self.h.update(b)
        i = 0
        while i < len(b):  # split at chunk boundaries
            take = min(len(b) - i, self.chunk - self.n % self.chunk)
            self._crc = zlib.crc32(b[i:i + take], self._crc)
            self.n += take
            i += take
            if self.n % self.chunk == 0:
                self.crcs.append(f"{self._crc:08x}")
                self._crc = 0
        return self.f.write(b)

    def chunks(self) -> list[str]:
        return self.crcs + ([f"{self._crc:08x}"] if self.n % self.chunk else [])


def save_npy(path: str, arr: np.ndarray, chunk: int = CHUNK_BYTES) -> tuple[str, int, list[str]]:
    """``np.save`` to ``path`` atomically; returns (sha256 hex, bytes, crc32 of each ``chunk`` bytes).
    A failed write (a full disk) leaves no temporary file behind."""
    with files.atomic(path, arr.nbytes) as f:
        hf = _HashingFile(f, chunk)
        np.lib.format.write_array(hf, np.ascontiguousarray(arr), allow_pickle=False)
    return hf.h.hexdigest(), hf.n, hf.chunks()


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """Rows in the store's dtype as saved on disk: bfloat16 as its uint16 bit pattern."""
    x = np.asarray(x).astype(STORAGE[dtype], copy=False)
    return x.view(np.uint16) if dtype == "bfloat16" else x


def from_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """Rows as read from disk -> float32."""
    if dtype == "bfloat16":
        x = x.view(ml_dtypes.bfloat16)
    return np.asarray(x, dtype=np.float32)


def shard_name(split: str, site: str, k: int, process_index: int = 0, process_count: int = 1) -> str:
    """``<split>/<site>/<NNNNN>`` (one process) or ``<split>/<site>/p<PPP>-<NNNNN>`` (several)."""
    prefix = "" if process_count == 1 else f"p{process_index:03d}-"
    return f"{split}/{site}/{prefix}{k:05d}"


def write_shard(root: str, name: str, rows: np.ndarray, meta: np.ndarray, site: str, split: str) -> dict:
    """Write ``<name>.npy`` (rows, storage dtype) and ``<name>.meta.npy`` (int32 [n, 3]); the manifest entry."""
    if rows.shape[0] != meta.shape[0] or meta.ndim != 2 or meta.shape[1] != 3:
        raise StoreError(f"{name}: rows {rows.shape} and meta {meta.shape} do not match ([n, w] and [n, 3])")
    os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
    cb = CHUNK_BYTES
    sha, nbytes, chunks = save_npy(os.path.join(root, name + ".npy"), rows, cb)
    msha, mbytes, mchunks = save_npy(os.path.join(root, name + ".meta.npy"), meta.astype(np.int32, copy=False), cb)
    return {"site": site, "split": split, "file": name + ".npy", "meta": name + ".meta.npy",
            "rows": int(rows.shape[0]), "sha256": sha, "bytes": nbytes, "meta_sha256": msha, "meta_bytes": mbytes,
            "chunk_bytes": cb, "chunks": chunks, "meta_chunks": mchunks}


def remove_uncommitted(root: str, pattern: str, committed: set[str]) -> int:
    """Delete files under ``root`` matching ``pattern`` (relative glob) that no record lists, and
    temp files: what a killed writer left. Returns the number removed."""
    n = 0
    for path in glob.glob(os.path.join(root, pattern)):
        rel = os.path.relpath(path, root)
        if ".tmp-" in rel or rel not in committed:
            os.remove(path)
            n += 1
    return n


def write_store(path: str, arrays: dict, *, model: str, corpus: str = "", context_len: int = 0,
                context_start_id: int = 0, special_ids=(), dtype: str = "float32", shard_rows: int = 1 << 20,
                heldout_tokens: np.ndarray | None = None, heldout_contexts: np.ndarray | None = None,
                policy: dict | None = None, extra: dict | None = None, pairs=()) -> dict:
    """Write a whole store from in-memory arrays; returns the manifest.

    ``arrays[split][site] = (x [n, w] float, meta [n, 3] int)`` for split in ("train", "heldout").
    This is the route for activations computed elsewhere (docs/store.md); rows are written in the
    order given (shuffle them first if they are in corpus order). ``pairs`` ((in_site, out_site),
    ...): sites whose rows are aligned as given (row j of each is the same token); they need equal
    row counts per split and are recorded in the manifest, so the reader keeps them aligned.
    """
    from saejax.store.manifest import check_pairs
    if os.path.exists(os.path.join(path, "manifest.json")):
        raise StoreError(f"{path}/manifest.json exists; write a new store elsewhere")
    if dtype not in STORAGE:
        raise StoreError(f"dtype {dtype!r} is not one of {tuple(STORAGE)}")
    for pair in pairs:  # before anything is written
        for split, by_site in arrays.items():
            n = [len(by_site[s][0]) if s in by_site else None for s in pair]
            if len(pair) != 2 or None in n or n[0] != n[1]:
                raise StoreError(f"pair {tuple(pair)}: split {split} has rows {n}; paired sites need equal "
                                 f"row counts (and rows aligned)")
    os.makedirs(path, exist_ok=True)
    shards, sites = [], {}
    rows = {}
    for split, by_site in arrays.items():
        for site, (x, meta) in by_site.items():
            x = np.asarray(x)
            w = int(x.shape[1])
            s = sites.setdefault(site, {"width": w, "mean_sq_norm": 0.0, "median_norm": 0.0,
                                        "dropped": {"norm": 0}, "rows": {"train": 0, "heldout": 0}})
            if s["width"] != w:
                raise StoreError(f"site {site}: width {w} in split {split}, {s['width']} elsewhere")
            s["rows"][split] = int(x.shape[0])
            if split == "train" and len(x):
                norms = np.linalg.norm(from_storage(to_storage(x, dtype), dtype), axis=1)
                s["mean_sq_norm"] = float(np.mean(norms.astype(np.float64) ** 2))
                s["median_norm"] = float(np.median(norms))
            for k, i in enumerate(range(0, len(x), shard_rows)):
                name = shard_name(split, site, k)
                shards.append(write_shard(path, name, to_storage(x[i:i + shard_rows], dtype),
                                          np.asarray(meta[i:i + shard_rows]), site, split))
            rows[split] = rows.get(split, 0) + int(x.shape[0])
    if heldout_tokens is not None:
        os.makedirs(os.path.join(path, "heldout"), exist_ok=True)
        save_npy(os.path.join(path, "heldout", "tokens.npy"), np.asarray(heldout_tokens, np.int32))
        ctx = np.arange(len(heldout_tokens)) if heldout_contexts is None else heldout_contexts
        save_npy(os.path.join(path, "heldout", "contexts.npy"), np.asarray(ctx, np.int64))
    n_held = 0 if heldout_tokens is None else int(len(heldout_tokens))
    manifest = {
        "format": FORMAT, "model": model, "corpus": corpus, "context_len": int(context_len),
        "context_start_id": int(context_start_id), "special_ids": [int(i) for i in special_ids], "dtype": dtype,
        "policy": policy or {"skip_first": 0, "max_norm_ratio": 0.0},
        "splits": {"train": {"contexts": 0, "tokens": rows.get("train", 0)},
                   "heldout": {"contexts": n_held, "tokens": rows.get("heldout", 0)}},
        "sites": sites, "shards": shards, "complete": True, **(extra or {}),
        **({"pairs": [list(p) for p in pairs]} if pairs else {}),
    }
    check_pairs(manifest, os.path.join(path, "manifest.json"))
    write_json(os.path.join(path, "manifest.json"), manifest)
    return manifest
