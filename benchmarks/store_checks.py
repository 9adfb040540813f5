"""The cost of the store's chunk checksums to training: steps/s with and without them.

    python benchmarks/store_checks.py              # 3 sites x 65,536 rows of width 576 (float16); ~3 min on 2 cores

A store shaped like the default run's (width 576, float16, 4 MiB checksum chunks) is written, and
`saejax train` trains one JumpReLU group on it (width 2,304, batch 512, the default's recipe) twice
per round: with the reader checking each chunk's crc32 the first time it reads it (the default) and
with the checks switched off. Every run starts from a fresh Store, so every chunk the run reads is
checked once, as in a real run's first epoch; one epoch of the store is one run. Rates are the
trainer's own tok/s lines after the first (which holds the compile); the median of each run counts,
the best run of each mode over ``--rounds`` interleaved rounds (the machine is shared).
Ratio: steps/s with checks / steps/s without (target >= 0.95), and the checks' own rate (GB/s of
crc32 over the chunks, from the same run's bytes and time).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time

import numpy as np

CONFIG = '''
from saejax import config as cfg
def get_config(arg=""):
    c = cfg.defaults()
    c.workdir = {workdir!r}
    c.model.source = "random:tiny-llama"
    c.harvest.layers, c.harvest.kinds = {layers!r}, ("res",)
    c.sae.widths = ({width},)
    c.sae.target_l0 = (30.0,)
    c.sae.threshold_param = "raw"
    c.sae.encoder_init_scale = {d} / {width}
    c.train.tokens = {tokens}
    c.train.batch_size = {batch}
    c.train.lr = 1.5e-3
    c.train.lr_warmup = 0.05
    c.train.sparsity_warmup = 0.2
    c.train.log_every = {log_every}
    c.train.checkpoint_every = 10 ** 9
    c.mesh.data = 1
    return c
'''


def write(path, sites, rows, d):
    from saejax.store import write_store
    rng = np.random.default_rng(0)
    arrays = {split: {s: (rng.standard_normal((n, d)).astype(np.float32), np.zeros((n, 3), np.int32))
                      for s in sites} for split, n in (("train", rows), ("heldout", 512))}
    write_store(path, arrays, model="bench", dtype="float16", shard_rows=rows // 4,
                heldout_tokens=np.zeros((1, 16), np.int32), extra={"model_source": "random:tiny-llama"})


def train_rate(spec, workdir, checks: bool) -> float:
    """Median tok/s of one `saejax train` run (in this process) after its first logging interval."""
    import shutil

    from saejax import cli
    from saejax.store import reader
    shutil.rmtree(os.path.join(workdir, "train"), ignore_errors=True)
    original = reader.Store.check_chunks
    if not checks:
        reader.Store.check_chunks = lambda self, *a, **k: None
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = cli.main(["train", "--config", spec])
    finally:
        reader.Store.check_chunks = original
    if rc != 0:
        sys.exit(err.getvalue())
    rates = [float(r.replace(",", "")) for r in re.findall(r"step \d+/\d+ ([\d,]+) tok/s", err.getvalue())]
    return float(np.median(rates[1:]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2 ** 16, help="train rows per site")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--width", type=int, default=2304)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        layers = tuple(range(args.sites))
        store = os.path.join(tmp, "store")
        write(store, [f"res.{i}" for i in layers], args.rows, args.d)
        steps = args.rows // args.batch
        spec = os.path.join(tmp, "bench.py")
        with open(spec, "w") as fh:
            fh.write(CONFIG.format(workdir=tmp, layers=layers, width=args.width, d=args.d, batch=args.batch,
                                   tokens=steps * args.batch, log_every=max(1, steps // 8)))
        from saejax.store import open_store
        st = open_store(store)
        t0 = time.perf_counter()
        nbytes = 0
        for sh in st.manifest["shards"]:
            st.check_rows(sh, "file", 0, sh["rows"])
            nbytes += sh["bytes"]
        crc_rate = nbytes / (time.perf_counter() - t0) / 1e9
        on, off = [], []
        for _ in range(args.rounds):
            on.append(train_rate(spec, tmp, True))
            off.append(train_rate(spec, tmp, False))
        print(f"store: {args.sites} sites x {args.rows:,} rows of width {args.d} (float16), "
              f"{nbytes / 2 ** 20:,.0f} MiB in 4 MiB chunks; one epoch = {steps} steps of {args.batch}")
        print(f"crc32 over every chunk (page cache warm): {crc_rate:.2f} GB/s")
        print(f"train tok/s with chunk checks:    {', '.join(f'{r:,.0f}' for r in on)}")
        print(f"train tok/s without chunk checks: {', '.join(f'{r:,.0f}' for r in off)}")
        print(f"ratio (best with / best without): {max(on) / max(off):.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
