"""The CLT train step: sparse vs dense decoding, the optimizer's share, the fraction of the dense roofline.

    PYTHONPATH=$PWD JAX_PLATFORMS=cpu python benchmarks/clt_step.py [--shapes small,smollm2] [--rounds 2]
        [--matryoshka 0.125,0.25,0.5,1]

Per shape (L layers, M latents per layer, d = d_in = d_out, B rows, c active latents per row and
layer, TopK with k = c so nothing is over the cap): the median wall time of
  - the loss and gradient with dense decoding, and with sparse decoding,
  - the optimizer's update alone (Adam over every parameter, the decoder constraint),
with ``--matryoshka`` the same two for a Matryoshka CLT with those prefixes (fractions of M), as ratios
to the plain ones of the same run; and the dense gradient's fraction of its roofline: its matmul FLOPs (encoder 6 L B d M, decoder
6 B M d L(L+1)/2: forward plus both gradients) over the machine's measured matmul rate (one
[B, M] x [M, 4096] float32 matmul timed here, the same run). The CPU is shared: a note of the load
average is printed with the numbers.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from saejax.sae import clt
from saejax.train import optim

SHAPES = {  # name: (L, M, d, B, c)
    "small": (4, 512, 64, 256, 16),
    "smollm2": (30, 2304, 576, 64, 32),
}


def timeit(fn, *args, rounds):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def matmul_rate(B, M, rounds):
    a = jnp.ones((B, M), jnp.float32)
    b = jnp.ones((M, 4096), jnp.float32)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, precision="highest"))
    return 2 * B * M * 4096 / timeit(f, a, b, rounds=rounds)


def bench(name, rounds, c=None, opt=True, matryoshka=()):
    L, M, d, B, c0 = SHAPES[name]
    c = c or c0
    spec = clt.CLTSpec(arch="topk", layers=tuple(range(L)), d_in=d, d_out=d, width=M, sparsity=float(c))
    params = clt.init_params(spec, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (L, B, d))
    y = jax.random.normal(jax.random.key(2), (L, B, d))
    grad = {s: jax.jit(jax.grad(lambda p, s=s: clt.loss_terms(spec, p, x, y, 0.0, sparse=s)[0])) for s in (False, True)}
    t_dense = timeit(grad[False], params, rounds=rounds)
    t_sparse = timeit(grad[True], params, rounds=rounds)
    if matryoshka:
        from dataclasses import replace

        from saejax.sae import matryoshka as mat
        ms = replace(spec, matryoshka=mat.resolve(matryoshka, M))
        t = [timeit(jax.jit(jax.grad(lambda p, s=s: clt.loss_terms(ms, p, x, y, 0.0, sparse=s)[0])), params,
                    rounds=rounds) for s in (False, True)]
        print(f"{name}: Matryoshka prefixes {ms.matryoshka}: loss+grad dense {t[0]:.3f}s = {t[0] / t_dense:.2f}x plain, "
              f"sparse {t[1]:.3f}s = {t[1] / t_sparse:.2f}x plain")
    if not opt:
        print(f"{name}: L={L} M={M} d={d} B={B} c={c}: loss+grad dense {t_dense:.3f}s sparse {t_sparse:.3f}s "
              f"sparse/dense {t_sparse / t_dense:.3f}")
        return t_dense, t_sparse
    hp = optim.Hyper(total_steps=10, batch_size=B)
    tx = optim.optimizer(hp)
    opt = tx.init(params)
    g = grad[True](params)

    @jax.jit
    def update(p, o, g):
        g = dict(g, W_dec=clt.project_grad(g["W_dec"], p["W_dec"]))
        u, o = tx.update(g, o, p)
        new = jax.tree_util.tree_map(jnp.add, p, u)
        return dict(new, W_dec=clt.unit_concat(new["W_dec"])), o

    t_opt = timeit(update, params, opt, g, rounds=rounds)
    n_dec = M * d * L * (L + 1) // 2
    flops = 6 * L * B * d * M + 6 * B * n_dec
    rate = matmul_rate(B, M, rounds)
    best = "sparse" if t_sparse < t_dense else "dense"
    print(f"{name}: L={L} M={M} d={d} B={B} c={c}  decoder params {n_dec / 1e6:,.1f}M")
    print(f"  loss+grad dense {t_dense:.3f}s  sparse {t_sparse:.3f}s  sparse/dense {t_sparse / t_dense:.3f}  -> {best}")
    print(f"  optimizer (Adam + decoder constraint) {t_opt:.3f}s = {t_opt / (t_opt + min(t_dense, t_sparse)):.0%} "
          f"of the step with {best} decoding")
    print(f"  dense: {flops / 1e9:.1f} GFLOP at {rate / 1e9:.1f} GFLOP/s measured -> "
          f"{flops / rate / t_dense:.2f} of the dense roofline")
    return t_dense, t_sparse


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="small,smollm2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--caps", default="", help="also time sparse vs dense at these caps c (comma-separated), "
                                                "to find the crossover")
    ap.add_argument("--matryoshka", default="", help="also time a Matryoshka CLT with these prefixes "
                                                     "(fractions of M ending at 1)")
    args = ap.parse_args()
    mat = tuple(float(v) for v in filter(None, args.matryoshka.split(",")))
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, load average {os.getloadavg()}")
    for name in args.shapes.split(","):
        bench(name, args.rounds, matryoshka=mat)
        for c in filter(None, args.caps.split(",")):
            bench(name, args.rounds, int(c), opt=False)


if __name__ == "__main__":
    main()
