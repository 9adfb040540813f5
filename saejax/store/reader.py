"""Reading a store: validation, verification, whole splits, and the shuffled training Source.

Order of the training stream. For one site, let the split's N rows be the concatenation of its
shards in manifest order, cut into ``n_b = ceil(N / block_rows)`` blocks of ``block_rows`` rows
(the last one shorter). Epoch ``e`` visits the blocks in the order
``perm_e = default_rng([seed, e, crc32(site)]).permutation(n_b)``, each block's rows in stored order
(they were shuffled within the harvest's buffer when written). Sites joined by the manifest's
``pairs`` use their key site's crc32 (``manifest.align_keys``): the same block order, so row i of
each is the same token. The stream is epoch 0, epoch 1, ...;
global step ``s`` with batch B takes stream rows ``[s*B, (s+1)*B)``, and process ``p`` of ``P``
takes the rows ``[s*B + p*B/P, s*B + (p+1)*B/P)``. So a batch is a pure function of
(seed, step, batch_size), a resumed run sees the data it would have seen, and each process reads
only its own rows.

Pooled sites (``sae.layer_groups``; ``pools``): a pool such as ``res.0-2`` of g member sites serves,
at step ``s`` with batch B, m = B/g rows of each member: row i of the global pooled batch is member
j = i // m's stream row ``s*m + i - j*m`` (each member's stream as above, read with batch m), times
that member's norm scale; so the pool's own norm scale is 1 and process ``p`` of ``P`` takes the pooled
rows ``[p*B/P, (p+1)*B/P)``. Its held-out batch is built the same way from each member's held-out rows
``[0, m)``. Rows are read from ``np.load(mmap_mode="r")`` views, so memory holds only the
batches in flight: the one returned plus ``prefetch`` ahead, computed in one background thread
when steps are asked for in order.

Checks. Opening a store checks the manifest (every listed path relative, inside the store after
resolving symbolic links, and listed once) and every shard's .npy header against it (shape, dtype,
meta rows = data rows; the headers are read by a thread pool, as a store on gcsfuse has thousands of
shards), so a bad store fails before training creates anything. Reading checks the crc32 of every
``chunk_bytes`` chunk of a shard file the first time a read touches it (in the prefetch thread, so
corruption is found during training without a pass over the store first); a store of format /1,
which has no chunk checksums, gets a full sha256 verify of each site when training first reads it.
"""
from __future__ import annotations

import os
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from saejax import config as cfg
from saejax.store.manifest import SPLITS, StoreError, align_keys, local_path, read_json, sha256_file, validate
from saejax.store.writer import STORAGE, crc, from_storage

HEADER_THREADS = 16  # .npy headers read at once when a store is opened


