"""Projected step time of the Gemma Scope configs on a TPU slice, from the compiled step (nothing runs).

    python benchmarks/scale_model.py                       # Gemma 2 2B 16k, 65k; 9B 16k, 131k on v5p-128
    python benchmarks/scale_model.py --chips 64 --chip v5p --matmul bf16 --plan auto

For each config and width: the groups the config plans (Gemma 2's built-in shapes, offline), each
group's mesh of ``--chips`` chips of ``--chip`` (``--plan auto``, the default: the planner's proposal
for each group alone, mesh.plan = "auto", saejax.train.cost.plan_meshes; ``--plan one``: the
planner's one mesh for every group of the job, saejax.train.cost.propose_padded), with idle slots
where the planner finds they pay (mesh.pad_sites = "auto"; ``--pad 0``: none), the real train step
compiled for each mesh on that many virtual CPU devices, and the cost model's projection:
the fraction of bf16 peak (useful work: the real sites') without overlap inside the step (compute + HBM + interconnect summed) and
with perfect overlap (their max), the host-read floor, and the limiting resource. These are
PROJECTIONS from public chip figures (saejax/chips.py), not measurements; Gemma Scope's 50.8% of
peak was measured on TPUv3. ``--matmul bf16`` trains with bf16 matmul inputs (the config key the
step uses for it when present, else ``train.matmul_precision=default``: one bf16 pass per matmul).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CASES = [("gemma2_2b.py", "16k"), ("gemma2_2b.py", "65k"), ("gemma2_9b.py", "16k"), ("gemma2_9b.py", "131k")]


def bf16_overrides(config) -> list[str]:
    """The override that trains with bf16 matmul inputs in this code's config."""
    for key in ("matmul_dtype", "compute_dtype"):
        if key in config.train:
            return [f"--config.train.{key}=bfloat16"]
    return ["--config.train.matmul_precision=default"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chips", type=int, default=64, help="chips in the slice (v5p-128 has 64)")
    p.add_argument("--chip", default="v5p")
    p.add_argument("--matmul", choices=("bf16", "config"), default="bf16")
    p.add_argument("--plan", choices=("auto", "one"), default="auto",
                   help="a mesh per group (mesh.plan=auto) or the one best mesh for every group")
    p.add_argument("--pad", default="auto", help="mesh.pad_sites: auto (the planner's idle slots), 0 or N")
    a = p.parse_args()

    from saejax import config as cfg, models
    from saejax.sources import PlannedSource
    from saejax.train import cost
    from saejax.train.plan import plan_groups

    chip = cost.chiplib.get(a.chip)
    print(f"PROJECTIONS on {a.chips} x {chip.name} from public figures ({chip.source}); nothing runs. "
          f"Gemma Scope's 50.8% of peak was measured on TPUv3.")
    for name, width in CASES:
        path = os.path.join(REPO, "experiments", name)
        over = [f"--config.mesh.target_chip={a.chip}", f"--config.mesh.data={a.chips}", "--config.mesh.stack=1",
                "--config.mesh.latent=1", "--config.mesh.plan=auto", f"--config.mesh.pad_sites={a.pad}"]
        config = cfg.load(f"{path}:width={width}", over)
        if a.matmul == "bf16":
            config = cfg.load(f"{path}:width={width}", over + bf16_overrides(config))
        model = models.load_shape(config.model.source)
        source = PlannedSource({s: int(model.site_width(s)) for s in cfg.sites(config)})
        plans = plan_groups(config, source)
        itemsize = cost.store_itemsize(config)
        processes = max(1, a.chips // chip.chips_per_host)
        if a.plan == "one":
            plans, best, _ = cost.propose_padded(plans, a.chips, chip, itemsize, processes, config.mesh.pad_sites)
            if best is None:
                print(f"{name}:{width}: no one mesh of {a.chips} chips fits every group")
                continue
            meshes = [best] * len(plans)
        else:
            try:
                plans, meshes = cost.plan_meshes(config, plans, a.chips, processes)
            except cost.PlanError as e:
                print(f"{name}:{width}: {e}")
                continue
        t0 = time.time()
        programs = cost.measure_groups(plans, meshes)
        print(f"\n{name}:width={width}  {'a mesh per group' if a.plan == 'auto' else 'one mesh'} (compiled on "
              f"{a.chips} virtual CPU devices in {time.time() - t0:.1f} s)")
        names = {f"[{spec.name}] projected": (sz, spec) for (spec, _), sz in zip(plans, meshes)}
        for line in cost.report(config, plans, meshes, programs):
            got = next((v for head, v in names.items() if line.startswith(head)), None)
            if got is not None:
                sizes, spec = got
                slots = f"{spec.n_sites} sites" + (f" + {spec.pad} idle slots" if spec.pad else "")
                print(f"  {line.split(' ')[0]} {slots}, mesh {sizes}")
            if "projected on" in line or "job peak" in line:
                print("  " + line)


if __name__ == "__main__":
    main()
