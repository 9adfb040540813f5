"""The training loop: plan the groups of a suite, train each in compiled steps, write the results.

Output under ``<workdir>/train``:
    <group>/metrics.jsonl   one JSON record per logging step, per-SAE arrays [T][K]
    <group>/final/          the trained group (saejax.sae.io format) once the group is done
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from saejax import config as cfg
from saejax import mesh as meshlib
from saejax.log import log
from saejax.sae import io as sae_io
from saejax.sae import sharded
from saejax.sae.group import PARTITION_RULES, GroupSpec, SAEGroup
from saejax.sources import PlannedSource, make_source
from saejax.train import checkpoint as ckpt
from saejax.train import optim
from saejax.train.step import init_state, make_train_step, map_sites, recon_metrics

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
            if s.target_l0:  # every member's L0 term has the same coefficient, its own target
                sparsity = (float(s.target_l0_coeff),) * len(sweep)
            spec = GroupSpec(
                arch=s.arch, sites=tuple(sites), d=d, width=width, sparsity=sparsity,
                pre_encoder_bias=s.pre_encoder_bias, threshold_param=s.threshold_param,
                threshold_init=s.threshold_init, bandwidth=s.bandwidth, auxk_k=s.auxk_k,
                encoder_init_scale=s.encoder_init_scale, threshold_init_l0=s.threshold_init_l0,
                auxk_coeff=s.auxk_coeff, dtype=s.dtype, precision=t.matmul_precision)
            tokens = t.tokens_wide if width > WIDE else t.tokens
            total = max(1, math.ceil(tokens / t.batch_size))
            hp = optim.Hyper(
                total_steps=total, batch_size=t.batch_size, lr=t.lr, b1=t.b1, b2=t.b2, eps=t.eps,
                lr_warmup=cfg.schedule_steps(t.lr_warmup, total), lr_warmup_start=t.lr_warmup_start,
                lr_decay=t.lr_decay, lr_decay_end=t.lr_decay_end,
                sparsity_warmup=cfg.schedule_steps(t.sparsity_warmup, total),
                dead_steps=max(1, math.ceil(t.dead_tokens / t.batch_size)),
                target_l0=tuple(float(v) for v in s.target_l0))
            plans.append((spec, hp))
    return plans


class Trainer:
    """Trains one group on a mesh: the compiled step with shardings derived from partition rules.

    State shardings come from ``PARTITION_RULES`` (SAEs over ``stack``, latents over ``latent``);
    the batch x [T, B, d] is laid out ``P("stack", "data", None)``. The step is traced under
    ``sharded.use_mesh`` so that top-k thresholds are computed shard by shard.
    """

    def __init__(self, spec: GroupSpec, hp: optim.Hyper, mesh, seed: int = 0):
        self.spec, self.hp, self.mesh, self.seed = spec, hp, mesh, seed
        self.abstract = jax.eval_shape(lambda k: init_state(spec, hp, k), jax.random.key(0))
        self.state_shardings = meshlib.tree_shardings(self.abstract, PARTITION_RULES, mesh)
        self.x_sharding = NamedSharding(mesh, P("stack", "data", None))
        self.x_shape = (spec.T, hp.batch_size, spec.d)
        replicated = NamedSharding(mesh, P())
        step_fn = make_train_step(spec, hp)

        def traced_step(state, x):
            with sharded.use_mesh(mesh):
                return step_fn(state, x)

        self.init = jax.jit(lambda k: init_state(spec, hp, k), out_shardings=self.state_shardings)
        self.step = jax.jit(traced_step, in_shardings=(self.state_shardings, self.x_sharding),
                            out_shardings=(self.state_shardings, replicated), donate_argnums=0)
        self.finite = jax.jit(_finite_per_sae, out_shardings=replicated)

        def heldout_metrics(state, x):
            """Per-SAE L0 and FVU on a fixed held-out batch, inference mode (BatchTopK: its threshold)."""
            def one(sub, p, bt, xs):
                _, f, x_hat = SAEGroup(sub).apply({"params": p}, xs, bt, False)
                _, fvu, l0 = recon_metrics(xs, f, x_hat)
                return {"heldout_fvu": fvu, "heldout_l0": l0}

            with sharded.use_mesh(mesh):
                return map_sites(one, spec, state["params"], state["bt_threshold"], x)

        self.heldout_metrics = jax.jit(heldout_metrics, in_shardings=(self.state_shardings, self.x_sharding),
                                       out_shardings=replicated)
        self.replicate = jax.jit(lambda a: a, out_shardings=replicated)
        self.site_range, self.rows = self._local_block()
        # XLA:CPU with several devices: let one step finish before the next program is dispatched.
        # With async dispatch, consecutive programs with collectives could start in different orders
        # on different virtual devices and wait on each other for good (seen in the tests: device
        # launch threads parked on the in-flight semaphore, one all-reduce participant waiting alone).
        self.serialize = mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"

    def _local_block(self):
        """This process's block of the global batch: ((t0, t1) its sites, (part index, parts) of the rows)."""
        idx = self.x_sharding.addressable_devices_indices_map(self.x_shape).values()
        T, B, _ = self.x_shape
        t0, t1 = min(i[0].start or 0 for i in idx), max(i[0].stop or T for i in idx)
        b0, b1 = min(i[1].start or 0 for i in idx), max(i[1].stop or B for i in idx)
        n = b1 - b0
        assert B % n == 0 and b0 % n == 0, (b0, b1, B)
        return (t0, t1), (b0 // n, B // n)

    def init_state(self):
        return self.init(jax.random.key(self.seed))

    def local_batch(self, source, step: int, scales: np.ndarray) -> np.ndarray:
        """This process's normalized rows of ``step``: [T_local, B_local, d]."""
        (t0, t1), (part, parts) = self.site_range, self.rows
        x = source.batch(list(self.spec.sites[t0:t1]), step, self.hp.batch_size, part, parts)
        return x * scales[t0:t1]

    def local_heldout(self, source, scales: np.ndarray):
        """This process's normalized held-out rows (one batch, fixed), or None without a held-out split."""
        fn = getattr(source, "heldout_batch", None)
        if fn is None:
            return None
        (t0, t1), (part, parts) = self.site_range, self.rows
        x = fn(list(self.spec.sites[t0:t1]), self.hp.batch_size, part, parts)
        return None if x is None else x * scales[t0:t1]

    def put_batch(self, x_local: np.ndarray):
        """This process's rows [T_local, B_local, d] -> a global mesh-sharded array [T, B, d]."""
        return jax.make_array_from_process_local_data(self.x_sharding, x_local, self.x_shape)

    def memory(self) -> dict:
        """``state_memory`` of this group and mesh, plus XLA's own temp-buffer figure for the
        compiled step when the backend reports it."""
        out = state_memory(self.spec, self.hp, self.mesh)
        try:
            a, sh = self.abstract, self.state_shardings
            x = jax.ShapeDtypeStruct(self.x_shape, np.float32, sharding=self.x_sharding)
            st = jax.tree_util.tree_map(lambda v, h: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=h), a, sh)
            ma = self.step.lower(st, x).compile().memory_analysis()
            out["compiled_temp"] = int(ma.temp_size_in_bytes)
        except Exception:  # noqa: BLE001 - not every backend reports memory
            pass
        return out


