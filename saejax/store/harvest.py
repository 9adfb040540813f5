"""``saejax harvest``: run the model over the corpus and write every site's activations to the store.

This module is the harvest loop; the plan is plan.py's, the part records and the manifest merge are
parts.py's. The plan (all of it a function of the config, so that a resumed or multi-process
harvest agrees):
  contexts   i = 0, 1, ... of the corpus (saejax.data.corpus), L = data.context_len tokens each;
             i < H = data.heldout_contexts are the held-out split, the rest train. With
             max_tokens > 0 the train split stops after ceil(max_tokens / (L - 1 - skip_first))
             contexts.
  tokens     the contexts are tokenized once, by process 0, into the token folder
             (saejax.data.tokens, <workdir>/tokens) before the loop, and read from there: by a
             resume, by another harvest of the same corpus and tokenizer, and by the other processes.
  batches    global batch b holds contexts [b*Bc, (b+1)*Bc), Bc = harvest.batch_contexts, sharded
             over the mesh's "data" axis; process p feeds (and keeps) the rows its devices hold.
  rows       position t of context i is stored for site s iff t >= 1 + skip_first, the token is
             not one of model.special_ids (EOS, pad), and, when max_norm_ratio r > 0,
             ||a_s[i, t]|| <= r * median_s, median_s being the median norm of the eligible rows of
             batch 0 (the calibration batch; the same on every process). Sites joined by
             harvest.pairs keep a row only if every one of them keeps it.
  chunks     K batches, K = max(1, shuffle_bytes // (local contexts * (L - 1) * max width * itemsize)):
             each process buffers a chunk's rows per (split, site), shuffles them
             (rng [seed, process, chunk, split, site], paired sites all with their key site's
             index) and writes them as shards of at most shard_bytes (paired sites: the smallest
             row count of the group), then commits: rewrites parts/<process>.json (shards + batches done +
             statistics) by temp file and rename.
  resume     restart at the smallest committed batch over all processes; a process skips writing
             the batches it had already committed, and deletes its shard files no part lists.
  finish     every process marks its part done; after a barrier, process 0 writes heldout/tokens.npy,
             heldout/contexts.npy and merges the parts into manifest.json, the store's commit record.
"""
from __future__ import annotations

import copy
import glob
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from saejax import config as cfg
from saejax import workdir as wd
from saejax.data import corpus as corpus_mod
from saejax.log import log, progress as progress_bar
from saejax.preempt import EXIT_PREEMPTED, Preempted, PreemptionWatch
from saejax.store import parts
from saejax.store.manifest import SPLITS, local_path, read_json, write_json
from saejax.store.plan import Plan, contexts, corpus_files, count_contexts, fmt_bytes, print_plan
from saejax.store.writer import STORAGE, remove_uncommitted, save_npy, shard_name, to_storage, write_shard
from saejax.tracking import Tracker

last_run: dict = {}  # timing of the latest harvest in this process (benchmarks/store_io.py reads it)


def is_complete(config) -> bool:
    """Whether ``<workdir>/store/manifest.json`` records a finished harvest."""
    p = wd.manifest_path(config)
    return os.path.isfile(p) and bool(read_json(p).get("complete"))


def _crash_hook(point: str) -> None:
    """Tests: ``SAEJAX_HARVEST_CRASH=<point>`` kills the process (SIGKILL) when it reaches ``point``;
    ``SAEJAX_HARVEST_CRASH=term:<point>`` sends it SIGTERM there instead."""
    want = os.environ.get("SAEJAX_HARVEST_CRASH", "")
    if want == point:
        os.kill(os.getpid(), signal.SIGKILL)
    if want == f"term:{point}":
        os.kill(os.getpid(), signal.SIGTERM)


def _barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Wait until every process gets here: the coordination service's barrier with a long timeout,
    not a device collective (why: docs/store.md, "Multi-host")."""
    from jax._src import distributed  # no public handle on the client in jax 0.10
    client = distributed.global_state.client
    if client is None:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
    else:
        client.wait_at_barrier(name, timeout_in_ms=int(timeout_s * 1000))


def run(config, dry_run: bool = False, max_tokens: int | None = None, model=None) -> dict | None:
    """Harvest ``config``'s sites into ``<workdir>/store`` (see module doc). ``model`` overrides loading."""
    import jax
    from saejax import models
    if model is None:
        if dry_run and corpus_files(config) is None:  # a streamed corpus: nothing to tokenize, shapes suffice
            model = models.load_shape(config.model.source)
        else:
            model = models.load(config.model.source, dtype=config.model.dtype)
    pc, pi = jax.process_count(), jax.process_index()
    if dry_run:
        pc = _target_processes(config, jax.device_count(), pc)
    plan = Plan(config, model, max_tokens, pc)
    if dry_run:
        out = print_plan(config, model, plan)
        plan.check_host_memory(config)  # after the plan is printed; before anything runs
        return out
    plan.check_host_memory(config)
    root = local_path(wd.store_dir(config))
    if is_complete(config):
        print(f"saejax harvest: {root}/manifest.json is complete; nothing to do", file=sys.stderr)
        return read_json(wd.manifest_path(config))
    open_tokens(config, model, plan, root, pi, pc)  # before any store write; the loop reads from it
    with parts.lock(root, pi):
        parts.remove_temp_files(root, pi)  # what a killed harvest left (its lock is ours now)
        watch = PreemptionWatch()
        try:
            return _Harvest(config, model, plan, root, pi, pc).run(watch)
        finally:
            watch.close()


