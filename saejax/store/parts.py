"""The harvest's part records: how each process commits its progress, and how the parts become the
store's manifest (docs/store.md, "Atomic writes and resuming").

``<store>/parts/<process>.json`` lists the process's committed shards, the batches it has done and
its running statistics; it is rewritten by temp file and rename after each chunk. A harvest resumes
at the smallest committed batch over all processes; when every part is done, process 0 merges them
into ``manifest.json``. ``parts/<process>.lock`` keeps two harvests from writing one process's files.

Imports no jax.
"""
from __future__ import annotations

import os

from saejax.store.manifest import FORMAT, SPLITS, StoreError, read_json, write_json

PART_DIR = "parts"


def part_path(root: str, process: int) -> str:
    return os.path.join(root, PART_DIR, f"{process}.json")


def lock(root: str, process: int):
    """Create ``parts/`` and hold an exclusive flock on ``parts/<process>.lock`` for the block
    (``saejax.workdir.locked``): two harvests writing one process's shards would delete each
    other's files. The lock lives in the store, which may be written outside any workdir."""
    from saejax import workdir
    return workdir.locked(os.path.join(root, PART_DIR, f"{process}.lock"),
                        f"another harvest is writing this store (process {process})")


def remove_temp_files(root: str, process: int) -> None:
    """Delete the temporary files a killed harvest left outside the shard folders (those are
    ``writer.remove_uncommitted``'s): this process's part record's, and on process 0 the manifest's
    and the held-out tokens'. Call with this process's lock held."""
    import glob
    pats = [os.path.join(root, PART_DIR, f"{process}.json.tmp-*")]
    if process == 0:
        pats += [os.path.join(root, "manifest.json.tmp-*"), os.path.join(root, "heldout", "*.tmp-*")]
    for pat in pats:
        for f in glob.glob(pat):
            os.remove(f)


def load_part(path: str, fingerprint: dict, sites) -> dict:
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


def commit(path: str, process: int, fingerprint: dict, batches_done: int, done: bool, shards: list,
           live: dict) -> None:
    """Rewrite the part record at ``path`` (temp file and rename); ``live`` holds the running
    statistics (median_norm, stats, splits)."""
    write_json(path, {"process": process, "fingerprint": fingerprint, "batches_done": batches_done,
                      "done": done, "shards": shards, **live})


def resume_point(root: str, process_count: int) -> int:
    """The smallest committed batch over all processes (0 when none has a part)."""
    done = []
    for q in range(process_count):
        f = part_path(root, q)
        done.append(read_json(f)["batches_done"] if os.path.isfile(f) else 0)
    return min(done)


def finished_parts(root: str, process_count: int, fingerprint: dict) -> list[dict]:
    """Every process's part record; StoreError naming the first one not done with this harvest."""
    parts = [read_json(part_path(root, q)) for q in range(process_count)]
    for q, part in enumerate(parts):
        if not part.get("done") or part["fingerprint"] != fingerprint:
            raise StoreError(f"{root}/{PART_DIR}/{q}.json: process {q} has not finished this harvest")
    return parts


def merge(parts: list[dict], config, model, plan, special, fingerprint: dict) -> dict:
    """The store's manifest (docs/store.md) from the finished parts: statistics summed over the
    processes (the median is the same on every process), shards listed in process order."""
    h = config.harvest
    median = parts[0]["median_norm"] or {s: 0.0 for s in plan.sites}
    sites = {}
    for s in plan.sites:
        st = [part["stats"][s] for part in parts]
        n_train = sum(x["rows"]["train"] for x in st)
        sites[s] = {"width": plan.widths[s],
                    "mean_sq_norm": sum(x["sum_sq"] for x in st) / n_train if n_train else 0.0,
                    "median_norm": median[s],
                    "dropped": {k: sum(x["dropped"][k] for x in st) for k in ("norm", "special")},
                    "rows": {sp: sum(x["rows"][sp] for x in st) for sp in SPLITS}}
    return {
        "format": FORMAT, "model": model.name, "model_source": config.model.source,
        "corpus": config.data.corpus, "context_len": plan.L,
        "context_start_id": int(model.context_start_id),
        "special_ids": [int(i) for i in special], "dtype": h.dtype,
        "policy": {"skip_first": h.skip_first, "max_norm_ratio": h.max_norm_ratio},
        "splits": {sp: {k: sum(part["splits"][sp][k] for part in parts) for k in ("contexts", "tokens")}
                   for sp in SPLITS},
        "sites": sites,
        "shards": [sh for part in parts for sh in part["shards"]],
        "complete": True, "processes": plan.pc, "seed": config.seed, "harvest": fingerprint,
        **({"pairs": plan.pairs} if plan.pairs else {}),
    }
