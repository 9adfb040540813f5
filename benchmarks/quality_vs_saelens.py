"""saejax's JumpReLU against SAELens's on the same rows: held-out FVU at matched L0, dead latents.

    python benchmarks/quality_vs_saelens.py                      # layer 9: res/att/mlp; one SAELens run takes ~1 min on 2 cores (OMP_NUM_THREADS=1 under load: torch threads thrash)
    python benchmarks/quality_vs_saelens.py --all                # layers 3, 9, 15 (nine sites)
    python benchmarks/quality_vs_saelens.py --set sae.dead_nudge=0   # a saejax variant (config overrides)

Both train on exactly the same rows of the default store (`saejax run`'s, runs/default/store), each
site's rows normalized to E||x||^2 = 1 by the store's norm scale, with the same width (2,304), batch
(512), steps (400) and lr (1.5e-3, warmed up over the same 5% of the run, the sparsity coefficient
over the same 20%). saejax: experiments/default.py (its recipe, target L0s 30 and 60) with the
`--set` overrides. SAELens (the test extra; 6.54 measured): `JumpReLUTrainingSAE` with its own
initialization and loss ("step": mse + c * L0) and its own `SAETrainer` (Adam b1 0.9, gradient
clipping), at the L0 coefficients `--coeffs`; its runs are cached in `--cache` (JSON), so variants
of saejax reuse them. Both are measured on the store's held-out rows with their own inference
formula: L0, FVU = sum ||x - x_hat||^2 / sum ||x - mean x||^2, dead = never fires on those rows.

Per saejax SAE: `ratio` = saejax's FVU / SAELens's FVU at the same L0, interpolated linearly in
log L0 between the two SAELens runs that bracket it (`*`: outside the coefficients' L0 range,
extrapolated from the nearest two).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def heldout(source, sites):
    """Normalized held-out rows [T, N, d] (every held-out row of the smallest site)."""
    n = min(source.store.n_rows(s, "heldout") for s in sites)
    x = source.heldout_batch(sites, n)
    return x * np.asarray([source.norm_scale(s) for s in sites], np.float32)[:, None, None]


def metrics(x, f, x_hat):
    """{l0, fvu, dead} of one SAE: x [N, d], f [N, M], x_hat [N, d] (numpy)."""
    fvu = float(np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2))
    return {"l0": float(np.mean(np.sum(f > 0, -1))), "fvu": fvu, "dead": float(np.mean(~np.any(f > 0, 0)))}


def train_saejax(config, source, sites, x_held):
    """Train the config's group on ``sites``; metrics per (site, member) on x_held [T, N, d]."""
    import jax
    import jax.numpy as jnp

    from saejax import mesh as meshlib
    from saejax.sae.group import SAEGroup
    from saejax.train.loop import train_group
    from saejax.train.plan import plan_groups

    (spec, hp), = plan_groups(config, source)
    state = train_group(spec, hp, source, meshlib.make_mesh(config.mesh), seed=config.seed,
                        log_every=10 ** 9, progress=False)
    params = jax.device_get(state["params"])
    apply = jax.jit(lambda p, x: SAEGroup(spec).apply({"params": p}, x, None, False)[1:])
    fs, xh = [], []
    for i in range(0, x_held.shape[1], 1024):
        f, x_hat = apply(params, jnp.asarray(x_held[:, i:i + 1024]))
        fs.append(np.asarray(f > 0))
        xh.append(np.asarray(x_hat))
    f, x_hat = np.concatenate(fs, 2), np.concatenate(xh, 2)
    return {(site, k): metrics(x_held[t], f[t, k], x_hat[t, k])
            for t, site in enumerate(sites) for k in range(spec.K)}, hp


def train_saelens(source, site, scale, coeff, hp, width, x_held, seed=0):
    """SAELens's JumpReLU at L0 coefficient ``coeff`` on the rows saejax reads at each step."""
    import torch
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    d = x_held.shape[-1]
    sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        d_in=d, d_sae=width, dtype="float32", device="cpu", normalize_activations="none",
        l0_coefficient=coeff, l0_warm_up_steps=hp.sparsity_warmup))

    def rows():
        for step in range(hp.total_steps):
            yield torch.from_numpy(source.batch([site], step, hp.batch_size)[0] * scale)

    cfg = SAETrainerConfig(total_training_samples=hp.total_steps * hp.batch_size,
                           train_batch_size_samples=hp.batch_size, lr=hp.lr, lr_end=hp.lr, lr_warm_up_steps=hp.lr_warmup,
                           device="cpu")
    import contextlib
    import io
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
        sae = SAETrainer(cfg, sae, rows()).fit()
    sae.eval()
    with torch.no_grad():
        x = torch.from_numpy(x_held)
        f = sae.encode(x)
        x_hat = sae.decode(f)
    return metrics(x_held, f.numpy(), x_hat.numpy())