def open_tokens(config, model, plan: Plan, root: str, pi: int, pc: int):
    """The corpus's contexts ``[0, plan.stop)`` tokenized once (``saejax.data.tokens``), opened for
    ``plan.contexts``: process 0 reuses or writes the token folder while the others wait for its
    word, then open what it wrote. A resume with another config is refused first (parts.load_part)."""
    from saejax.data import tokens as tokens_mod
    from saejax.store.plan import separator
    resuming = bool(glob.glob(os.path.join(root, parts.PART_DIR, "*.json")))
    if os.path.isfile(parts.part_path(root, pi)):
        parts.load_part(parts.part_path(root, pi), plan.fingerprint(config, model), plan.sites)
    args = (config, model, separator(model), plan.stop, resuming)
    if pc == 1:
        return tokens_mod.ensure(*args, say=log)
    key = "saejax-harvest-tokens"
    if pi == 0:
        try:
            tf = tokens_mod.ensure(*args, say=log)
        except BaseException as e:
            _share(key, "error: " + (str(e).splitlines() or [type(e).__name__])[0])
            raise
        _share(key, "ok")
        return tf
    word = _shared(key)
    if word != "ok":
        raise corpus_mod.CorpusError(f"process 0 could not tokenize the corpus: {word.removeprefix('error: ')}")
    tf = tokens_mod.read(wd.tokens_dir(config))
    if tf is None or not tf.covers(plan.stop):
        raise tokens_mod.TokensError(f"{wd.tokens_dir(config)}: process 0's tokens are not there; the work "
                                     f"directory must be one shared file system (docs/store.md, Multi-host)")
    tf.check(full=False)
    return tokens_mod.adopt(config, model, tf)


def _share(key: str, value: str) -> None:
    """Process 0 tells the others ``value`` (the coordination service's key-value store)."""
    from jax._src import distributed
    distributed.global_state.client.key_value_set(key, value, allow_overwrite=True)


def _shared(key: str, timeout_s: float = 24 * 3600.0) -> str:
    """What process 0 told under ``key``; waits for it (tokenizing a large corpus takes a while)."""
    from jax._src import distributed
    return distributed.global_state.client.blocking_key_value_get(key, int(timeout_s * 1000))


