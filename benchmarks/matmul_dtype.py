"""bfloat16 matmuls (train.matmul_dtype) against float32 on a default-store layer: FVU at the same L0.

    python benchmarks/matmul_dtype.py                                  # res.9 of runs/default/store
    python benchmarks/matmul_dtype.py --workdir /path/to/runs/default --site res.3 --steps 400

Trains the default run's group (experiments/default.py: JumpReLU, width 2304, L0 targets 30 and 60)
on one site of a harvested default store, once with float32 matmuls and once with bfloat16 matmul
inputs and float32 accumulation, from the same init and the same batches, and prints for each
member the held-out L0 and FVU (inference mode, the store's held-out split) and the relative FVU
difference, with the wall time per step of each run (one device; the machine's load is not
controlled: benchmarks/train_step.py --bf16 times the step alone).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import numpy as np

from saejax import config as cfg
from saejax import mesh as meshlib
from saejax.sources import make_source
from saejax.train.loop import train_group
from saejax.train.plan import plan_groups
from saejax.train.trainer import Trainer, norm_scales, to_host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs/default"), help="holds the default run's store/")
    p.add_argument("--site", default="res.9")
    p.add_argument("--steps", type=int, default=400, help="the default run's 400")
    a = p.parse_args()
    kind, layer = a.site.split(".")
    config = cfg.load(os.path.join(ROOT, "experiments/default.py"),
                      [f"workdir={a.workdir}", f"harvest.layers=({layer},)", f"harvest.kinds=('{kind}',)",
                       f"train.tokens={a.steps * 512}"])
    source = make_source(config)
    (spec, hp), = plan_groups(config, source)
    mesh = meshlib.make_mesh(dict(data=1, stack=1, latent=1), jax.devices()[:1])
    print(f"{spec.name} at {a.site}: {spec.K} SAEs, {hp.total_steps} steps of {hp.batch_size} rows")
    res = {}
    for dtype in ("float32", "bfloat16"):
        s = dataclasses.replace(spec, matmul_dtype=dtype)
        trainer = Trainer(s, hp, mesh, config.seed)
        t0 = time.perf_counter()
        state = train_group(s, hp, source, mesh, seed=config.seed, progress=False, trainer=trainer)
        jax.block_until_ready(state)
        sec = (time.perf_counter() - t0) / hp.total_steps
        held = trainer.put_batch(trainer.local_heldout(source, norm_scales(source, s.sites)))
        m = to_host(trainer.heldout_metrics(state, held))
        res[dtype] = m
        print(f"{dtype:9s}: {sec * 1e3:7.1f} ms/step  held-out L0 {np.round(m['heldout_l0'][0], 1).tolist()}  "
              f"FVU {np.round(m['heldout_fvu'][0], 4).tolist()}", flush=True)
    f32, bf = res["float32"], res["bfloat16"]
    for k, t in enumerate(config.sae.target_l0):
        fa, fb = float(f32["heldout_fvu"][0, k]), float(bf["heldout_fvu"][0, k])
        la, lb = float(f32["heldout_l0"][0, k]), float(bf["heldout_l0"][0, k])
        print(f"target L0 {t:g}: L0 {la:.1f} vs {lb:.1f} ({(lb - la) / la:+.1%}); FVU {fa:.4f} vs {fb:.4f}: "
              f"bf16 / fp32 - 1 = {(fb - fa) / fa:+.2%}  (target within 2%)")


if __name__ == "__main__":
    main()
