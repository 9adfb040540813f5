"""Train-step speed of a JumpReLU SAE against the dense-matmul roofline, SAELens, and stacking.

    python benchmarks/train_step.py                 # d=576, width 4608, batch 4096; ~5 min on 2 quiet cores
    python benchmarks/train_step.py --stack 18      # the stacked group's size (sites x sweep members)
    python benchmarks/train_step.py --bf16 --stack 0   # also the step with train.matmul_dtype bfloat16
    python benchmarks/train_step.py --matryoshka 0.0625,0.25,1 --stack 0   # also a Matryoshka step
    python benchmarks/train_step.py --transcoder --skip --stack 0   # also transcoder and skip-transcoder steps

Printed, all measured in this one run on one device:
  roofline   the five dense matmuls a step needs (encoder and decoder forward, latent gradient,
             decoder and encoder weight gradients: 5 x 2*B*d*M = 10*B*d*M FLOPs), timed alone in XLA,
             both for the whole batch at once and in the row blocks the step uses; the faster counts;
  saejax     tokens/s of the compiled train step (saejax.train.trainer.Trainer) and its fraction of
             the roofline time;
  sae-lens   tokens/s of SAELens' JumpReLU training step (forward, backward, Adam) on the same
             shape in torch (CPU), and saejax's speed-up over it; with it, the same five matmuls
             timed in torch, since torch's BLAS and XLA's differ by CPU (on the AMD EPYC of
             docs/training.md, torch's MKL ran at under half XLA's FLOP/s), so that the speed-up
             can be read apart from the BLAS;
  stacked    per-SAE tokens/s when ``--stack`` SAEs (sites x sweep members) train in one step,
             as a fraction of the single SAE's over as many of its steps in a row: both timed
             calls then do the same work for as long, so the minimum over rounds favours neither
             (the minimum of one short step is likelier to fall in a quiet moment of a shared
             machine than that of a long one). The ratio to the single step's own minimum is
             printed too, and the compiled steps' temporary buffers (XLA's memory_analysis):
             the stacked step updates one SAE at a time in place, so they do not grow with the
             number of SAEs as the parameters do;
  bf16       (``--bf16``) the single step with bfloat16 matmul inputs and float32 accumulation
             (train.matmul_dtype), and its time over the float32 step's;
  matryoshka (``--matryoshka``) the step with Matryoshka prefixes (fractions of the width; the
             same five matmuls' FLOPs: the prefix blocks are decoded once), its fraction of the
             roofline and its time over the plain step's;
  transcoder (``--transcoder``) a transcoder's step (mlp_in.L -> mlp.L, d_out = d: the SAE's five
             matmuls) and its fraction of the roofline;
  skip       (``--skip``) a skip-transcoder's step against its own roofline: the five matmuls plus
             the skip term's forward x W_skip and gradient x^T g (4*B*d*d_out FLOPs more), timed alike.
Memory does not grow with the store: the step holds one batch [T, B, d]; the reader's buffer is a
few blocks; nothing accumulates over steps (metrics are written out at logging steps).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from saejax import mesh as meshlib
from saejax.sae import jumprelu as jr, matryoshka
from saejax.sae.group import GroupSpec
from saejax.train import optim
from saejax.train.trainer import Trainer


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(fns: dict, rounds: int, stat=min) -> dict:
    """Seconds of each ``fn()`` (each blocks until done): warmed up twice, then timed once per
    round with the functions interleaved, so that load from other processes hits all of them alike;
    ``stat`` of the rounds is kept (min: the least disturbed run; ``--stat median``)."""
    for fn in fns.values():
        fn()
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(_once(fn))
    return {k: float(stat(v)) for k, v in times.items()}


def roofline(B: int, d: int, M: int, blocks: int, d_out: int = 0, skip: bool = False):
    """The five [B,d]x[d,M]-sized fp32 matmuls of one step (a transcoder's decoder side [M, d_out];
    with ``skip`` also the skip term's forward x W_skip and gradient x^T g, [B,d]x[d,d_out] each),
    in XLA, for the whole batch at once and in ``blocks`` row blocks (as the train step runs them):
    {form: blocking callable}."""
    d_out = d_out or d
    k = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(k[0], (B, d))
    w_enc = jax.random.normal(k[1], (d, M))
    w_dec = jax.random.normal(k[2], (M, d_out))
    g = jax.random.normal(k[3], (B, d_out))
    w_skip = jax.random.normal(k[4], (d, d_out))
    hi = jax.lax.Precision.HIGHEST

    def five(x, g):
        f = jnp.dot(x, w_enc, precision=hi)  # encoder forward       [B, M]
        y = jnp.dot(f, w_dec, precision=hi)  # decoder forward       [B, d_out]
        df = jnp.dot(g, w_dec.T, precision=hi)  # latent gradient    [B, M]
        dw_dec = jnp.dot(g.T, f, precision=hi)  # decoder gradient   [d_out, M] (transposed, as the step has it)
        dw_enc = jnp.dot(x.T, df, precision=hi)  # encoder gradient  [d, M]
        if skip:
            y = y + jnp.dot(x, w_skip, precision=hi)  # skip forward  [B, d_out]
            return jnp.sum(y), dw_dec, dw_enc, jnp.dot(x.T, g, precision=hi)  # skip gradient [d, d_out]
        return jnp.sum(y), dw_dec, dw_enc

    def blocked(x, g):  # the matmuls of row block c, summed over blocks
        xs, gs = x.reshape(blocks, B // blocks, d), g.reshape(blocks, B // blocks, d_out)
        zero = (jnp.zeros(()), jnp.zeros((d_out, M)), jnp.zeros((d, M))) + ((jnp.zeros((d, d_out)),) if skip else ())
        return jax.lax.scan(lambda acc, xg: (jax.tree_util.tree_map(jnp.add, acc, five(*xg)), None), zero, (xs, gs))[0]

    return {name: (lambda f=jax.jit(fn): jax.block_until_ready(f(x, g)))
            for name, fn in (("whole", five), ("blocked", blocked))}


def saejax_step(T: int, K: int, B: int, d: int, M: int, matmul_dtype: str = "float32", matryoshka=(),
                transcoder: bool = False, skip: bool = False):
    """One train step of a T x K JumpReLU group on one device (``transcoder``: a transcoder group
    mlp_in.L -> mlp.L with d_out = d, ``skip`` with its W_skip): a blocking callable, and XLA's
    temporary-buffer bytes of the compiled step (``Trainer.memory``; None if not reported)."""
    tc = dict(sites=tuple(f"mlp.{i}" for i in range(T)), reads=tuple(f"mlp_in.{i}" for i in range(T)),
              d_out=d, skip=skip) if transcoder else dict(sites=tuple(f"res.{i}" for i in range(T)))
    spec = GroupSpec(arch="jumprelu", d=d, width=M, **tc,
                     sweep=tuple(1e-3 * (i + 1) for i in range(K)), matmul_dtype=matmul_dtype,
                     matryoshka=tuple(matryoshka))
    hp = optim.Hyper(total_steps=10 ** 6, batch_size=B, lr_warmup=10, sparsity_warmup=10)
    mesh = meshlib.make_mesh(dict(data=1, stack=1, latent=1), jax.devices()[:1])
    trainer = Trainer(spec, hp, mesh)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, d), dtype=np.float32) / np.sqrt(d)
    if transcoder:  # an output site correlated with the input, as an MLP's is
        x = (x, 0.5 * x + rng.standard_normal((T, B, d), dtype=np.float32) / np.sqrt(d))
    x = trainer.put_batch(x)
    box = [trainer.init_state()]

    def one():
        box[0], m = trainer.step(box[0], x)
        jax.block_until_ready(m["loss"])

    return one, trainer.memory().get("compiled_temp")


def saelens_step(B: int, d: int, M: int):
    """One SAELens JumpReLU training step (forward, backward, Adam) in torch, or None if absent."""
    try:
        import torch
        from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput
    except ImportError as e:
        print(f"sae-lens: not importable ({e}); skipped")
        return None
    torch.manual_seed(0)
    cfg = JumpReLUTrainingSAEConfig(d_in=d, d_sae=M, dtype="float32", device="cpu",
                                    jumprelu_bandwidth=1e-3, jumprelu_init_threshold=1e-3, l0_coefficient=1e-3)
    sae = JumpReLUTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=7e-5, betas=(0.0, 0.999), eps=1e-8)
    x = torch.randn(B, d) / d ** 0.5
    step = [0]

    def one():
        out = sae.training_forward_pass(TrainStepInput(
            sae_in=x, coefficients={"l0": 1e-3}, dead_neuron_mask=None, n_training_steps=step[0],
            is_logging_step=False))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step[0] += 1

    return one


def torch_roofline(B: int, d: int, M: int):
    """The same five matmuls in torch (fp32, whole batch): a blocking callable (torch on CPU is eager)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(B, d, generator=gen), torch.randn(B, d, generator=gen)
    w_enc, w_dec = torch.randn(d, M, generator=gen), torch.randn(M, d, generator=gen)

    def five():
        f = x @ w_enc
        return (f @ w_dec).sum(), g.T @ f, x.T @ (g @ w_dec.T)

    return five


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--width", type=int, default=4608)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=10,
                   help="interleaved timing rounds (minimum kept; on a shared VM 3 left the minima 20%% apart run to run)")
    p.add_argument("--stack", type=int, default=18, help="SAEs in the stacked group (0: skip)")
    p.add_argument("--bf16", action="store_true", help="also time the step with bfloat16 matmul inputs")
    p.add_argument("--stat", choices=("min", "median"), default="min", help="statistic of the rounds kept")
    p.add_argument("--no-saelens", dest="saelens", action="store_false", help="skip SAELens' step")
    p.add_argument("--transcoder", action="store_true", help="also time a transcoder step (d_out = d) "
                   "against its own roofline")
    p.add_argument("--skip", action="store_true", help="also time a skip-transcoder step against its own "
                   "roofline (the five matmuls plus W_skip's forward and gradient)")
    p.add_argument("--matryoshka", default="", help="also time a Matryoshka step: prefix sizes as fractions "
                   "of the width, comma-separated (e.g. 0.0625,0.25,1)")
    a = p.parse_args()
    B, d, M = a.batch, a.d, a.width
    flops = 10 * B * d * M
    print(f"shape: d={d} width={M} batch={B}; step FLOPs 10*B*d*M = {flops / 1e9:.1f} GFLOP; "
          f"devices {jax.devices()[0].platform} x1; {a.stat} of {a.rounds} rounds")

    K = 3 if a.stack % 3 == 0 else 1
    blocks = jr.row_block_count(B, M)
    roofs = roofline(B, d, M, blocks)
    single_fn, single_temp = saejax_step(1, 1, B, d, M)
    fns = {"roof_whole": roofs["whole"], "roof_blocked": roofs["blocked"], "saejax": single_fn}
    lens_fn = saelens_step(B, d, M) if a.saelens else None
    if lens_fn is not None:
        fns["lens"], fns["roof_torch"] = lens_fn, torch_roofline(B, d, M)
    if a.stack:
        fns["stack"], stack_temp = saejax_step(a.stack // K, K, B, d, M)
        fns["single_run"] = lambda f=fns["saejax"], n=a.stack: [f() for _ in range(n)]
    if a.bf16:
        fns["bf16"] = saejax_step(1, 1, B, d, M, "bfloat16")[0]
    prefixes = matryoshka.resolve([float(v) for v in a.matryoshka.split(",")], M) if a.matryoshka else ()
    if prefixes:
        fns["matryoshka"] = saejax_step(1, 1, B, d, M, matryoshka=prefixes)[0]
    if a.transcoder:
        fns["transcoder"] = saejax_step(1, 1, B, d, M, transcoder=True)[0]  # d_out = d: the SAE's roofline
    if a.skip:
        fns["roof_skip_whole"], fns["roof_skip_blocked"] = roofline(B, d, M, blocks, skip=True).values()
        fns["skip"] = saejax_step(1, 1, B, d, M, transcoder=True, skip=True)[0]
    t = measure(fns, a.rounds, dict(min=min, median=np.median)[a.stat])
    roof, one = min(t["roof_whole"], t["roof_blocked"]), t["saejax"]
    print(f"roofline : five dense matmuls {roof * 1e3:8.1f} ms  ({flops / roof / 1e9:.1f} GFLOP/s; the faster of "
          f"the whole batch {t['roof_whole'] * 1e3:.1f} ms and {blocks} row blocks {t['roof_blocked'] * 1e3:.1f} ms)")
    print(f"saejax   : train step         {one * 1e3:8.1f} ms  {B / one:>10,.0f} tok/s  "
          f"roofline fraction {roof / one:.2f}  (target >= 0.85)")
    if a.bf16:
        print(f"bf16     : train step         {t['bf16'] * 1e3:8.1f} ms  {B / t['bf16']:>10,.0f} tok/s  "
              f"time bf16 / float32 {t['bf16'] / one:.2f}")
    if prefixes:
        mt = t["matryoshka"]
        print(f"matryoshka: prefixes {prefixes}  {mt * 1e3:8.1f} ms  {B / mt:>10,.0f} tok/s  "
              f"roofline fraction {roof / mt:.2f}  (target >= 0.85)  time over the plain step {mt / one:.2f}")
    if a.transcoder:
        tt = t["transcoder"]
        print(f"transcoder: d_in = d_out = {d}    {tt * 1e3:8.1f} ms  {B / tt:>10,.0f} tok/s  "
              f"roofline fraction {roof / tt:.2f}  (target >= 0.85; its five matmuls are the SAE's)")
    if a.skip:
        sk, skf = t["skip"], flops + 4 * B * d * d
        roof_skip = min(t["roof_skip_whole"], t["roof_skip_blocked"])
        print(f"skip     : roofline (five + W_skip forward and gradient, {skf / 1e9:.1f} GFLOP) "
              f"{roof_skip * 1e3:.1f} ms (whole {t['roof_skip_whole'] * 1e3:.1f}, blocked "
              f"{t['roof_skip_blocked'] * 1e3:.1f})")
        print(f"skip     : skip-transcoder step {sk * 1e3:8.1f} ms  {B / sk:>10,.0f} tok/s  "
              f"roofline fraction {roof_skip / sk:.2f}  (target >= 0.85)")
    if "lens" in t:
        lens = t["lens"]
        print(f"sae-lens : train step         {lens * 1e3:8.1f} ms  {B / lens:>10,.0f} tok/s  "
              f"roofline fraction {roof / lens:.2f}")
        tr = t["roof_torch"]
        print(f"torch    : five dense matmuls {tr * 1e3:8.1f} ms  ({flops / tr / 1e9:.1f} GFLOP/s); sae-lens at "
              f"{tr / lens:.2f} of torch's own roofline")
        print(f"saejax / sae-lens speed-up: {lens / one:.2f}x  (target >= 2); of it, XLA's matmuls over torch's "
              f"{tr / roof:.2f}x")
    if a.stack:
        many = t["stack"]
        total = B * a.stack / many  # SAE-tokens per second: each SAE reads B rows per step
        print(f"stacked  : {a.stack // K} sites x {K} members = {a.stack} SAEs  {many * 1e3:8.1f} ms/step  "
              f"{total / a.stack:>10,.0f} tok/s per SAE ({total:,.0f} SAE-tokens/s)")
        run = t["single_run"]
        print(f"single   : {a.stack} steps in a row {run * 1e3:8.1f} ms        {B * a.stack / run:>10,.0f} tok/s")
        print(f"per-SAE throughput stacked / single: {run / many:.2f}  (target >= 0.90; "
              f"{total / (B / one):.2f} against the single step's minimum)")
        if single_temp and stack_temp:
            print(f"compiled step temp buffers: stacked {stack_temp / 2 ** 20:,.0f} MiB, single "
                  f"{single_temp / 2 ** 20:,.0f} MiB: {stack_temp / single_temp:.2f}x for {a.stack}x the SAEs")


if __name__ == "__main__":
    main()