def _target_processes(config, devices: int, processes: int) -> int:
    """The dry run plans for the slice the config's mesh names when this machine has fewer devices:
    one process per host of mesh.target_chip (saejax/chips.py)."""
    from saejax.chips import CHIPS
    sizes = [config.mesh[a] for a in ("data", "stack", "latent")]
    n = -1 if -1 in sizes else int(np.prod(sizes))
    if n <= devices:
        return processes
    return max(1, n // CHIPS[config.mesh.target_chip].chips_per_host)


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
        self.fp = plan.fingerprint(config, model)
        self.part_path = parts.part_path(root, pi)
        part = parts.load_part(self.part_path, self.fp, plan.sites)
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
        self.bytes_written = 0  # committed shards' bytes, counted by the writer thread as it writes

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
        norm_ok = {s: norms[s][loc] <= h.max_norm_ratio * median[s] for s in p.sites} if h.max_norm_ratio > 0 else {}
        for s in p.sites:
            n = norms[s][loc]
            keep = eligible
            for t in (p.aligned[p.key[s]] if norm_ok else ()):  # paired sites: dropped if any drops it
                keep = keep & norm_ok[t]
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
        for (sp, s), batches in buffers.items():
            rows = np.concatenate([r for r, _ in batches])
            meta = np.concatenate([m for _, m in batches])
            if not len(rows):
                continue
            # aligned (paired) sites: the key site's permutation and the smallest shard of the group
            order = np.random.default_rng([self.config.seed, self.pi, chunk, SPLITS.index(sp),
                                           p.sites.index(p.key[s])]).permutation(len(rows))
            rows, meta = rows[order], meta[order]
            per = min(max(1, p.shard_bytes // (p.widths[t] * p.itemsize)) for t in p.aligned[p.key[s]])
            for i in range(0, len(rows), per):
                k = counts.get((sp, s), 0)
                counts[(sp, s)] = k + 1
                name = shard_name(sp, s, k, self.pi, self.pc)
                new.append(write_shard(self.root, name, to_storage(rows[i:i + per], self.h.dtype),
                                       meta[i:i + per], s, sp))
                written += new[-1]["bytes"] + new[-1]["meta_bytes"]
                self.bytes_written += new[-1]["bytes"] + new[-1]["meta_bytes"]  # read by the progress line
                _crash_hook(f"shard:{chunk}")
        self.shards = self.shards + new
        parts.commit(self.part_path, self.pi, self.fp, batches_done, False, self.shards, snapshot)
        _crash_hook(f"commit:{chunk}")
        return written

    def _submit(self, *args):
        if self.pending is not None:
            self.pending.result()
        self.pending = self.pool.submit(self._flush, *args)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, watch) -> dict | None:
        """Harvest to the end; on preemption (``watch``) stop after the next committed chunk."""
        self.bar = None
        try:
            with Tracker(self.config, "harvest") as self.tracker:
                return self._run(watch)
        finally:
            if self.bar is not None:  # end the progress, so an error or notice starts on its own line
                self.bar.close()

    def _run(self, watch) -> dict | None:
        import jax
        p = self.plan
        start = parts.resume_point(self.root, self.pc)
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
        total_ctx = stop if stop is not None else count_contexts(self.config, self.model, 2 ** 27)  # for the ETA
        per_ctx = p.L - 1
        self.bar = progress_bar(total_ctx * per_ctx if total_ctx else None, "harvest", unit="tok", unit_scale=True,
                                initial=start * p.Bc * per_ctx)
        self.tracker.begin(start * p.Bc * per_ctx)
        ctx_iter = contexts(self.config, self.model, start * p.Bc, stop)
        buffers: dict = {}
        b = start
        prev = None
        exhausted = False
        preempt = False
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
                self.bar.update(int((pctx >= 0).sum()) * per_ctx, written=fmt_bytes(self.bytes_written))
                preempt = watch.reached(pb + 1) or preempt  # every process calls it at every batch
                if (pb + 1) % p.K == 0 or cur is None:
                    if pb >= own_done:
                        snap = copy.deepcopy(self.live)
                        self._submit(pb // p.K, buffers, pb + 1, snap)
                    buffers = {}
                    if preempt and cur is not None:  # the chunk just submitted is the last one
                        if self.pending is not None:
                            self.pending.result()
                        self.pool.shutdown()
                        self.bar.close()
                        log(f"saejax harvest: preempted: batches up to {pb + 1} committed; "
                            f"exit {EXIT_PREEMPTED}, rerun the same command to resume")
                        raise Preempted(pb + 1)
                now = time.time()
                if now - last > 10 or cur is None:
                    last = now
                    self.tracker.scalars(self.bar.n, {"harvest/tokens": self.bar.n,
                                                      "harvest/tokens_per_s": done_tokens / max(now - t0, 1e-9),
                                                      "harvest/bytes_written": self.bytes_written})
            if cur is None:
                break
            prev = cur
            b += 1
        if self.pending is not None:
            self.pending.result()
        self.pool.shutdown()
        self.live["median_norm"] = median
        parts.commit(self.part_path, self.pi, self.fp, b, True, self.shards, self.live)
        t_end = time.time()
        last_run.update(tokens=done_tokens, seconds=t_end - t0, steady_tokens=done_tokens,
                        steady_seconds=t_end - t1)
        self.bar.update(0, written=fmt_bytes(self.bytes_written))
        self.bar.close()
        return self._finish()

    def _finish(self) -> dict | None:
        """Barrier, then process 0 writes the held-out tokens and the merged manifest."""
        if self.pc > 1:
            _barrier("saejax-harvest-parts-done")
        if self.pi != 0:
            return None
        p = self.plan
        done = parts.finished_parts(self.root, self.pc, self.fp)
        held = [(i, t) for i, t in contexts(self.config, self.model, 0, p.H)]
        os.makedirs(os.path.join(self.root, "heldout"), exist_ok=True)
        save_npy(os.path.join(self.root, "heldout", "tokens.npy"),
                 np.stack([t for _, t in held]) if held else np.zeros((0, p.L), np.int32))
        save_npy(os.path.join(self.root, "heldout", "contexts.npy"), np.asarray([i for i, _ in held], np.int64))
        manifest = parts.merge(done, self.config, self.model, p, self.special, self.fp)
        write_json(wd.manifest_path(self.config), manifest)
        print(f"saejax harvest: wrote {self.root}/manifest.json ({len(manifest['shards'])} shards, "
              f"{manifest['splits']['train']['tokens']:,} train tokens)", file=sys.stderr)
        return manifest
