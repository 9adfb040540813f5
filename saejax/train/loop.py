"""The train stage: train each group of the suite in compiled steps, logging and checkpointing.

Output under ``<workdir>/train`` (paths from saejax.workdir):
    <group>/metrics.jsonl   one JSON record per logging step, per-SAE arrays [T][K] (the real sites
                            only: a group's idle slots, GroupSpec.pad, are never logged nor exported)
    <group>/checkpoints/    the train state every ``train.checkpoint_every`` steps (checkpoint.py)
    <group>/final/          the trained group (saejax.sae.io format, export.py) once the group is done
The groups and their memory come from plan.py, the compiled step from trainer.py, the data from
saejax.sources.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from saejax import config as cfg
from saejax import files
from saejax import mesh as meshlib
from saejax import workdir as wd
from saejax.log import log, progress as progress_bar
from saejax.preempt import EXIT_PREEMPTED, Preempted, PreemptionWatch
from saejax.sources import PlannedSource, make_source
from saejax.tracking import Tracker, group_scalars
from saejax.train import checkpoint as ckpt
from saejax.train import clt_step
from saejax.train import cost
from saejax.sae.group import GroupSpec, real_sites
from saejax.train.export import save_final
from saejax.train.plan import dry_run_report, plan_groups, state_memory
from saejax.train.trainer import Trainer, norm_scales, to_host


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
    with files.atomic(path, sum(map(len, keep)), "w") as fh:
        fh.writelines(keep)


class NonFinite(RuntimeError):
    """Every SAE of a group went non-finite; the last good checkpoint is kept."""


def train_group(spec, hp, source, mesh, *, seed=0, log_every=100, log_path=None, progress=True, state=None,
                ckpt_dir=None, checkpoint_every=1000, keep_checkpoints=2, trainer=None, tracker=None):
    """Train one group from ``source`` to ``hp.total_steps``; return the final state.

    With ``ckpt_dir``, resume from its latest checkpoint (into this mesh's shardings), save every
    ``checkpoint_every`` steps and at the end, and on SIGTERM save at an agreed step and raise
    ``checkpoint.Preempted`` (exit code 75). ``tracker`` (saejax.tracking) gets every logging
    step's metrics, per SAE. ``progress``: a progress bar (log lines off a terminal) with the ETA,
    and a line of metrics per logging step.
    """
    trainer = trainer or Trainer(spec, hp, mesh, seed)
    ckpts = ckpt.Checkpoints(ckpt_dir, checkpoint_every, keep_checkpoints) if ckpt_dir else None
    if state is None and ckpts is not None and ckpts.latest_step() is not None:
        saved = ckpts.slots() if isinstance(spec, GroupSpec) else None  # (a CLT has no slots)
        if saved is not None and saved != spec.T:
            raise ckpt.CheckpointError(
                f"{ckpt_dir}: its checkpoint has {saved} SAE slots per member, this plan {spec.T} "
                f"({spec.n_sites} sites + {spec.pad} idle, mesh.pad_sites); resume with the mesh.pad_sites "
                f"(and mesh size) it was saved with, or move the folder away")
        state = ckpts.restore(trainer.abstract, trainer.state_shardings)
        log(f"[{spec.name}] resumed from the checkpoint at step {int(jax.device_get(state['step']))}")
    state = trainer.init_state() if state is None else state
    scales = trainer.norm_scales(source)
    start = int(jax.device_get(state["step"]))
    _truncate_log(log_path, start)
    records = open(log_path, "a") if log_path and jax.process_index() == 0 else None
    watch = PreemptionWatch() if ckpts is not None else None
    held = trainer.local_heldout(source, scales) if log_path or progress else None
    held = None if held is None else trainer.put_batch(held)
    if tracker is not None:
        tracker.begin(start)
    t0, last = time.time(), start
    bar = progress_bar(hp.total_steps, f"train {spec.name}", unit="step", initial=start) if progress else None
    try:
        for step in range(start, hp.total_steps):
            state, metrics = trainer.step(state, trainer.put_batch(trainer.local_batch(source, step, scales)))
            if trainer.serialize:
                jax.block_until_ready(metrics)
            done = step + 1
            if bar is not None:
                bar.update(1)
            preempt = watch is not None and watch.reached(done)
            save = ckpts is not None and (done % checkpoint_every == 0 or done == hp.total_steps or preempt)
            if done % log_every == 0 or done == hp.total_steps:
                m = to_host(metrics)
                if held is not None:  # the quick evaluation: the same held-out rows at every log step
                    m.update(to_host(trainer.heldout_metrics(state, held)))
                m = real_sites(spec, m)
                state = _freeze_nonfinite(spec, hp, state, trainer, m["loss"], done)
                record = {"step": done, "tokens": done * hp.batch_size,
                          **{k: np.asarray(v).tolist() for k, v in m.items()}}
                if records:
                    records.write(json.dumps(record) + "\n")
                    records.flush()
                if tracker is not None:
                    tracker.scalars(done, group_scalars(spec.name, spec.sites, m))
                if bar is not None and bar.on:  # not with --quiet
                    rate = (done - last) * hp.batch_size / max(time.time() - t0, 1e-9)
                    t0, last = time.time(), done
                    bar.write(f"[{spec.name}] step {done}/{hp.total_steps} {rate:,.0f} tok/s "
                              f"L0 {_span(m['l0'])} FVU {_span(m['fvu'])} dead {_span(m['dead_frac'])}"
                              + (f" | held-out L0 {_span(m['heldout_l0'])} FVU {_span(m['heldout_fvu'])}"
                                 if "heldout_fvu" in m else ""))
            elif save:
                state = _freeze_nonfinite(spec, hp, state, trainer, None, done)
            if save:
                if bool(np.all(real_sites(spec, np.asarray(jax.device_get(trainer.replicate(state["frozen"])))))):
                    raise NonFinite(f"every SAE of group {spec.name} went non-finite by step {done}; "
                                    f"the last good checkpoint (step {ckpts.latest_step()}) is kept")
                ckpts.save(done, state, force=True)
            if preempt:
                ckpts.wait()
                log(f"[{spec.name}] preempted: checkpoint at step {done} saved; "
                    f"exit {EXIT_PREEMPTED}, rerun the same command to resume")
                raise Preempted(done)
    finally:
        if bar is not None:
            bar.close()
        if tracker is not None:
            tracker.flush()
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


def sae_label(spec, hp, t: int, k: int) -> str:
    """One SAE of a group, fully: its site, member index and that member's target L0 or sweep value."""
    what = f"target L0 {hp.target_l0[k]:g}" if hp.target_l0 else f"{spec.kind.sweep_name} {spec.sweep[k]:g}"
    return f"SAE {spec.sites[t]} member {k} ({what})"


def _freeze_nonfinite(spec, hp, state, trainer, loss, step):
    """Freeze SAEs whose loss or parameters went non-finite (checked at logging and checkpoint
    steps only: no per-step host sync). ``loss`` [n_sites, K] (the real sites') or None. Idle
    slots are frozen from the start and never checked."""
    bad = ~np.asarray(jax.device_get(trainer.finite(state["params"])))
    n = len(real_sites(spec, bad))  # the real sites: idle slots are never checked
    bad[n:] = False
    if loss is not None:
        bad[:n] |= ~np.isfinite(np.asarray(loss))
    frozen = np.asarray(jax.device_get(trainer.replicate(state["frozen"])))
    new = bad & ~frozen
    if new.any():
        for t, k in zip(*np.nonzero(new)):
            log(f"[{spec.name}] {sae_label(spec, hp, t, k)} went non-finite by step {step}: frozen, "
                f"the rest of the group trains on")
        sharding = state["frozen"].sharding
        state = dict(state, frozen=jax.device_put(jnp.asarray(frozen | bad), sharding))
    return state


# Keys added after fingerprints were first written, with the value every older run had: a key at
# that value is left out, so runs from before it still resume (docs/training.md, one config).
LATER_SPEC = {"matmul_dtype": "float32", "matryoshka": ()}
MESH_SPEC = ("pad",)  # idle slots depend on the mesh (mesh.pad_sites), not the result: never fingerprinted
LATER_HYPER = {"lr_decay_start": 0, "revive_steps": 0, "revive_nudge": 0.0, "revive_auxk": 0.0, "revive_bias": False, "b_dec_init": "zero"}
TRANSCODER_SPEC = ("reads", "d_out", "skip")  # left out of SAE groups' fingerprints


def _without_later(d: dict, later: dict) -> dict:
    return {k: v for k, v in d.items() if not (k in later and v == later[k])}


def fingerprint(spec, hp, seed: int, source) -> dict:
    """Everything that changes a group's result: its spec and hyper-parameters, the seed, and what
    the rows are (the store manifest's sha256, or the synthetic source's parameters). Not the mesh
    (a run may resume on another), nor logging and checkpointing intervals."""
    spec_fp = {k: v for k, v in _without_later(dataclasses.asdict(spec), LATER_SPEC).items() if k not in MESH_SPEC}
    if not spec.transcoder:
        spec_fp = {k: v for k, v in spec_fp.items() if k not in TRANSCODER_SPEC}
    fp = {"spec": spec_fp, "hyper": _without_later(dataclasses.asdict(hp), LATER_HYPER), "seed": seed,
          "source": getattr(source, "identity", None)}
    return json.loads(json.dumps(fp))  # tuples as lists, as read back


def _changes(old, new, prefix="") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two fingerprints."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(set(old) | set(new)) for c in _changes(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def check_fingerprint(config, name: str, fp: dict) -> bool:
    """Whether group ``name``'s folder holds training started with ``fp``: True when it does, or when
    it holds nothing to resume. A checkpoint or final/ made with another fingerprint: WorkdirError
    naming the keys that differ and how to start afresh."""
    path = wd.fingerprint_path(config, name)
    started = os.path.isdir(wd.final_dir(config, name)) or bool(
        os.path.isdir(wd.checkpoint_dir(config, name)) and any(
            d.isdigit() for d in os.listdir(wd.checkpoint_dir(config, name))))
    if not started or not os.path.isfile(path):
        return True
    with open(path) as fh:
        old = json.load(fh)
    if old == fp:
        return True
    changes = _changes(old, fp)
    raise wd.WorkdirError(
        f"{wd.group_dir(config, name)} was trained with another config ({'; '.join(changes[:6])}"
        f"{'; ...' if len(changes) > 6 else ''}); to start this group afresh, move that folder away")


def _write_fingerprint(config, name: str, fp: dict) -> None:
    if jax.process_index() == 0:
        text = json.dumps(fp, indent=1)
        with files.atomic(wd.fingerprint_path(config, name), len(text), "w") as fh:
            fh.write(text)


def is_complete(config) -> bool:
    """Every group of the suite has its ``final/`` folder, trained with this config (``saejax run``
    then skips training; with another config the train stage runs and says what changed)."""
    try:
        source = make_source(config)
        plans = plan_groups(config, source) + ([clt_step.plan_clt(config, source)] if config.clt.enabled else [])
        return all(os.path.isdir(wd.final_dir(config, spec.name))
                   and check_fingerprint(config, spec.name, fingerprint(spec, hp, config.seed, source))
                   for spec, hp in plans)
    except Exception:  # noqa: BLE001 - no readable source, or another config: the train stage reports why
        return False


def run(config, dry_run: bool = False, planned_widths: dict | None = None) -> list[str]:
    """Train every group of the suite; return the folders of the finished groups.

    Mesh and group shapes are validated before anything compiles; ``dry_run`` prints each group's
    plan and memory (from shapes and shardings only) and reads no data. ``planned_widths`` (site ->
    width, from the harvest dry run) stands in for a store that does not exist yet.
    """
    store_missing = not os.path.isfile(wd.manifest_path(config))
    if dry_run and planned_widths and config.train.source != "synthetic" and store_missing:
        source = PlannedSource(planned_widths, cfg.layer_pools(config))
    else:
        source = make_source(config)
    n_devices = None  # set when this machine has fewer devices than the configured mesh (a dry run)
    try:
        n = math.prod(meshlib.mesh_shape(config.mesh, jax.device_count()))
    except meshlib.MeshError as e:
        if not dry_run:
            raise
        n = n_devices = meshlib.abstract_mesh(config.mesh).size  # plan for the slice's devices from here
        log(f"saejax train: {e}; the dry run plans for that mesh from its shape and compiles the step "
            f"on {n} virtual CPU devices")
    plans = plan_groups(config, source)
    clt_plan = clt_step.plan_clt(config, source) if config.clt.enabled else None
    every = plans + ([clt_plan] if clt_plan else [])  # the CLT trains after the groups, on its own mesh
    chip = cost.chiplib.get(config.mesh.target_chip)
    processes = max(1, n // chip.chips_per_host) if n_devices else jax.process_count()
    # mesh.plan: the configured meshes or the planner's; mesh.pad_sites: each group's idle slots.
    every, meshes = cost.plan_meshes(config, every, n, processes)
    plans = every[:len(plans)]
    for (spec, hp), sizes in zip(plans, meshes):
        meshlib.validate_group(sizes, spec.T, spec.width, hp.batch_size, n_devices=n,
                               process_count=1 if n_devices else None, name=spec.name)
    if clt_plan is not None:  # mesh.plan='fixed': the configured mesh, which must have stack 1
        clt_sizes = meshes[-1]
        if clt_sizes["stack"] != 1:
            raise meshlib.MeshError(f"mesh.stack={clt_sizes['stack']}: a CLT is one dictionary; use data and latent only")
        meshlib.validate_group(clt_sizes, 1, clt_plan[0].width, clt_plan[1].batch_size, n_devices=n,
                               process_count=1 if n_devices else None, name=clt_plan[0].name)
    if dry_run:
        # The real step compiled for each group's (and the CLT's) mesh (here, or on virtual CPU
        # devices in a subprocess): its FLOPs and collectives feed the cost model; nothing runs.
        programs = cost.measure_groups(every, meshes)
        for (spec, hp), sizes, prog in zip(every, meshes, programs):
            if not cost.is_clt(spec):
                log(_header(spec, hp, sizes))
                mem = state_memory(spec, hp, meshlib.abstract_mesh(sizes))
                if "temp_bytes" in prog:
                    mem["compiled_temp"] = prog["temp_bytes"]
                log(dry_run_report(spec, hp, mem))
                continue
            log(_clt_header(spec, hp, sizes))
            mem = clt_step.state_bytes(spec, hp, meshlib.abstract_mesh(sizes))
            if "temp_bytes" in prog:
                mem["compiled_temp"] = prog["temp_bytes"]
            log(f"[{spec.name}] dry run: {hp.total_steps} steps, {hp.total_steps * hp.batch_size:,} tokens; per device: "
                + ", ".join(f"{k} {v / 2 ** 20:,.1f} MiB" for k, v in mem.items())
                + f"; decoding {'sparse, cap ' + str(spec.active_cap) if spec.sparse else 'dense'}")
        for line in cost.report(config, every, meshes, programs):
            log(line)
        cost.check_memory(config, every, meshes)
        return []
    cost.check_memory(config, every, meshes)  # before anything compiles or writes
    with wd.stage_lock(config, "train"):
        prints = [fingerprint(spec, hp, config.seed, source) for spec, hp in plans]
        for (spec, _), fp in zip(plans, prints):  # every group, before any trains: a changed config is refused
            check_fingerprint(config, spec.name, fp)
        if clt_plan is not None:
            clt_fp = fingerprint(*clt_plan, config.seed, source)
            check_fingerprint(config, clt_plan[0].name, clt_fp)
        # Groups train one after another, each on its own mesh over the same devices: only one is live.
        done = [_train_one(config, spec, hp, fp, source, sizes)
                for (spec, hp), fp, sizes in zip(plans, prints, meshes)]
        if clt_plan is not None:
            done.append(_train_one(config, *clt_plan, clt_fp, source, meshes[-1], clt=True))
        return done


def _clt_header(spec, hp, sizes: dict) -> str:
    return (f"[{spec.name}] cross-layer transcoder over {spec.L} layers x {spec.width} latents, {hp.total_steps} "
            f"steps of {hp.batch_size} tokens ({hp.total_steps * hp.batch_size:,} tokens), mesh {dict(sizes)}")


def _header(spec, hp, sizes: dict) -> str:
    return (f"[{spec.name}] {_sites(spec)} x {spec.K} sweep members, {hp.total_steps} steps of "
            f"{hp.batch_size} tokens ({hp.total_steps * hp.batch_size:,} tokens), mesh {dict(sizes)}")


def _sites(spec) -> str:
    """``26 sites``, or with idle slots ``26 sites + 6 idle slots``."""
    return f"{spec.n_sites} sites" + (f" + {spec.pad} idle slot{'s' if spec.pad > 1 else ''}" if spec.pad else "")


def _train_one(config, spec, hp, fp, source, sizes: dict, clt: bool = False) -> str:
    """Train (or resume) one group (or the CLT) to its ``final/`` folder on its mesh ``sizes``; return that folder."""
    t, final = config.train, wd.final_dir(config, spec.name)
    log(_clt_header(spec, hp, sizes) if clt else _header(spec, hp, sizes))
    if os.path.isdir(final):
        log(f"[{spec.name}] already trained: {final}")
        return final
    os.makedirs(wd.group_dir(config, spec.name), exist_ok=True)
    _write_fingerprint(config, spec.name, fp)
    mesh = meshlib.make_mesh(sizes)
    with Tracker(config, f"train/{spec.name}") as tracker:
        trainer = clt_step.CLTTrainer(spec, hp, mesh, config.seed) if clt else None
        state = train_group(spec, hp, source, mesh, seed=config.seed, log_every=t.log_every,
                            log_path=wd.metrics_path(config, spec.name),
                            ckpt_dir=wd.checkpoint_dir(config, spec.name), checkpoint_every=t.checkpoint_every,
                            keep_checkpoints=t.keep_checkpoints, tracker=tracker, trainer=trainer)
    (clt_step.save_final if clt else save_final)(final, spec, hp, source, state)
    return final