class Store:
    """An opened store (``open_store``); see docs/store.md."""

    def __init__(self, path: str, check_chunks: bool = True):
        self.path = path = local_path(path)
        mpath = os.path.join(path, "manifest.json")
        if not os.path.exists(mpath):
            raise StoreError(f"{mpath}: no such file (harvest not run, or not finished)")
        self.manifest = m = read_json(mpath)
        self.manifest_sha256 = sha256_file(mpath)  # the store's identity (a resumed run checks it)
        validate(m, mpath)
        self.dtype = m["dtype"]
        self.sites = list(m["sites"])
        self.pairs = [tuple(p) for p in m.get("pairs", [])]
        self.align_key = align_keys(self.sites, self.pairs)  # {site: the site whose block order it shares}
        self.model = m["model"]
        self._shards = {(site, split): [] for site in self.sites for split in SPLITS}
        for sh in m["shards"]:
            self._shards[(sh["site"], sh["split"])].append(sh)
        self.chunked = m["format"] != "saejax-store/1"
        self.check_reads = check_chunks  # False: no chunk checks (benchmarks/store_checks.py measures them)
        self._mmaps: dict[str, np.ndarray] = {}
        self._raw: dict[str, np.ndarray] = {}
        self._verified: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._offsets = self._check_headers(m["shards"])

    def _check_headers(self, shards) -> dict[str, int]:
        """Every shard file against the manifest, in parallel: inside the store once symbolic links
        are resolved, present, of its recorded size, and its .npy header (rows, width, dtype; meta
        [rows, 3] int32). Returns each file's data offset; StoreError naming the first bad file."""
        want_dtype = np.dtype(np.uint16 if self.dtype == "bfloat16" else STORAGE[self.dtype])
        mpath = os.path.join(self.path, "manifest.json")
        real_root = os.path.realpath(self.path)
        jobs = []
        for sh in shards:
            w = int(self.manifest["sites"][sh["site"]]["width"])
            jobs.append((sh["file"], (sh["rows"], w), want_dtype, sh["site"], sh.get("bytes")))
            jobs.append((sh["meta"], (sh["rows"], 3), np.dtype(np.int32), sh["site"], sh.get("meta_bytes")))

        def one(job):
            rel, shape, dtype, site, nbytes = job
            f = os.path.join(self.path, rel)
            real = os.path.realpath(f)
            if os.path.commonpath([real, real_root]) != real_root:
                raise StoreError(f"{mpath}: {rel} resolves outside the store (to {real})")
            if not os.path.isfile(f):
                raise StoreError(f"{f}: listed in the manifest but missing (site {site})")
            if nbytes is not None and os.path.getsize(f) != nbytes:
                raise StoreError(f"{f}: {os.path.getsize(f)} bytes, the manifest says {nbytes} (truncated or replaced)")
            try:
                with open(f, "rb") as fh:
                    version = np.lib.format.read_magic(fh)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                        else np.lib.format.read_array_header_2_0
                    got, fortran, got_dtype = read(fh)
                    offset = fh.tell()
            except (ValueError, OSError, EOFError) as e:
                raise StoreError(f"{f}: not a readable .npy file ({cfg.first_line(e)})") from None
            if tuple(got) != shape:
                raise StoreError(f"{f}: shape {tuple(got)}, the manifest implies {shape} (site {site}: "
                                 f"{shape[0]} rows of width {shape[1]})")
            if got_dtype != dtype or fortran:
                raise StoreError(f"{f}: dtype {got_dtype}{' (Fortran order)' if fortran else ''}, "
                                 f"the manifest implies {dtype} (site {site})")
            return rel, offset

        with ThreadPoolExecutor(max_workers=HEADER_THREADS) as pool:
            return dict(pool.map(one, jobs))

    def check_chunks(self, sh: dict, key: str, b0: int, b1: int) -> None:
        """Check the crc32 of the chunks of shard file ``sh[key]`` that bytes [b0, b1) lie in, each
        once per Store. StoreError naming the file and chunk on a mismatch."""
        if not (self.chunked and self.check_reads) or b1 <= b0:
            return
        rel, cb = sh[key], int(sh["chunk_bytes"])
        sums = sh["chunks" if key == "file" else "meta_chunks"]
        for c in range(b0 // cb, (b1 - 1) // cb + 1):
            if (rel, c) in self._verified:
                continue
            raw = self._open_raw(rel)
            if crc(raw[c * cb:(c + 1) * cb]) != sums[c]:
                raise StoreError(f"{os.path.join(self.path, rel)}: chunk {c} (bytes {c * cb}-"
                                 f"{min((c + 1) * cb, len(raw))}) does not match its checksum in the manifest "
                                 f"(corrupted; site {sh['site']}); `saejax` cannot train on it: re-harvest the store")
            with self._lock:
                self._verified.add((rel, c))

    def _open_raw(self, rel: str) -> np.ndarray:
        """The whole file as read-only uint8 memory (cached; shares pages with ``_open``'s map)."""
        with self._lock:
            a = self._raw.get(rel)
            if a is None:
                a = self._raw[rel] = np.memmap(os.path.join(self.path, rel), np.uint8, mode="r")
            return a

    def check_rows(self, sh: dict, key: str, r0: int, r1: int) -> None:
        """``check_chunks`` for rows [r0, r1) of shard ``sh``'s data (key "file") or meta file."""
        a = self._open(sh[key])
        row = a.dtype.itemsize * (a.shape[1] if a.ndim > 1 else 1)
        off = self._offsets[sh[key]]
        self.check_chunks(sh, key, off + r0 * row if r0 else 0, off + r1 * row)

    # -- identity and statistics ------------------------------------------------------------------
    def _site(self, site: str) -> dict:
        if site not in self.manifest["sites"]:
            raise StoreError(f"site {site!r} is not in the store {self.path} (it has {self.sites})")
        return self.manifest["sites"][site]

    def width(self, site: str) -> int:
        return int(self._site(site)["width"])

    def norm_scale(self, site: str) -> float:
        """1 / sqrt(mean squared norm of the site's train rows): scaled rows have E||x||^2 = 1."""
        msn = float(self._site(site)["mean_sq_norm"])
        if not msn > 0:
            raise StoreError(f"site {site}: mean_sq_norm is {msn} in {self.path}/manifest.json")
        return float(1.0 / np.sqrt(msn))

    def n_rows(self, site: str, split: str = "train") -> int:
        self._site(site)
        return sum(sh["rows"] for sh in self._shards[(site, split)])

    # -- checks -----------------------------------------------------------------------------------
    def verify(self, sites=None) -> None:
        """Check every shard (rows and meta) of ``sites`` (default all): header shape/dtype, size and
        sha256 against the manifest. StoreError naming the first bad file; nothing is written."""
        for site in sites or self.sites:
            w = self.width(site)
            for split in SPLITS:
                for sh in self._shards[(site, split)]:
                    for key, shape in (("file", (sh["rows"], w)), ("meta", (sh["rows"], 3))):
                        f = os.path.join(self.path, sh[key])
                        nb = sh.get("bytes" if key == "file" else "meta_bytes")
                        if nb is not None and os.path.getsize(f) != nb:
                            raise StoreError(f"{f}: {os.path.getsize(f)} bytes, the manifest says {nb} (site {site})")
                        want = sh["sha256"] if key == "file" else sh.get("meta_sha256")
                        if want is not None and sha256_file(f) != want:
                            raise StoreError(f"{f}: sha256 does not match the manifest (corrupted; site {site})")
                        a = self._open(sh[key])
                        if a.shape != shape:
                            raise StoreError(f"{f}: shape {a.shape}, the manifest implies {shape} (site {site})")
                        self.check_rows(sh, key, 0, sh["rows"])

    def _open(self, rel: str) -> np.ndarray:
        """The shard file as a read-only memory map (cached)."""
        with self._lock:
            a = self._mmaps.get(rel)
            if a is None:
                f = os.path.join(self.path, rel)
                try:
                    a = np.load(f, mmap_mode="r", allow_pickle=False)
                except (ValueError, OSError, EOFError) as e:
                    raise StoreError(f"{f}: not a readable .npy file ({e})") from None
                self._mmaps[rel] = a
            return a

    # -- whole splits -----------------------------------------------------------------------------
    def rows(self, site: str, split: str = "heldout") -> tuple[np.ndarray, np.ndarray]:
        """All rows of a split: (x [n, w] float32 raw, meta [n, 3] int32: token, context, position)."""
        w = self.width(site)
        if split not in SPLITS:
            raise StoreError(f"split {split!r} is not one of {SPLITS}")
        shards = self._shards[(site, split)]
        for sh in shards:
            self.check_rows(sh, "file", 0, sh["rows"])
            self.check_rows(sh, "meta", 0, sh["rows"])
        xs = [from_storage(np.asarray(self._open(sh["file"])), self.dtype) for sh in shards]
        ms = [np.asarray(self._open(sh["meta"]), np.int32) for sh in shards]
        x = np.concatenate(xs) if xs else np.zeros((0, w), np.float32)
        meta = np.concatenate(ms) if ms else np.zeros((0, 3), np.int32)
        return x, meta

    def heldout_tokens(self) -> np.ndarray:
        """int32 [n_contexts, context_len]: the held-out contexts' token ids, whole."""
        return self._small("heldout/tokens.npy")

    def heldout_contexts(self) -> np.ndarray:
        """int64 [n_contexts]: the held-out contexts' indices in the corpus."""
        return self._small("heldout/contexts.npy")

    def _small(self, rel):
        f = os.path.join(self.path, rel)
        if not os.path.isfile(f):
            raise StoreError(f"{f}: no such file")
        return np.load(f, allow_pickle=False)

    def reader(self, seed: int = 0, split: str = "train", block_rows: int = 4096, prefetch: int = 2,
               sites=None, pools=None) -> "Reader":
        """A training Source over ``split``; its ``sites`` are ``sites`` (default: every site of the store).
        ``pools`` ({name: member sites}): pooled sites the reader serves (module doc), named in ``sites``."""
        return Reader(self, seed, split, block_rows, prefetch, sites, pools)


class _SiteStream:
    """Where stream row r of one site lives: epoch, block order, and shard offsets."""

    def __init__(self, store: Store, site: str, split: str, seed: int, block_rows: int):
        self.store, self.site, self.seed, self.block_rows = store, site, seed, block_rows
        self.shards = store._shards[(site, split)]
        self.starts = np.cumsum([0] + [sh["rows"] for sh in self.shards])  # shard s holds rows [starts[s], starts[s+1])
        self.n = int(self.starts[-1])
        if self.n == 0:
            raise StoreError(f"site {site} has no {split} rows in {store.path}")
        self.n_blocks = -(-self.n // block_rows)
        self._epoch = None
        self.crc = zlib.crc32(store.align_key[site].encode())  # paired sites: one block order

    def _order(self, epoch: int):
        """(perm, cum): blocks of the epoch in visiting order and their cumulative row counts."""
        cached = self._epoch  # one read: the prefetch thread may replace it meanwhile
        if cached is None or cached[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch, self.crc]).permutation(self.n_blocks)
            sizes = np.minimum(self.block_rows, self.n - perm * self.block_rows)
            cached = (epoch, perm, np.concatenate([[0], np.cumsum(sizes)]))
            self._epoch = cached
        return cached[1:]

    def runs(self, r0: int, r1: int):
        """Contiguous runs (g0, g1) of stored rows (global index over shards) for stream rows [r0, r1)."""
        out = []
        r = r0
        while r < r1:
            epoch, o = divmod(r, self.n)
            perm, cum = self._order(epoch)
            j = int(np.searchsorted(cum, o, side="right")) - 1
            take = min(int(cum[j + 1]) - o, r1 - r)
            g0 = int(perm[j]) * self.block_rows + (o - int(cum[j]))
            out.append((g0, g0 + take))
            r += take
        return out

    def read(self, r0: int, r1: int, out: np.ndarray, key: str = "file") -> None:
        """Rows of stream [r0, r1) into ``out`` [r1 - r0, w] float32 (key "meta": their meta rows
        into int32 [r1 - r0, 3])."""
        i = 0
        for g0, g1 in self.runs(r0, r1):
            while g0 < g1:
                s = int(np.searchsorted(self.starts, g0, side="right")) - 1
                e = min(g1, int(self.starts[s + 1]))
                a = self.store._open(self.shards[s][key])
                lo = g0 - int(self.starts[s])
                self.store.check_rows(self.shards[s], key, lo, lo + e - g0)
                rows = a[lo:lo + e - g0]
                out[i:i + e - g0] = from_storage(rows, self.store.dtype) if key == "file" else rows
                i += e - g0
                g0 = e


class Reader:
    """A training Source over one split of a store (docs/architecture.md: Training sources)."""

    def __init__(self, store: Store, seed: int, split: str, block_rows: int, prefetch: int, sites=None,
                 pools=None):
        if split not in SPLITS:
            raise StoreError(f"split {split!r} is not one of {SPLITS}")
        if block_rows < 1 or prefetch < 0:
            raise StoreError(f"block_rows={block_rows} must be >= 1 and prefetch={prefetch} >= 0")
        self.store, self.seed, self.split, self.block_rows, self.prefetch = store, seed, split, block_rows, prefetch
        self.sites, self.model = store.sites if sites is None else list(sites), store.model
        self.identity = {"store_manifest_sha256": store.manifest_sha256}
        self.pools = {name: tuple(m) for name, m in (pools or {}).items()}  # {pooled site: its member sites}
        for name, members in self.pools.items():
            widths = {store.width(s) for s in members}  # a missing member: StoreError naming it
            if len(widths) != 1:
                raise StoreError(f"pooled site {name}: its sites {list(members)} have different widths {sorted(widths)}")
        self._streams: dict[str, _SiteStream] = {}
        self._pending: dict[tuple, object] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saejax-prefetch") if prefetch else None
        self._epochs_logged: dict[str, int] = {}
        self._stream_lock = threading.Lock()

    def width(self, site: str) -> int:
        return self.store.width(self.pools[site][0] if site in self.pools else site)

    def norm_scale(self, site: str) -> float:
        """A store site's ``Store.norm_scale``; 1 for a pooled site (its rows come normalized, each by its
        member site's scale)."""
        return 1.0 if site in self.pools else self.store.norm_scale(site)

    def _read(self, site: str, split: str, r0: int, r1: int, rows_per_step: int, out: np.ndarray,
              key: str = "file") -> None:
        """Stream rows [r0, r1) of ``site`` (of ``split``; ``rows_per_step`` the batch) into ``out``; a
        pooled site's rows [r0, r1) of the pooled stream (module doc), normalized per member."""
        if site not in self.pools:
            (self._stream(site) if split == self.split else self._heldout_stream(site)).read(r0, r1, out, key)
            return
        members = self.pools[site]
        m = rows_per_step // len(members)
        step, i0 = divmod(r0, rows_per_step)
        i1 = i0 + (r1 - r0)
        for j, member in enumerate(members):
            lo, hi = max(i0, j * m), min(i1, (j + 1) * m)
            if lo >= hi:
                continue
            part = out[lo - i0:hi - i0]
            base = step * m - j * m
            (self._stream(member) if split == self.split else self._heldout_stream(member)).read(
                base + lo, base + hi, part, key)
            if key == "file":
                part *= np.float32(self.store.norm_scale(member))

    def _heldout_stream(self, site: str) -> _SiteStream:
        return _SiteStream(self.store, site, "heldout", self.seed, self.block_rows)

    def _members(self, site: str) -> tuple:
        return self.pools.get(site, (site,))

    def _stream(self, site: str) -> _SiteStream:
        if site in self.pools:
            for member in self.pools[site]:
                self._stream(member)
            return None
        with self._stream_lock:
            if site not in self._streams:
                self.store._site(site)
                if not self.store.chunked:
                    n = sum(sh.get("bytes", 0) for sp in SPLITS for sh in self.store._shards[(site, sp)])
                    print(f"saejax store: {self.store.path} is a format /1 store without chunk checksums: "
                          f"verifying every shard of {site} ({n / 2 ** 30:.2f} GiB) before reading it",
                          file=sys.stderr, flush=True)
                    self.store.verify([site])
                self._streams[site] = _SiteStream(self.store, site, self.split, self.seed, self.block_rows)
            return self._streams[site]

    def _compute(self, sites: tuple, step: int, batch_size: int, pi: int, pc: int) -> np.ndarray:
        b = batch_size // pc
        w = {self.width(s) for s in sites}
        if len(w) != 1:
            raise StoreError(f"sites {list(sites)} have different widths {sorted(w)}; batch one width at a time")
        out = np.empty((len(sites), b, w.pop()), np.float32)
        for t, site in enumerate(sites):
            r0 = step * batch_size + pi * b
            self._read(site, self.split, r0, r0 + b, batch_size, out[t])
        return out

    def batch(self, sites, step: int, batch_size: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        """Raw rows [T, batch_size / process_count, w] float32 of this process, at ``step``."""
        sites = tuple(sites)
        if batch_size % process_count:
            raise StoreError(f"batch size {batch_size} does not split over {process_count} processes")
        for s in sites:
            if s in self.pools and batch_size % len(self.pools[s]):
                raise StoreError(f"batch size {batch_size} does not divide by the {len(self.pools[s])} sites of "
                                 f"pooled site {s} (train.batch_size)")
            self._stream(s)  # bad site: error here, in the caller's thread
        self._log_epochs(sites, step, batch_size)
        key = (sites, step, batch_size, process_index, process_count)
        fut = self._pending.pop(key, None)
        for k in [k for k in self._pending if k[1] < step or k[0] != sites or k[2:] != key[2:]]:
            self._pending.pop(k).cancel()
        x = fut.result() if fut is not None else self._compute(*key)
        if self._pool is not None:
            for ahead in range(step + 1, step + 1 + self.prefetch):
                k = (sites, ahead, batch_size, process_index, process_count)
                if k not in self._pending:
                    self._pending[k] = self._pool.submit(self._compute, *k)
        return x

    def heldout_batch(self, sites, batch_size: int, process_index: int = 0, process_count: int = 1):
        """Raw held-out rows [T, batch_size / process_count, w] of this process, the same at every
        call (training's quick evaluation); None when a site has no held-out rows. A site with fewer
        than ``batch_size`` held-out rows repeats them."""
        b = batch_size // process_count
        out = None
        for t, site in enumerate(sites):
            if any(self.store.n_rows(s, "heldout") == 0 for s in self._members(site)):
                return None
            if out is None:
                out = np.empty((len(sites), b, self.width(site)), np.float32)
            self._read(site, "heldout", process_index * b, (process_index + 1) * b, batch_size, out[t])
        return out

    def batch_meta(self, sites, step: int, batch_size: int, process_index: int = 0,
                   process_count: int = 1) -> np.ndarray:
        """int32 [T, batch_size / process_count, 3] (token, context, position) of the rows ``batch``
        returns for the same arguments (read directly, not prefetched)."""
        b = batch_size // process_count
        out = np.empty((len(sites), b, 3), np.int32)
        for t, site in enumerate(sites):
            r0 = step * batch_size + process_index * b
            self._read(site, self.split, r0, r0 + b, batch_size, out[t], "meta")
        return out

    def heldout_meta(self, sites, batch_size: int, process_index: int = 0, process_count: int = 1):
        """int32 [T, batch_size / process_count, 3]: the meta of ``heldout_batch``'s rows (or None)."""
        b = batch_size // process_count
        out = np.empty((len(sites), b, 3), np.int32)
        for t, site in enumerate(sites):
            if any(self.store.n_rows(s, "heldout") == 0 for s in self._members(site)):
                return None
            self._read(site, "heldout", process_index * b, (process_index + 1) * b, batch_size, out[t], "meta")
        return out

    def _log_epochs(self, sites, step: int, batch_size: int) -> None:
        """One stderr line per (epoch, step) at which some sites' streams enter a new epoch."""
        new = {}
        per_site = [(m, batch_size // len(self._members(s))) for s in sites for m in self._members(s)]
        for s, rows in per_site:  # a pool's members each give rows = B / g per step
            e = ((step + 1) * rows - 1) // self._stream(s).n
            if e > self._epochs_logged.get(s, 0):
                self._epochs_logged[s] = e
                new.setdefault(e, []).append(f"{s} ({self._stream(s).n} rows)")
        for e, names in sorted(new.items()):
            print(f"saejax store: epoch {e} begins at step {step} for {', '.join(names)}", file=sys.stderr)

    def close(self) -> None:
        if self._pool is not None:
            for f in self._pending.values():
                f.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True)
            self._pool = None


def open_store(path: str, check_chunks: bool = True) -> Store:
    """Open and validate a store (manifest fields and paths, listed files present, shard sizes and
    .npy headers); reads check chunk checksums unless ``check_chunks`` is False."""
    return Store(path, check_chunks)


def check_store(store: Store, config, sites=None, widths: dict | None = None, model_name: str | None = None) -> None:
    """Check that ``store`` fits the run: written from ``config.model.source`` (and by model
    ``model_name`` when given), holding every site of ``sites`` (default: the config's harvest
    sites) with train rows, at width ``widths[site]`` when given. StoreError naming the site or
    field, before anything compiles."""
    m = store.manifest
    want_source = config.model.source
    if "model_source" in m and m["model_source"] != want_source:
        raise StoreError(f"{store.path}: store written from model {m['model_source']!r} ({m['model']}), "
                         f"config model.source is {want_source!r}")
    if model_name is not None and m["model"] != model_name:
        raise StoreError(f"{store.path}: store written by model {m['model']!r}, not {model_name!r}")
    for site in sites if sites is not None else cfg.sites(config):
        if site not in m["sites"]:
            raise StoreError(f"site {site!r} is not in the store {store.path} (it has {store.sites})")
        if widths and site in widths and store.width(site) != widths[site]:
            raise StoreError(f"site {site}: width {store.width(site)} in the store {store.path}, "
                             f"{widths[site]} expected")
        if store.n_rows(site, "train") == 0:
            raise StoreError(f"site {site!r} has no train rows in {store.path}")