def interpolate(runs, l0):
    """SAELens FVU at ``l0`` from runs [(l0, fvu)], linear in log L0; (fvu, bracketed)."""
    pts = sorted(runs)
    if len({p[0] for p in pts}) < 2:
        raise SystemExit("SAELens's runs at --coeffs gave one L0: nothing to interpolate between")
    xs = np.log([p[0] for p in pts])
    ys = np.asarray([p[1] for p in pts])
    t = np.log(l0)
    inside = xs[0] <= t <= xs[-1]
    i = int(np.clip(np.searchsorted(xs, t) - 1, 0, len(xs) - 2))
    w = (t - xs[i]) / (xs[i + 1] - xs[i])
    return float(ys[i] + w * (ys[i + 1] - ys[i])), inside


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=os.path.join(ROOT, "runs/default/store"))
    p.add_argument("--layers", default="9", help="layers of the default store, e.g. 9 or 3+9+15")
    p.add_argument("--all", action="store_true", help="layers 3, 9 and 15")
    p.add_argument("--kinds", default="res+att+mlp")
    p.add_argument("--steps", type=int, default=0, help="train steps (0: the default config's 400)")
    p.add_argument("--coeffs", default="1e-4,2e-4,4e-4,8e-4,1.6e-3",
                   help="SAELens L0 coefficients; each SAE's L0 should fall between two of them ('': saejax only)")
    p.add_argument("--set", action="append", default=[], help="saejax config override key=value")
    p.add_argument("--cache", default="/tmp/saejax_quality_saelens.json")
    p.add_argument("--json", default="", help="also write the rows to this file")
    a = p.parse_args(argv)
    coeffs = [float(c) for c in a.coeffs.split(",") if c]
    if len(coeffs) == 1:
        p.error("--coeffs: give two or more SAELens L0 coefficients (to interpolate between) or '' (saejax only)")

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from saejax import config as cfg
    from saejax.sources import make_source
    from saejax.train.plan import plan_groups

    layers = (3, 9, 15) if a.all else cfg.layer_range(a.layers)
    kinds = tuple(a.kinds.split("+"))
    overrides = [f"workdir={os.path.dirname(os.path.abspath(a.store))}", f"harvest.layers={layers!r}",
                 f"harvest.kinds={kinds!r}"] + a.set
    if a.steps:
        overrides.append(f"train.tokens={a.steps * 512}")
    config = cfg.load(os.path.join(ROOT, "experiments/default.py:plain"), overrides)
    source = make_source(config)
    sites = list(source.sites)
    x_held = heldout(source, sites)
    (spec, hp), = plan_groups(config, source)

    t0 = time.time()
    ours, hp = train_saejax(config, source, sites, x_held)
    t_ours = time.time() - t0

    cache = json.load(open(a.cache)) if os.path.isfile(a.cache) else {}
    ident = hashlib.sha256(json.dumps(source.identity, sort_keys=True).encode()).hexdigest()[:16]
    theirs = {}
    t0 = time.time()
    for t, site in enumerate(sites):
        for c in coeffs:
            key = json.dumps([ident, site, c, hp.total_steps, hp.batch_size, hp.lr, hp.lr_warmup,
                              hp.sparsity_warmup, spec.width, config.seed])
            if key not in cache:
                cache[key] = train_saelens(source, site, source.norm_scale(site), c, hp, spec.width, x_held[t],
                                           config.seed)
                with open(a.cache + ".tmp", "w") as fh:
                    json.dump(cache, fh)
                os.replace(a.cache + ".tmp", a.cache)
            theirs[(site, c)] = cache[key]
    t_theirs = time.time() - t0

    print(f"saejax overrides: {' '.join(a.set) or '(default recipe)'}; {hp.total_steps} steps of "
          f"{hp.batch_size}, lr {hp.lr:g}, width {spec.width}; {x_held.shape[1]} held-out rows per site")
    if not coeffs:
        for site in sites:
            for k, target in enumerate(hp.target_l0 or spec.sweep):
                m = ours[(site, k)]
                print(f"{site:>7} {target:6g} L0 {m['l0']:6.1f} FVU {m['fvu']:6.3f} dead {m['dead']:6.1%}")
        print(f"saejax dead max {max(m['dead'] for m in ours.values()):.1%}; saejax {t_ours:.0f} s")
        return
    print(f"SAELens {__import__('sae_lens').__version__} JumpReLU at c = {a.coeffs}:")
    for site in sites:
        print(f"  {site:>7}  " + "  ".join(f"L0 {theirs[(site, c)]['l0']:5.1f} FVU {theirs[(site, c)]['fvu']:.3f}"
                                         f" dead {theirs[(site, c)]['dead']:4.0%}" for c in coeffs))
    print(f"{'site':>7} {'target':>6} {'L0':>6} {'FVU':>6} {'SL FVU':>7} {'ratio':>6} {'dead':>6} {'SL dead':>8}")
    rows = []
    for site in sites:
        for k, target in enumerate(hp.target_l0 or spec.sweep):
            m = ours[(site, k)]
            runs = [(theirs[(site, c)]["l0"], theirs[(site, c)]["fvu"]) for c in coeffs]
            sl_fvu, inside = interpolate(runs, m["l0"])
            # SAELens's dead fraction at the bracketing run nearest in L0
            near = min(coeffs, key=lambda c: abs(np.log(theirs[(site, c)]["l0"] / m["l0"])))
            row = {"site": site, "target": target, **m, "saelens_fvu": sl_fvu, "ratio": m["fvu"] / sl_fvu,
                   "bracketed": bool(inside), "saelens_dead": theirs[(site, near)]["dead"]}
            rows.append(row)
            print(f"{site:>7} {target:6g} {m['l0']:6.1f} {m['fvu']:6.3f} {sl_fvu:7.3f} {row['ratio']:5.3f}"
                  f"{' ' if inside else '*'} {m['dead']:6.1%} {row['saelens_dead']:8.1%}")
    r = np.asarray([row["ratio"] for row in rows])
    print(f"ratio: max {r.max():.3f}, mean {r.mean():.3f}; saejax dead max {max(x['dead'] for x in rows):.1%}; "
          f"saejax {t_ours:.0f} s, SAELens {t_theirs:.0f} s (uncached runs)")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"overrides": a.set, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
