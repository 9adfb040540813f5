"""Peak memory of training does not grow with the store: the same run on a store 1x and 4x as large.

    python benchmarks/train_memory.py                  # d=576, 131k vs 524k rows (0.3 vs 1.2 GB); ~2 min

Two float32 stores of one site are written with ``saejax.store.write_store`` (random rows), one
``--scale`` times the other. Each is trained from a fresh process for the same steps (a JumpReLU
SAE, width ``--width``, batches of ``--batch`` rows from the store reader, steps x batch <= the small
store's rows, so both runs read the same number of rows), and the process reports its peak resident
memory (``VmHWM`` of /proc/self/status, Linux: the high-water mark of its own address space;
``ru_maxrss`` would also count the parent's memory at fork time). Printed: both peaks and their ratio (1.0 when memory does not depend on the
store's size; a reader that loaded whole shards or stores would show up here).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

CHILD = r"""
import json, sys
import jax
from saejax import mesh as meshlib, store
from saejax.sae.group import GroupSpec
from saejax.train import loop, optim
path, width, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
src = store.open_store(path).reader(seed=0, split="train")
d = src.width(src.sites[0])
spec = GroupSpec(arch="jumprelu", sites=tuple(src.sites), d=d, width=width, sweep=(0.001,))
hp = optim.Hyper(total_steps=steps, batch_size=batch, lr=1e-3, lr_warmup=0, sparsity_warmup=0)
mesh = meshlib.make_mesh({"data": 1, "stack": 1, "latent": 1}, jax.devices()[:1])
state = loop.train_group(spec, hp, src, mesh, progress=False, log_every=steps)
jax.block_until_ready(state)
src.close()
hwm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
print(json.dumps({"peak_kib": hwm, "rows": src.store.n_rows(src.sites[0], "train")}))
"""


def write(path: str, rows: int, d: int, seed: int) -> None:
    from saejax.store import write_store
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, d), dtype=np.float32)
    meta = np.zeros((rows, 3), np.int32)
    held = rng.standard_normal((1024, d), dtype=np.float32)
    write_store(path, {"train": {"res.0": (x, meta)}, "heldout": {"res.0": (held, np.zeros((1024, 3), np.int32))}},
                model="random", shard_rows=1 << 16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--rows", type=int, default=1 << 17, help="rows of the small store")
    p.add_argument("--scale", type=int, default=4, help="the large store has scale x rows")
    p.add_argument("--width", type=int, default=2304)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--steps", type=int, default=50)
    a = p.parse_args()
    if a.steps * a.batch > a.rows:
        sys.exit("steps x batch must not exceed --rows (both runs should read the same rows)")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    peaks = {}
    with tempfile.TemporaryDirectory(prefix="saejax-train-memory-") as tmp:
        for name, rows in (("1x", a.rows), (f"{a.scale}x", a.rows * a.scale)):
            path = os.path.join(tmp, name)
            write(path, rows, a.d, seed=len(peaks))
            out = subprocess.run([sys.executable, "-c", CHILD, path, str(a.width), str(a.batch), str(a.steps)],
                                 capture_output=True, text=True, env=env, check=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            peaks[name] = rec["peak_kib"] / 2 ** 20
            print(f"store {name:>3}: {rec['rows']:>9,} rows ({rec['rows'] * a.d * 4 / 1e9:.2f} GB); "
                  f"{a.steps} steps of {a.batch} rows, width {a.width}: peak RSS {peaks[name]:.2f} GiB")
    small, large = peaks.values()
    print(f"peak RSS ratio, {a.scale}x store / 1x store: {large / small:.3f}  (1.0: memory does not grow with the store)")


if __name__ == "__main__":
    main()
