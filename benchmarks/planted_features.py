"""How well each SAE variant recovers planted features (synthetic data, CPU, one run).

    python benchmarks/planted_features.py                # the table in docs/sae.md, ~10 min alone on 2 CPU cores
    python benchmarks/planted_features.py --adam-memory  # why: the decoder's effective Adam step, ~1 min

Data: saejax.data.synthetic (512 unit directions in d=64, each row a non-negative mix of 4 with
Zipf-like frequencies, noise 0.01), normalized to E||x||^2 = 1. A planted direction counts as
recovered when some decoder row has cosine > 0.9 with it. L0 and FVU are measured on 8,192
held-out rows (BatchTopK at inference: its global threshold).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from saejax.data.synthetic import SyntheticSource
from saejax.sae.group import GroupSpec, SAEGroup
from saejax.train import optim
from saejax.train.step import init_state, losses, make_train_step

EVAL_STEP = 2 ** 30  # a step index training never reaches


def recovery(w_dec: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Best-match cosine of each planted direction [n, d] against the decoder rows [M, d]."""
    w = w_dec / np.maximum(np.linalg.norm(w_dec, axis=-1, keepdims=True), 1e-12)
    return np.max(features @ w.T, axis=1)


def evaluate(spec, state, source, site=0, member=0, rows=8192):
    """{recovered, median_cos, l0, fvu, dead} of SAE (site, member) of a trained group state."""
    s = spec.sites[site]
    x = source.batch(spec.sites, EVAL_STEP, rows) * np.asarray(
        [source.norm_scale(t) for t in spec.sites], np.float32)[:, None, None]
    _, f, x_hat = SAEGroup(spec).apply({"params": state["params"]}, jnp.asarray(x), state["bt_threshold"], False)
    f, x_hat = np.asarray(f[site, member]), np.asarray(x_hat[site, member])
    xs = x[site]
    fvu = np.sum((xs - x_hat) ** 2) / np.sum((xs - xs.mean(0)) ** 2)
    cos = recovery(np.asarray(state["params"]["W_dec"][site, member]), source.features(s))
    return {"recovered": float(np.mean(cos > 0.9)), "median_cos": float(np.median(cos)),
            "l0": float(np.mean(np.sum(f > 0, -1))), "fvu": float(fvu),
            "dead": float(np.mean(~np.any(f > 0, 0)))}


def train(spec: GroupSpec, hp: optim.Hyper, source: SyntheticSource, seed=0, log_every=0):
    """Train a group for hp.total_steps on ``source``; return the final state."""
    scales = np.asarray([source.norm_scale(t) for t in spec.sites], np.float32)[:, None, None]
    state = jax.jit(lambda k: init_state(spec, hp, k))(jax.random.key(seed))
    step = jax.jit(make_train_step(spec, hp), donate_argnums=0)
    for i in range(hp.total_steps):
        state, m = step(state, jnp.asarray(source.batch(spec.sites, i, hp.batch_size) * scales))
        if log_every and (i + 1) % log_every == 0:
            m = jax.device_get(m)
            print(f"  step {i + 1}: L0 {np.ravel(m['l0'])} FVU {np.round(np.ravel(m['fvu']), 3)} "
                  f"lam {np.ravel(m['lam'])}", flush=True)
    return state


def run(arch, sparsity, steps=2000, batch=1024, width=1024, lr=3e-3, seed=0, log_every=0, spec_kw=None, hp_kw=None):
    source = SyntheticSource(("res.0",), seed=seed)
    spec = GroupSpec(arch=arch, sites=("res.0",), d=64, width=width, sweep=(float(sparsity),), **(spec_kw or {}))
    hp_args = dict(total_steps=steps, batch_size=batch, lr=lr, lr_warmup=int(0.05 * steps),
                   sparsity_warmup=int(0.3 * steps), dead_steps=200)
    hp_args.update(hp_kw or {})
    hp = optim.Hyper(**hp_args)
    t0 = time.time()
    state = train(spec, hp, source, seed, log_every)
    out = evaluate(spec, state, source)
    out["seconds"] = time.time() - t0
    return out


