"""The training loop: plan the groups of a suite, train each in compiled steps, write the results.

Output under ``<workdir>/train``:
    <group>/metrics.jsonl   one JSON record per logging step, per-SAE arrays [T][K]
    <group>/final/          the trained group (saejax.sae.io format) once the group is done
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from saejax import config as cfg
from saejax import mesh as meshlib
from saejax.sae import io as sae_io
from saejax.sae.group import PARTITION_RULES, GroupSpec
from saejax.train import optim
from saejax.train.step import init_state, make_train_step

WIDE = 16384  # Gemma Scope: 4B tokens up to 16k latents, 8B above


def plan_groups(config, source) -> list[tuple[GroupSpec, optim.Hyper]]:
    """One group per (input width, latent width): every site of that input width x the sweep."""
    by_d: dict[int, list[str]] = {}
    for site in source.sites:
        by_d.setdefault(source.width(site), []).append(site)
    s, t = config.sae, config.train
    sweep = tuple(float(v) for v in (s.target_l0 or s.sparsity))
    plans = []
    for d, sites in sorted(by_d.items()):
        for width in s.widths:
            sparsity = sweep
            if s.target_l0:  # calibrated: every member starts from the first sparsity value
                sparsity = (float(s.sparsity[0]),) * len(sweep)
            spec = GroupSpec(
                arch=s.arch, sites=tuple(sites), d=d, width=width, sparsity=sparsity,
                pre_encoder_bias=s.pre_encoder_bias, threshold_param=s.threshold_param,
                threshold_init=s.threshold_init, bandwidth=s.bandwidth, auxk_k=s.auxk_k,
                auxk_coeff=s.auxk_coeff, dtype=s.dtype, precision=t.matmul_precision)
            tokens = t.tokens_wide if width > WIDE else t.tokens
            total = max(1, math.ceil(tokens / t.batch_size))
            hp = optim.Hyper(
                total_steps=total, batch_size=t.batch_size, lr=t.lr, b1=t.b1, b2=t.b2, eps=t.eps,
                lr_warmup=cfg.schedule_steps(t.lr_warmup, total), lr_warmup_start=t.lr_warmup_start,
                lr_decay=t.lr_decay, lr_decay_end=t.lr_decay_end,
                sparsity_warmup=cfg.schedule_steps(t.sparsity_warmup, total),
                dead_steps=max(1, math.ceil(t.dead_tokens / t.batch_size)),
                target_l0=tuple(float(v) for v in s.target_l0), calibration_rate=t.calibration_rate)
            plans.append((spec, hp))
    return plans


class Trainer:
    """Trains one group on a mesh: the compiled step with shardings derived from partition rules."""

    def __init__(self, spec: GroupSpec, hp: optim.Hyper, mesh, seed: int = 0):
        self.spec, self.hp, self.mesh, self.seed = spec, hp, mesh, seed
        abstract = jax.eval_shape(lambda k: init_state(spec, hp, k), jax.random.key(0))
        self.state_shardings = meshlib.tree_shardings(abstract, PARTITION_RULES, mesh)
        self.x_sharding = NamedSharding(mesh, P("stack", "data", None))
        metric_sharding = NamedSharding(mesh, P())
        self.init = jax.jit(lambda k: init_state(spec, hp, k), out_shardings=self.state_shardings)
        self.step = jax.jit(make_train_step(spec, hp), in_shardings=(self.state_shardings, self.x_sharding),
                            out_shardings=(self.state_shardings, metric_sharding), donate_argnums=0)

    def init_state(self):
        return self.init(jax.random.key(self.seed))

    def put_batch(self, x_local: np.ndarray):
        """This process's rows [T, B_local, d] -> a global mesh-sharded array [T, B, d]."""
        T, b, d = x_local.shape
        shape = (T, b * jax.process_count(), d)
        return jax.make_array_from_process_local_data(self.x_sharding, x_local, shape)


def _scales(source, sites) -> np.ndarray:
    return np.asarray([source.norm_scale(s) for s in sites], np.float32)[:, None, None]


def to_host(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(jax.device_get(a)), tree)


