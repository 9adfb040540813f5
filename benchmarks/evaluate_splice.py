"""Delta-LM-loss evaluation: all SAEs of a site in one N*B spliced pass vs one pass per SAE.

    python benchmarks/evaluate_splice.py [--model smollm2] [--site res.9] [--saes 4] [--contexts 4] [--len 128]

Both sides compute the same losses: clean, zero-ablated and K spliced SAEs (random JumpReLU SAEs of
width 4d; only the cost matters here). "one pass" is saejax.evaluate.splice (the layers before the
site run once for all K + 2 variants); "per SAE" runs K + 2 separate spliced forward passes of the
same contexts. Prints seconds per evaluation (after compilation, best of 3) and their ratio, and
the ratio of the one pass to a single clean forward.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from saejax import models
from saejax.evaluate import splice
from saejax.sae import apply


def best_of(fn, n=3):
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--site", default="res.9")
    p.add_argument("--saes", type=int, default=4)
    p.add_argument("--contexts", type=int, default=4)
    p.add_argument("--len", type=int, default=128)
    a = p.parse_args()
    model = models.load(a.model)
    d = model.site_width(a.site)
    K, M = a.saes, 4 * d
    r = np.random.default_rng(0)
    w = r.standard_normal((1, K, d, M)).astype(np.float32) / np.sqrt(d)
    arrays = {"W_enc": w, "W_dec": np.swapaxes(w, 2, 3).copy(), "b_enc": np.zeros((1, K, M), np.float32),
              "b_dec": np.zeros((1, K, d), np.float32), "threshold": np.full((1, K, M), 0.5, np.float32)}
    sae = {k: jnp.asarray(v) for k, v in arrays.items()}
    tokens = jnp.asarray(r.integers(3, model.config.vocab_size, (a.contexts, a.len)), jnp.int32)
    policy = splice.Policy(tuple(model.special_ids), 0)
    scale = jnp.float32(1.0)
    valid = jnp.ones(a.contexts, bool)

    one = splice.make_pass(model, a.site, "jumprelu", None, policy)
    t_one = best_of(lambda: one(model.params, sae, scale, tokens, valid))

    keep = splice.token_keep(tokens, policy)

    def single(k):  # one SAE, clean and ablation as plain spliced passes
        one_sae = {n: v[0, k] for n, v in sae.items()}
        return lambda act: jnp.where(keep[..., None], apply.decode(one_sae, apply.encode("jumprelu", one_sae, act)), act)

    fns = [model.forward_fn(splice={a.site: single(k)}) for k in range(K)]
    fns.append(model.forward_fn(splice={a.site: lambda act: jnp.where(keep[..., None], 0.0, act).astype(act.dtype)}))
    clean = model.forward_fn()
    fns.append(clean)

    def per_sae():
        return [f(model.params, tokens)[0].sum() for f in fns]

    t_per = best_of(per_sae)
    t_clean = best_of(lambda: clean(model.params, tokens)[0])
    print(f"{a.model} {a.site}: {K} SAEs of width {M}, {a.contexts} contexts x {a.len} tokens")
    print(f"  one N*B pass   {t_one:.3f} s")
    print(f"  per-SAE passes {t_per:.3f} s   ({K + 2} forward passes)")
    print(f"  clean forward  {t_clean:.3f} s")
    print(f"  speedup of one pass over per-SAE passes: {t_per / t_one:.2f}x; "
          f"one pass costs {t_one / t_clean:.2f} clean forwards for {K + 2} variants")


if __name__ == "__main__":
    main()