# (name, arch, sparsity, GroupSpec overrides). Every run: d=64, width 1024, batch 1024, lr 3e-3 with
# 5% warmup, JumpReLU lambda 0.01 warmed up over 30% of the run, seed 0.
D_OVER_M = 64 / 1024
VARIANTS = [
    ("topk k=4", "topk", 4, {}),
    ("jumprelu Gemma Scope (log theta)", "jumprelu", 0.01, {}),
    ("jumprelu raw theta", "jumprelu", 0.01, {"threshold_param": "raw"}),
    ("jumprelu log, theta from data (L0 16)", "jumprelu", 0.01, {"threshold_init_l0": 16}),
    ("jumprelu log, W_enc = d/M W_dec^T (the fix)", "jumprelu", 0.01, {"encoder_init_scale": D_OVER_M}),
    ("jumprelu raw, W_enc = d/M W_dec^T", "jumprelu", 0.01,
     {"threshold_param": "raw", "encoder_init_scale": D_OVER_M}),
]


def adam_memory(spec_kw=None, steps=400, lr=1e-3, at=(0, 20, 50, 100, 200, 399)):
    """Print, at steps ``at``: L0, FVU, rms of the W_dec gradient and of Adam's sqrt(v_hat), and their
    ratio (the decoder's effective step as a fraction of lr under b1 = 0)."""
    source = SyntheticSource(("res.0",))
    spec = GroupSpec(arch="jumprelu", sites=("res.0",), d=64, width=1024, sweep=(0.01,), **(spec_kw or {}))
    hp = optim.Hyper(total_steps=1000, batch_size=1024, lr=lr, lr_warmup=50, sparsity_warmup=300, dead_steps=200)
    scale = source.norm_scale("res.0")
    state, step = init_state(spec, hp, jax.random.key(0)), jax.jit(make_train_step(spec, hp))
    grad = jax.jit(lambda p, st, x: jax.grad(lambda q: losses(spec, hp, q, st, x), has_aux=True)(p))
    print(f"{spec_kw or 'Gemma Scope init'}\n{'step':>5s} {'L0':>6s} {'FVU':>7s} {'|g| rms':>8s} {'sqrt(v) rms':>11s} {'ratio':>6s}")
    for i in range(steps):
        x = jnp.asarray(source.batch(spec.sites, i, 1024) * scale)
        if i in at:
            g, out = grad(state["params"], state, x)
            g = float(jnp.sqrt(jnp.mean(g["W_dec"] ** 2)))
            nu = state["opt_state"][0].nu["W_dec"]
            v = float(jnp.sqrt(jnp.mean(nu) / max(1 - hp.b2 ** i, 1e-12))) if i else float("nan")
            print(f"{i:5d} {float(out['l0'][0, 0]):6.1f} {float(out['fvu'][0, 0]):7.3f} {g:8.1e} {v:11.1e} {g / v:6.3f}")
        state, _ = step(state, x)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--only", default="", help="comma-separated row numbers (0-based) to run")
    ap.add_argument("--adam-memory", action="store_true",
                    help="instead: the decoder's effective Adam step, Gemma Scope init vs W_enc = d/M W_dec^T")
    args = ap.parse_args()
    if args.adam_memory:
        for kw in ({"threshold_param": "raw"}, {"threshold_param": "raw", "encoder_init_scale": D_OVER_M}):
            adam_memory(kw)
        return
    rows = [VARIANTS[int(i)] for i in args.only.split(",")] if args.only else VARIANTS
    print(f"{'variant':52s} {'recovered':>9s} {'med cos':>7s} {'L0':>6s} {'FVU':>6s} {'dead':>5s} {'sec':>5s}")
    for name, arch, sparsity, kw in rows:
        r = run(arch, sparsity, steps=args.steps, lr=args.lr, spec_kw=kw)
        print(f"{name:52s} {r['recovered']:9.3f} {r['median_cos']:7.3f} {r['l0']:6.2f} {r['fvu']:6.3f} "
              f"{r['dead']:5.2f} {r['seconds']:5.0f}", flush=True)


if __name__ == "__main__":
    main()