def train_group(spec, hp, source, mesh, *, seed=0, log_every=100, log_path=None, progress=True, state=None):
    """Train one group from ``source`` to ``hp.total_steps``; return the final state."""
    trainer = Trainer(spec, hp, mesh, seed)
    state = trainer.init_state() if state is None else state
    scales = _scales(source, spec.sites)
    start = int(jax.device_get(state["step"]))
    log = open(log_path, "a") if log_path else None
    t0, last = time.time(), start
    try:
        for step in range(start, hp.total_steps):
            x = source.batch(spec.sites, step, hp.batch_size, jax.process_index(), jax.process_count())
            state, metrics = trainer.step(state, trainer.put_batch(x * scales))
            done = step + 1
            if done % log_every == 0 or done == hp.total_steps:
                m = to_host(metrics)
                state = _freeze_nonfinite(spec, state, m, done)
                record = {"step": done, "tokens": done * hp.batch_size,
                          **{k: np.asarray(v).tolist() for k, v in m.items()}}
                if log and jax.process_index() == 0:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if progress and jax.process_index() == 0:
                    rate = (done - last) * hp.batch_size / max(time.time() - t0, 1e-9)
                    t0, last = time.time(), done
                    print(f"[{spec.name}] step {done}/{hp.total_steps} {rate:,.0f} tok/s "
                          f"L0 {_span(m['l0'])} FVU {_span(m['fvu'])} dead {_span(m['dead_frac'])}",
                          file=sys.stderr, flush=True)
    finally:
        if log:
            log.close()
    return state


def _span(a) -> str:
    a = np.asarray(a)
    return f"{a.min():.3g}" if a.size == 1 or a.min() == a.max() else f"{a.min():.3g}..{a.max():.3g}"


def _freeze_nonfinite(spec, state, m, step):
    """Freeze SAEs whose loss went non-finite (checked at logging steps only: no per-step sync)."""
    bad = ~np.isfinite(np.asarray(m["loss"]))
    frozen = np.asarray(jax.device_get(state["frozen"]))
    new = bad & ~frozen
    if new.any():
        for t, k in zip(*np.nonzero(new)):
            print(f"[{spec.name}] SAE site={spec.sites[t]} sparsity={spec.sparsity[k]} went non-finite "
                  f"by step {step}: frozen, the rest of the group trains on", file=sys.stderr, flush=True)
        sharding = state["frozen"].sharding
        state = dict(state, frozen=jax.device_put(jnp.asarray(frozen | bad), sharding))
    return state


def group_meta(spec: GroupSpec, hp: optim.Hyper, source, state, model: str = "") -> dict:
    return {
        "arch": spec.arch, "sites": list(spec.sites), "d": spec.d, "width": spec.width,
        "sparsity": list(spec.sparsity), "k": list(spec.ks) if spec.arch in ("topk", "batchtopk") else [],
        "target_l0": list(hp.target_l0), "lam": np.asarray(jax.device_get(state["lam"])).tolist(),
        "l0_ema": np.asarray(jax.device_get(state["l0_ema"])).tolist(),
        "frozen": np.asarray(jax.device_get(state["frozen"])).tolist(),
        "norm_scale": [float(source.norm_scale(s)) for s in spec.sites],
        "pre_encoder_bias": spec.pre_encoder_bias, "threshold_param": spec.threshold_param,
        "bandwidth": spec.bandwidth, "model": model, "steps": int(jax.device_get(state["step"])),
        "tokens": int(jax.device_get(state["step"])) * hp.batch_size, "batch_size": hp.batch_size,
    }


def make_source(config):
    """The training source named by the config: the activation store, or synthetic data."""
    if config.train.source == "synthetic":
        from saejax.data.synthetic import SyntheticSource
        s = config.synthetic
        sites = [f"res.{i}" for i in range(s.sites)]
        return SyntheticSource(sites, d=s.d, n_features=s.n_features, active=s.active, zipf=s.zipf,
                               noise=s.noise, seed=config.seed)
    from saejax import store
    return store.open_store(os.path.join(config.workdir, "store")).reader(seed=config.seed, split="train")


def run(config, dry_run: bool = False) -> list[str]:
    """Train every group of the suite; return the folders of the finished groups."""
    source = make_source(config)
    mesh = meshlib.make_mesh(config.mesh)
    plans = plan_groups(config, source)
    out_root = os.path.join(config.workdir, "train")
    finished = []
    for spec, hp in plans:
        gdir = os.path.join(out_root, spec.name)
        final = os.path.join(gdir, "final")
        print(f"[{spec.name}] {spec.T} sites x {spec.K} sweep members, {hp.total_steps} steps of "
              f"{hp.batch_size} tokens ({hp.total_steps * hp.batch_size:,} tokens)", file=sys.stderr)
        if dry_run:
            continue
        if os.path.isdir(final):
            print(f"[{spec.name}] already trained: {final}", file=sys.stderr)
            finished.append(final)
            continue
        os.makedirs(gdir, exist_ok=True)
        state = train_group(spec, hp, source, mesh, seed=config.seed, log_every=config.train.log_every,
                            log_path=os.path.join(gdir, "metrics.jsonl"))
        if jax.process_index() == 0:
            params = to_host(state["params"])
            arrays = sae_io.export_params(spec.arch, params, to_host(state["bt_threshold"]))
            sae_io.save_group(final, arrays, group_meta(spec, hp, source, state, getattr(source, "model", "")))
        finished.append(final)
    return finished
