"""Model forward throughput: JAX plain vs with site capture vs transformers (torch), and the roofline.

    python benchmarks/model_forward.py                       # SmolLM2 GGUF, B=4, L=128, ~1-2 min on 2 cores
    python benchmarks/model_forward.py --model random:tiny-llama --batch 8 --length 64 --no-torch
    python benchmarks/model_forward.py --family gemma3 --no-torch   # SmolLM2-sized random model of a family

Timed (fastest of --reps calls after one compile/warm-up call, ``block_until_ready`` each; the
JAX passes and the matmul are interleaved twice and the fastest kept):
  plain      jitted apply(params, tokens) -> logits
  capture    the same with every site captured (n_layers x {res, att, mlp}) besides the logits
  harvest    logits=False with every site captured (what the activation store runs)
  torch      transformers' model(tokens).logits on the same weights, batch and length
             (SmolLM2: AutoModelForCausalLM.from_pretrained(dir, gguf_file=...), float32)
  roofline   XLA float32 matmul [M, K] x [K, N] FLOP/s on this machine, same run
Model FLOPs/token = 2 * (matmul weights incl. lm head) + 4 * L * n_heads * head_dim * n_layers
(QK^T and PV over the full causal square, as computed). Printed ratios: capture / plain time
(target < 1.10), jax / torch tokens/s, achieved FLOP/s / matmul FLOP/s.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def timeit(fn, reps: int) -> float:
    """Fastest of reps calls of fn() after one warm-up call (seconds): on a machine shared with
    other processes the minimum is the least disturbed estimate."""
    import jax
    jax.block_until_ready(fn())
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return float(np.min(ts))


def model_flops_per_token(c, L: int) -> float:
    kv = c.n_kv_heads * c.head_dim
    per_layer = c.d_model * (c.att_width + 2 * kv) + c.att_width * c.d_model + 3 * c.d_model * c.ffn
    return 2.0 * (c.n_layers * per_layer + c.d_model * c.vocab_size) + 4.0 * L * c.att_width * c.n_layers


def smollm2_sized(family: str):
    """A Model of SmolLM2-135M's shape with deterministic random weights in ``family``."""
    from saejax.models import Model, ModelConfig, transformer
    from saejax.models.tokenizer import ByteTokenizer
    kw = dict(arch=family, n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536,
              vocab_size=49152, rms_eps=1e-5, rope_theta=100000.0, tie_embeddings=True)
    if family in ("gemma2", "gemma3"):
        kw.update(sliding_window=512, query_pre_attn_scalar=64.0,
                  sliding_layers=tuple(bool((i + 1) % (6 if family == "gemma3" else 2)) for i in range(30)))
    if family == "gemma3":
        kw.update(rope_theta=1_000_000.0, rope_local_theta=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0})
    cfg = ModelConfig(**kw)
    tok = ByteTokenizer(cfg.vocab_size)
    return Model(cfg, transformer.random_params(cfg), tok, tok.bos_id, tok.special_ids, f"random-smollm2-sized-{family}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--family", default=None, help="a random model of SmolLM2-135M's shape (30 layers, d 576, "
                    "9 heads on 3 kv heads of 64, F 1536, V 49152) in this family of saejax.models.config.FAMILIES "
                    "(Gemma 3: 5:1 sliding window 512 pattern, both RoPE bases); replaces --model")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from saejax import models

    if args.family:
        model = smollm2_sized(args.family)
    else:
        model = models.load(args.model)
    c, B, L = model.config, args.batch, args.length
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, c.vocab_size, (B, L)), jnp.int32)
    sites = tuple(f"{k}.{i}" for i in range(c.n_layers) for k in ("res", "att", "mlp"))
    p = model.params
    fns = {"plain": model.forward_fn(), "capture": model.forward_fn(sites),
           "harvest": model.forward_fn(sites, logits=False)}
    M, K, N = B * L, c.d_model, c.ffn
    a = jnp.asarray(np.random.default_rng(1).standard_normal((M, K)), jnp.float32)
    b = jnp.asarray(np.random.default_rng(2).standard_normal((K, N)), jnp.float32)
    mm = jax.jit(jnp.matmul)
    secs = {}
    for _ in range(2):  # interleave all passes so that load from other processes hits all alike
        for k, f in fns.items():
            secs[k] = min(secs.get(k, np.inf), timeit(lambda f=f: f(p, tokens), args.reps))
        secs["matmul"] = min(secs.get("matmul", np.inf), timeit(lambda: mm(a, b), 4 * args.reps))
    peak = 2.0 * M * K * N / secs.pop("matmul")  # the best matmul rate seen: a conservative roofline

    if not args.no_torch:
        import torch
        import transformers
        torch.set_num_threads(os.cpu_count() or 1)
        if args.model == "smollm2":
            from saejax.models.weights import smollm2_path
            path = smollm2_path()
            ref = transformers.AutoModelForCausalLM.from_pretrained(
                os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
        elif args.model.startswith("hf:"):
            ref = transformers.AutoModelForCausalLM.from_pretrained(args.model[3:], dtype=torch.float32).eval()
        else:
            ref = None
        if ref is not None:
            tt = torch.tensor(np.asarray(tokens), dtype=torch.long)

            def run():
                with torch.no_grad():
                    return ref(tt).logits

            run()
            ts = []
            for _ in range(args.reps):
                t = time.perf_counter()
                run()
                ts.append(time.perf_counter() - t)
            secs["torch"] = float(np.min(ts))

    fpt = model_flops_per_token(c, L)

    print(f"model {model.name}: {c.n_layers} layers, d {c.d_model}, batch {B} x length {L}, "
          f"{len(sites)} sites, {jax.device_count()} device(s) {jax.devices()[0].platform}")
    print(f"matmul roofline [{M}x{K}]x[{K}x{N}] f32: {peak / 1e9:.1f} GFLOP/s; "
          f"model {fpt / 1e6:.1f} MFLOP/token")
    for k, s in secs.items():
        tps = B * L / s
        print(f"  {k:8s} {s * 1e3:9.1f} ms  {tps:9.0f} tok/s  roofline ratio {tps * fpt / peak:.3f}")
    print(f"ratio capture/plain time:  {secs['capture'] / secs['plain']:.3f}  (target < 1.10)")
    print(f"ratio harvest/plain time:  {secs['harvest'] / secs['plain']:.3f}")
    if "torch" in secs:
        print(f"ratio jax/torch tok/s:     {secs['torch'] / secs['plain']:.3f}")


if __name__ == "__main__":
    main()