def state_memory(spec: GroupSpec, hp: optim.Hyper, mesh) -> dict:
    """Per-device bytes of one step, from shapes and shardings alone (``mesh`` may be an AbstractMesh):
    the state parts, and the activations of the one SAE per stack shard that the step works on at a
    time (``step.scan_saes``), estimated as 7 live [B,M] fp32 buffers (pre, f, masks and window
    products of the JumpReLU pseudo-derivatives, their cotangents), x_hat and its cotangent [B,d],
    that SAE's gradient and Adam temporaries (3 x its parameters) and the batch [T,B,d]. An upper
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
                          + 3 * one_sae + meshlib.shard_bytes((spec.T, hp.batch_size, spec.d), np.float32, xs))
    return out


def _finite_per_sae(params):
    """[T, K] bool: every parameter of SAE (t, k) is finite."""
    ok = None
    for leaf in jax.tree_util.tree_leaves(params):
        f = jnp.all(jnp.isfinite(leaf).reshape(leaf.shape[:2] + (-1,)), axis=-1)
        ok = f if ok is None else ok & f
    return ok


def _scales(source, sites) -> np.ndarray:
    return np.asarray([source.norm_scale(s) for s in sites], np.float32)[:, None, None]


def to_host(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(jax.device_get(a)), tree)


def _truncate_log(path: str, step: int) -> None:
    """Keep only the records of steps <= ``step`` (a resumed run rewrites what came after)."""
    if not path or not os.path.exists(path) or jax.process_index() != 0:
        return
    keep = []
    with open(path) as fh:
        for ln in fh:
            try:
                if json.loads(ln)["step"] <= step:
                    keep.append(ln)
            except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a kill
                pass
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.writelines(keep)
    os.replace(tmp, path)


class NonFinite(RuntimeError):
    """Every SAE of a group went non-finite; the last good checkpoint is kept."""


def train_group(spec, hp, source, mesh, *, seed=0, log_every=100, log_path=None, progress=True, state=None,
                ckpt_dir=None, checkpoint_every=1000, keep_checkpoints=2, trainer=None):
    """Train one group from ``source`` to ``hp.total_steps``; return the final state.

    With ``ckpt_dir``, resume from its latest checkpoint (into this mesh's shardings), save every
    ``checkpoint_every`` steps and at the end, and on SIGTERM save at an agreed step and raise
    ``checkpoint.Preempted`` (exit code 75).
    """
    trainer = trainer or Trainer(spec, hp, mesh, seed)
    ckpts = ckpt.Checkpoints(ckpt_dir, checkpoint_every, keep_checkpoints) if ckpt_dir else None
    if state is None and ckpts is not None and ckpts.latest_step() is not None:
        state = ckpts.restore(trainer.abstract, trainer.state_shardings)
        log(f"[{spec.name}] resumed from the checkpoint at step {int(jax.device_get(state['step']))}")
    state = trainer.init_state() if state is None else state
    scales = _scales(source, spec.sites)
    start = int(jax.device_get(state["step"]))
    _truncate_log(log_path, start)
    records = open(log_path, "a") if log_path and jax.process_index() == 0 else None
    watch = ckpt.PreemptionWatch() if ckpts is not None else None
    held = trainer.local_heldout(source, scales) if log_path or progress else None
    held = None if held is None else trainer.put_batch(held)
    t0, last = time.time(), start
    try:
        for step in range(start, hp.total_steps):
            state, metrics = trainer.step(state, trainer.put_batch(trainer.local_batch(source, step, scales)))
            if trainer.serialize:
                jax.block_until_ready(metrics)
            done = step + 1
            preempt = watch is not None and watch.reached(done)
            save = ckpts is not None and (done % checkpoint_every == 0 or done == hp.total_steps or preempt)
            if done % log_every == 0 or done == hp.total_steps:
                m = to_host(metrics)
                if held is not None:  # the quick evaluation: the same held-out rows at every log step
                    m.update(to_host(trainer.heldout_metrics(state, held)))
                state = _freeze_nonfinite(spec, state, trainer, m["loss"], done)
                record = {"step": done, "tokens": done * hp.batch_size,
                          **{k: np.asarray(v).tolist() for k, v in m.items()}}
                if records:
                    records.write(json.dumps(record) + "\n")
                    records.flush()
                if progress:
                    rate = (done - last) * hp.batch_size / max(time.time() - t0, 1e-9)
                    t0, last = time.time(), done
                    log(f"[{spec.name}] step {done}/{hp.total_steps} {rate:,.0f} tok/s "
                        f"L0 {_span(m['l0'])} FVU {_span(m['fvu'])} dead {_span(m['dead_frac'])}"
                        + (f" | held-out L0 {_span(m['heldout_l0'])} FVU {_span(m['heldout_fvu'])}"
                           if "heldout_fvu" in m else ""))
            elif save:
                state = _freeze_nonfinite(spec, state, trainer, None, done)
            if save:
                if bool(np.all(jax.device_get(trainer.replicate(state["frozen"])))):
                    raise NonFinite(f"every SAE of group {spec.name} went non-finite by step {done}; "
                                    f"the last good checkpoint (step {ckpts.latest_step()}) is kept")
                ckpts.save(done, state, force=True)
            if preempt:
                ckpts.wait()
                log(f"[{spec.name}] preempted: checkpoint at step {done} saved; "
                    f"exit {ckpt.EXIT_PREEMPTED}, rerun the same command to resume")
                raise ckpt.Preempted(done)
    finally:
        if records:
            records.close()
        if ckpts is not None:
            ckpts.wait()
            ckpts.close()
        if watch is not None:
            watch.close()
    return state


def _span(a) -> str:
    a = np.asarray(a)
    return f"{a.min():.3g}" if a.size == 1 or a.min() == a.max() else f"{a.min():.3g}..{a.max():.3g}"


def _freeze_nonfinite(spec, state, trainer, loss, step):
    """Freeze SAEs whose loss or parameters went non-finite (checked at logging and checkpoint
    steps only: no per-step host sync). ``loss`` [T, K] or None."""
    bad = ~np.asarray(jax.device_get(trainer.finite(state["params"])))
    if loss is not None:
        bad |= ~np.isfinite(np.asarray(loss))
    frozen = np.asarray(jax.device_get(trainer.replicate(state["frozen"])))
    new = bad & ~frozen
    if new.any():
        for t, k in zip(*np.nonzero(new)):
            log(f"[{spec.name}] SAE site={spec.sites[t]} sparsity={spec.sparsity[k]} went non-finite "
                f"by step {step}: frozen, the rest of the group trains on")
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


def gather(tree):
    """A pytree of (possibly multi-process) global arrays as host numpy arrays, on every process."""
    if jax.process_count() == 1:
        return to_host(tree)
    from jax.experimental import multihost_utils
    return to_host(multihost_utils.process_allgather(tree, tiled=True))


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:,.1f} MiB"


def dry_run_report(spec, hp, mesh) -> str:
    """One group's plan: steps, tokens, per-device memory of state and of one step's activations
    (from the mesh's shape alone when ``mesh`` is an AbstractMesh: devices of another machine)."""
    mem = Trainer(spec, hp, mesh).memory() if isinstance(mesh, jax.sharding.Mesh) else state_memory(spec, hp, mesh)
    line = (f"[{spec.name}] dry run: {hp.total_steps} steps, {hp.total_steps * hp.batch_size:,} tokens; "
            f"per device: params {_mib(mem['params'])}, optimizer {_mib(mem['optimizer'])}, "
            f"counters {_mib(mem['counters'])}, activations ~{_mib(mem['activations'])}")
    if "compiled_temp" in mem:
        line += f" (compiled step temp {_mib(mem['compiled_temp'])})"
    return line


def is_complete(config) -> bool:
    """Every group of the suite has its ``final/`` folder (``saejax run`` then skips training)."""
    try:
        plans = plan_groups(config, make_source(config))
    except Exception:  # noqa: BLE001 - no readable source: not complete; the train stage reports why
        return False
    return all(os.path.isdir(os.path.join(config.workdir, "train", spec.name, "final")) for spec, _ in plans)


def run(config, dry_run: bool = False, planned_widths: dict | None = None) -> list[str]:
    """Train every group of the suite; return the folders of the finished groups.

    Mesh and group shapes are validated before anything compiles; ``dry_run`` prints each group's
    plan and memory (from shapes and shardings only) and reads no data. ``planned_widths`` (site ->
    width, from the harvest dry run) stands in for a store that does not exist yet.
    """
    store_missing = not os.path.isfile(os.path.join(config.workdir, "store", "manifest.json"))
    if dry_run and planned_widths and config.train.source != "synthetic" and store_missing:
        source = PlannedSource(planned_widths)
    else:
        source = make_source(config)
    n_devices = None
    try:
        mesh = meshlib.make_mesh(config.mesh)
    except meshlib.MeshError as e:
        if not dry_run:
            raise
        mesh = meshlib.abstract_mesh(config.mesh)  # plan for the slice's devices from here
        n_devices = mesh.size
        log(f"saejax train: {e}; the dry run plans for that mesh from its shape alone "
            f"(per-device memory without XLA's compiled-step figure)")
    plans = plan_groups(config, source)
    for spec, hp in plans:
        meshlib.validate_group(config.mesh, spec.T, spec.width, hp.batch_size, n_devices=n_devices,
                               process_count=1 if n_devices else None, name=spec.name)
    out_root = os.path.join(config.workdir, "train")
    t = config.train
    finished = []
    for spec, hp in plans:
        gdir = os.path.join(out_root, spec.name)
        final = os.path.join(gdir, "final")
        log(f"[{spec.name}] {spec.T} sites x {spec.K} sweep members, {hp.total_steps} steps of "
            f"{hp.batch_size} tokens ({hp.total_steps * hp.batch_size:,} tokens), mesh {dict(mesh.shape)}")
        if dry_run:
            log(dry_run_report(spec, hp, mesh))
            continue
        if os.path.isdir(final):
            log(f"[{spec.name}] already trained: {final}")
            finished.append(final)
            continue
        os.makedirs(gdir, exist_ok=True)
        state = train_group(spec, hp, source, mesh, seed=config.seed, log_every=t.log_every,
                            log_path=os.path.join(gdir, "metrics.jsonl"),
                            ckpt_dir=os.path.join(gdir, "checkpoints"), checkpoint_every=t.checkpoint_every,
                            keep_checkpoints=t.keep_checkpoints)
        host = gather({k: v for k, v in state.items() if k != "opt_state"})
        if jax.process_index() == 0:
            arrays = sae_io.export_params(spec.arch, host["params"], host["bt_threshold"])
            sae_io.save_group(final, arrays, group_meta(spec, hp, source, host, getattr(source, "model", "")))
        finished.append(final)
    return finished
