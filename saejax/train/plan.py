"""Planning a suite: its groups and their optimizer settings from the config, and each group's
per-device memory from shapes and shardings alone (the dry run's figures)."""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from saejax import config as cfg
from saejax import mesh as meshlib
from saejax.sae import matryoshka, sharded
from saejax.sae.group import PARTITION_RULES, GroupSpec
from saejax.train import optim
from saejax.train.step import init_state

WIDE = 16384  # Gemma Scope: 4B tokens up to 16k latents, 8B above


def site_kind(site: str) -> str:
    """``"mlp_in.3"`` -> ``"mlp_in"``."""
    return site.rsplit(".", 1)[0]


def plan_groups(config, source) -> list[tuple[GroupSpec, optim.Hyper]]:
    """One SAE group per (input width, latent width): every site of that input width whose kind is in
    ``sae.site_kinds`` x the sweep; then one transcoder group per (input width, output width, latent
    width) of the ``sae.transcoders`` layers (reading mlp_in.L, writing mlp.L)."""
    by_d: dict[tuple, list[tuple[str, ...]]] = {}
    for site in source.sites:
        if site_kind(site) in config.sae.site_kinds:
            by_d.setdefault((source.width(site),), []).append((site,))
    for read, write in cfg.transcoder_pairs(config):
        by_d.setdefault((source.width(read), source.width(write)), []).append((write, read))
    s, t = config.sae, config.train
    # sae.seeds: each sweep value (or target) repeated, seed-major within it: member i * seeds + j is
    # seed j of value i. Members of one group draw independent inits (init_params), so repeats are seeds.
    sweep = tuple(float(v) for v in (s.target_l0 or s.sparsity) for _ in range(s.seeds))
    targets = tuple(float(v) for v in s.target_l0 for _ in range(s.seeds))
    plans = []
    # SAE groups first, in width order (as before transcoders), then the transcoder groups.
    for key, members in sorted(by_d.items(), key=lambda kv: (len(kv[0]), kv[0])):
        d = key[0]
        sites = tuple(m[0] for m in members)
        extra = {} if len(key) == 1 else {"reads": tuple(m[1] for m in members), "d_out": key[1], "skip": s.skip}
        for width in s.widths:
            values = sweep
            if s.target_l0:  # every member's L0 term has the same coefficient, its own target
                values = (float(s.target_l0_coeff),) * len(sweep)
            spec = GroupSpec(
                arch=s.arch, sites=sites, d=d, width=width, sweep=values, **extra,
                pre_encoder_bias=s.pre_encoder_bias, threshold_param=s.threshold_param,
                threshold_init=s.threshold_init, bandwidth=s.bandwidth, auxk_k=s.auxk_k,
                encoder_init_scale=s.encoder_init_scale, threshold_init_l0=s.threshold_init_l0,
                auxk_coeff=s.auxk_coeff, dtype=s.dtype, precision=t.matmul_precision,
                matmul_dtype=t.matmul_dtype, matryoshka=matryoshka.resolve(s.get("matryoshka", ()), width))
            tokens = t.tokens_wide if width > WIDE else t.tokens
            total = max(1, math.ceil(tokens / t.batch_size))
            hp = optim.Hyper(
                total_steps=total, batch_size=t.batch_size, lr=t.lr, b1=t.b1, b2=t.b2, eps=t.eps,
                lr_warmup=cfg.schedule_steps(t.lr_warmup, total), lr_warmup_start=t.lr_warmup_start,
                lr_decay=t.lr_decay, lr_decay_end=t.lr_decay_end,
                lr_decay_start=cfg.schedule_steps(t.lr_decay_start, total),
                sparsity_warmup=cfg.schedule_steps(t.sparsity_warmup, total),
                dead_steps=max(1, math.ceil(t.dead_tokens / t.batch_size)),
                target_l0=targets,
                revive_steps=math.ceil(s.revive_tokens / t.batch_size) if s.revive_tokens and (s.revive_nudge or s.revive_auxk or s.revive_bias) else 0,
                revive_nudge=s.revive_nudge, revive_auxk=s.revive_auxk, revive_bias=s.revive_bias, b_dec_init=s.b_dec_init)
            plans.append((spec, hp))
    return plans


def state_memory(spec: GroupSpec, hp: optim.Hyper, mesh) -> dict:
    """Per-device bytes of one step, from shapes and shardings alone (``mesh`` may be an AbstractMesh):
    the state parts, and the activations of the one SAE per stack shard that the step works on at a
    time (``step.scan_saes``), estimated as 7 live [B,M] fp32 buffers (pre, f, masks and window
    products of the JumpReLU pseudo-derivatives, their cotangents), x_hat and its cotangent [B,d],
    that SAE's gradient and Adam temporaries (3 x its parameters) and the batch [T,B,d] (a
    transcoder's: and its target [T,B,d_out]). An upper
    bound: the JumpReLU step holds [B,M] buffers a row block at a time (``Trainer.memory`` adds XLA's
    own figure for the compiled step where the backend reports it)."""
    def total(tree, shardings):
        leaves = jax.tree_util.tree_leaves(tree)
        shards = jax.tree_util.tree_leaves(shardings)
        return sum(meshlib.shard_bytes(a.shape, a.dtype, s) for a, s in zip(leaves, shards))

    a = jax.eval_shape(lambda k: init_state(spec, hp, k), jax.random.key(0))
    sh = meshlib.tree_shardings(a, PARTITION_RULES, mesh)
    out = {"params": total(a["params"], sh["params"]), "optimizer": total(a["opt_state"], sh["opt_state"]),
           "counters": sum(total(a[k], sh[k]) for k in a if k not in ("params", "opt_state"))}
    pre = NamedSharding(mesh, sharded.PRE_SPEC)
    rec = NamedSharding(mesh, P("stack", None, "data", None))
    xs = NamedSharding(mesh, P("stack", "data", None))
    S, = sharded.axis_sizes(mesh, "stack")  # SAEs in flight: one per stack shard
    one_sae = out["params"] * S // (spec.T * spec.K)  # a device's part of one SAE's parameters
    out["activations"] = (7 * meshlib.shard_bytes((S, 1, hp.batch_size, spec.width), np.float32, pre)
                          + 2 * meshlib.shard_bytes((S, 1, hp.batch_size, spec.d), np.float32, rec)
                          + 3 * one_sae + meshlib.shard_bytes((spec.T, hp.batch_size, spec.d), np.float32, xs)
                          + (meshlib.shard_bytes((spec.T, hp.batch_size, spec.dout), np.float32, xs)
                             if spec.transcoder else 0))  # a transcoder's target rows
    return out


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:,.1f} MiB"


def dry_run_report(spec, hp, mem: dict) -> str:
    """One group's plan: steps, tokens, per-device memory ``mem`` (``state_memory``, or
    ``Trainer.memory`` with XLA's compiled-step figure) of state and of one step's activations."""
    line = (f"[{spec.name}] dry run: {hp.total_steps} steps, {hp.total_steps * hp.batch_size:,} tokens; "
            f"per device: params {_mib(mem['params'])}, optimizer {_mib(mem['optimizer'])}, "
            f"counters {_mib(mem['counters'])}, activations ~{_mib(mem['activations'])}")
    if "compiled_temp" in mem:
        line += f" (compiled step temp {_mib(mem['compiled_temp'])})"
    return line
