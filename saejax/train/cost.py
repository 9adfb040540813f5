"""The step cost model: what one train step of a group costs per device, projected on a target chip.

Read from the compiled program (``program``): the real jitted step (``Trainer.step``) compiled for
the planned mesh on concrete devices, with abstract inputs (``jax.ShapeDtypeStruct``), nothing run;
its FLOPs (dot ops) and collective bytes by kind per device per step, loop trip counts included
(saejax.train.hlo). A mesh of more devices than this process has is compiled in a subprocess with
that many virtual CPU devices (``measure``: XLA_FLAGS=--xla_force_host_platform_device_count=N must
be set before JAX starts).

From shapes (``hbm_bytes``, ``host_read_bytes``): HBM traffic (parameters read twice and written
once, gradients written and read, optimizer state read and written, and ``BM_PASSES`` elementwise
passes over each SAE's [B, M] block), and the bytes each host reads from the store per step.

``project`` turns them into step times on a chip (saejax/chips.py): compute (FLOPs x the bf16
passes of the matmul precision / bf16 peak), HBM, interconnect (bytes on the wire / ICI), summed
(no overlap inside the step) and their max (perfect overlap); the host read is a separate floor
(prefetched). ``design_comm`` is the design minimum of communication (docs/training.md), printed
beside the program's. ``propose`` is the mesh planner: one mesh for a set of groups;
``propose_padded`` adds the groups' idle slots (``mesh.pad_sites``); ``plan_meshes`` gives each
group its idle slots and its mesh (``mesh.plan``: the configured one, or the planner's per group).

Idle slots (GroupSpec.pad): every figure of the step (FLOPs, HBM, communication, memory, the time)
counts the slots, which is what the program does; the fraction of bf16 peak counts the useful work
only (the real sites' share of the FLOPs), and the store read the real sites' rows. A cross-layer transcoder (``is_clt``) is one more plan everywhere: on a data x latent mesh
(stack 1), its state from ``clt_step.state_bytes``, its step from the ``clt_*`` functions below.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time

from saejax import chips as chiplib
from saejax.mesh import AXES

# Unfused elementwise passes over one SAE's [B, M] fp32 block per step, by kind. jumprelu: write pre;
# read pre, write f; read f (decoder matmul); write g_f (decoder transpose matmul); read g_f and pre,
# write g_pre (threshold window sums and firing counts in the same pass); read g_pre (encoder
# gradient); read f (decoder gradient) = 10. relu the same without the threshold. topk/batchtopk: the
# top-k reads pre once more and the mask is written; AuxK reads pre, masks dead latents, takes its
# top-k and feeds its decoder (4 more) = 16.
BM_PASSES = {"jumprelu": 10, "relu": 10, "topk": 16, "batchtopk": 16}
PRECISION_PASSES = {"default": 1, "high": 3, "highest": 6}  # bf16 passes per fp32 matmul on a TPU
MIN_ROWS = 1024  # the planner shards data only while each device keeps at least this many rows


class PlanError(ValueError):
    """A plan that does not fit the target (device or host memory); the message names the key."""


def sizes_of(mesh_or_sizes) -> dict:
    """{axis: size} of a Mesh, an AbstractMesh, or a mapping (a dict, ``config.mesh``)."""
    if hasattr(mesh_or_sizes, "axis_names"):
        return {a: int(dict(mesh_or_sizes.shape).get(a, 1)) for a in AXES}
    return {a: int(mesh_or_sizes[a]) for a in AXES}


def each_group(plans, sizes) -> list[dict]:
    """One mesh per group: ``sizes`` is one mesh for every group (a mapping) or a list, one per group."""
    if isinstance(sizes, (list, tuple)):
        assert len(sizes) == len(plans), (len(sizes), len(plans))
        return [sizes_of(s) for s in sizes]
    return [sizes_of(sizes)] * len(plans)


def key(sizes: dict) -> tuple[int, int, int]:
    return tuple(int(sizes[a]) for a in AXES)


def matmul_passes(spec) -> int:
    """bf16 passes per matmul on a TPU: 1 with bf16 matmul inputs, else by the fp32 precision."""
    for key in ("matmul_dtype", "compute_dtype"):
        if getattr(spec, key, None) == "bfloat16":
            return 1
    return PRECISION_PASSES.get(spec.precision, 6)


# ---------------------------------------------------------------------------------------------
# The compiled program.


def is_clt(spec) -> bool:
    """Whether ``spec`` is a cross-layer transcoder (saejax.sae.clt.CLTSpec) rather than a group."""
    from saejax.sae.clt import CLTSpec
    return isinstance(spec, CLTSpec)


def program(spec, hp, mesh) -> dict:
    """Compile ``Trainer(spec, hp, mesh).step`` (a CLT: ``CLTTrainer``'s) with abstract inputs; its
    per-device counts."""
    import jax
    import numpy as np
    from saejax.train import hlo
    from saejax.train.clt_step import CLTTrainer
    from saejax.train.trainer import Trainer

    t0 = time.time()
    tr = (CLTTrainer if is_clt(spec) else Trainer)(spec, hp, mesh)
    st = jax.tree_util.tree_map(lambda v, h: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=h),
                                tr.abstract, tr.state_shardings)
    x = jax.ShapeDtypeStruct(tr.x_shape, np.float32, sharding=tr.x_sharding)
    if spec.transcoder:  # a transcoder's step takes its aligned (input, target) rows
        x = (x, jax.ShapeDtypeStruct(tr.y_shape, np.float32, sharding=tr.x_sharding))
    compiled = tr.step.lower(st, x).compile()
    text = compiled.as_text()
    out = {"flops": hlo.flops(text), "collectives": hlo.collectives(text),
           "received": hlo.collectives(text, size="result"), "compile_s": round(time.time() - t0, 2)}
    try:
        out["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports memory
        pass
    return out


def _to_json(spec, hp) -> list:
    return [dataclasses.asdict(spec), dataclasses.asdict(hp), "clt" if is_clt(spec) else "group"]


def _from_json(cls, d: dict):
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def measure(plans, sizes: dict, subprocess_only: bool = False) -> list[dict]:
    """``program`` of every (spec, hp) in ``plans`` on a mesh of ``sizes``: in this process when it
    has the devices, else (or with ``subprocess_only``) in one subprocess with that many virtual CPU
    devices."""
    import jax
    n = math.prod(sizes[a] for a in AXES)
    if jax.device_count() >= n and jax.process_count() == 1 and not subprocess_only:
        from saejax import mesh as meshlib
        mesh = meshlib.make_mesh(sizes, jax.devices()[:n])
        return [program(spec, hp, mesh) for spec, hp in plans]
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    env["JAX_PLATFORMS"] = "cpu"
    for key in ("SAEJAX_COORDINATOR", "SAEJAX_NUM_PROCESSES", "SAEJAX_PROCESS_ID"):
        env.pop(key, None)
    env["SAEJAX_DISTRIBUTED"] = "off"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    request = json.dumps({"sizes": sizes, "plans": [_to_json(s, h) for s, h in plans]})
    out = subprocess.run([sys.executable, "-m", "saejax.train.cost"], input=request, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cost model: compiling on {n} virtual devices failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_groups(plans, sizes) -> list[dict]:
    """``measure`` with one mesh per group (``each_group``): one compile (or subprocess) per distinct mesh."""
    meshes = each_group(plans, sizes)
    out: list = [None] * len(plans)
    for k in dict.fromkeys(key(s) for s in meshes):
        idx = [i for i, s in enumerate(meshes) if key(s) == k]
        for i, r in zip(idx, measure([plans[i] for i in idx], dict(zip(AXES, k)))):
            out[i] = r
    return out


def _worker() -> None:
    """``python -m saejax.train.cost``: a ``measure`` request on stdin, the results on stdout."""
    from saejax.sae.clt import CLTSpec
    from saejax.sae.group import GroupSpec
    from saejax.train import optim
    req = json.loads(sys.stdin.read())
    plans = [(_from_json(CLTSpec if kind == "clt" else GroupSpec, s), _from_json(optim.Hyper, h))
             for s, h, kind in req["plans"]]
    print(json.dumps(measure(plans, req["sizes"])))


# ---------------------------------------------------------------------------------------------
# From shapes.


def per_device(spec, hp, sizes: dict) -> dict:
    """What one device works on: SAEs (sites x members), rows and latents of each."""
    D, S, L = (sizes[a] for a in ("data", "stack", "latent"))
    return {"saes": spec.T // S * spec.K, "rows": hp.batch_size // D, "latents": spec.width // L}


def shape_flops(spec, hp, sizes: dict) -> float:
    """The design's dense work per device per step: 10 B d M per SAE (five matmuls)."""
    p = per_device(spec, hp, sizes)
    return 10.0 * p["saes"] * p["rows"] * spec.d * p["latents"]


def hbm_bytes(spec, hp, sizes: dict, mem: dict) -> float:
    """HBM bytes per device per step from shapes: params read twice (forward, backward) and written
    once, gradients written and read, optimizer state read and written, the kind's passes over
    [B, M] per SAE, and the batch read once per member. ``mem``: ``plan.state_memory``."""
    p = per_device(spec, hp, sizes)
    passes = BM_PASSES.get(spec.arch, BM_PASSES["jumprelu"])
    state = 5 * mem["params"] + 2 * mem["optimizer"] + 2 * mem["counters"]
    return state + p["saes"] * (passes * p["rows"] * p["latents"] * 4 + p["rows"] * spec.d * 4)


def host_block(spec, hp, sizes: dict, chips_per_host: int) -> tuple[int, int]:
    """(sites, rows) of the batch one host feeds: its chips' blocks of x [T, B, d] laid out
    P("stack", "data", None) over the mesh (devices process by process, the last axis fastest)."""
    D, S, L = (sizes[a] for a in ("data", "stack", "latent"))
    n = D * S * L
    per = min(chips_per_host, n)
    data, stack = set(), set()
    for i in range(per):
        di, rest = divmod(i, S * L)
        data.add(di)
        stack.add(rest // L)
    return spec.T // S * len(stack), hp.batch_size // D * len(data)


def host_read_bytes(spec, hp, sizes: dict, chip, itemsize: int) -> int:
    """Store bytes one host reads per step (its block of the batch at the store's dtype; real sites
    only: idle slots read nothing, and the first host's block holds the most real sites)."""
    sites, rows = host_block(spec, hp, sizes, chip.chips_per_host)
    return min(sites, spec.n_sites) * rows * spec.d * itemsize


def host_train_memory(spec, hp, sizes: dict, chip) -> int:
    """Host bytes of training batches per process: the reader's batch in hand plus 2 prefetched,
    and the normalized copy handed to the device (4 float32 blocks)."""
    sites, rows = host_block(spec, hp, sizes, chip.chips_per_host)
    return 4 * sites * rows * spec.d * 4


def design_comm(spec, hp, sizes: dict) -> dict:
    """The design minimum of communication per device per step, operand bytes by kind
    (docs/training.md), over the group's slots (idle ones included: the program reduces them too):
    data D shards all-reduce the gradients of their 1/L share; latent L shards
    all-reduce the decoder output [B/D, d] (AuxK: its own too) and gather top-k candidates."""
    D, L = sizes["data"], sizes["latent"]
    p = per_device(spec, hp, sizes)
    B, d, M = hp.batch_size, spec.d, spec.width
    out = {"all-reduce": 0.0, "all-gather": 0.0}
    topk = spec.arch in ("topk", "batchtopk")
    if D > 1:
        out["all-reduce"] += (2 * d * M + 2 * M + d) * 4 / L
        if spec.arch == "batchtopk":
            k = max(spec.sweep)
            out["all-gather"] += min(k * B, B * M / (D * L)) * 4
    if L > 1:
        out["all-reduce"] += (B / D) * d * 4 * (2 if topk else 1)
        if topk:
            k = max(spec.sweep) if spec.arch == "topk" else 0
            out["all-gather"] += (B / D) * (k + spec.auxk_k) * 4
    return {kind: v * p["saes"] for kind, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Projection.


def wire_bytes(collectives: dict, received: dict | None = None) -> float:
    """Bytes one device moves for its collectives: an all-reduce 2x its operand (reduce-scatter
    then all-gather), an all-gather what it receives, the others their operand."""
    received = received or collectives
    return sum(2 * v if k == "all-reduce" else received.get(k, v) if k == "all-gather" else v
               for k, v in collectives.items())


def project(chip, *, flops: float, passes: int, hbm: float, wire: float, host: float, useful: float = 1.0) -> dict:
    """Seconds per step on ``chip``: compute, HBM, interconnect, host read; summed (no overlap inside
    the step, the host read a floor beside it) and maxed (perfect overlap); the fraction of bf16 peak
    (the useful share ``useful`` of ``flops``, at one pass, over the step: a group's real sites over
    its slots) and the limiting resource."""
    t = {"compute": flops * passes / chip.bf16_flops, "HBM": hbm / chip.hbm_bw,
         "interconnect": wire / chip.ici, "host read": host / chip.host_read}
    serial = max(t["compute"] + t["HBM"] + t["interconnect"], t["host read"])
    overlap = max(t.values())
    useful = flops * useful / chip.bf16_flops
    inside = {k: t[k] for k in ("compute", "HBM", "interconnect")}
    limit = "host read" if t["host read"] > sum(inside.values()) else max(inside, key=inside.get)
    return {"times": t, "serial": serial, "overlap": overlap, "limit": limit,
            "fraction": useful / serial if serial else 0.0, "fraction_overlap": useful / overlap if overlap else 0.0}


def memory(spec, hp, sizes: dict) -> dict:
    """Per-device bytes on a mesh of ``sizes`` from shapes: a group's ``plan.state_memory``, a CLT's
    ``clt_step.state_bytes`` (both: params, optimizer, counters, activations)."""
    from saejax import mesh as meshlib
    if is_clt(spec):
        from saejax.train.clt_step import state_bytes
        return state_bytes(spec, hp, meshlib.abstract_mesh(sizes))
    from saejax.train.plan import state_memory
    return state_memory(spec, hp, meshlib.abstract_mesh(sizes))


def useful_share(spec) -> float:
    """The share of a group's work that is useful: real sites over slots (1 for a CLT)."""
    return 1.0 if is_clt(spec) else spec.n_sites / spec.T


def analytic(spec, hp, sizes: dict, chip, itemsize: int = 4, mem: dict | None = None) -> dict:
    """``project`` from shapes alone, with the design minimum of communication (the planner's model);
    a padded group's time counts its idle slots, its fraction of peak the real sites' work."""
    mem = mem or memory(spec, hp, sizes)
    if is_clt(spec):
        return project(chip, flops=clt_shape_flops(spec, hp, sizes), passes=matmul_passes(spec),
                       hbm=clt_hbm_bytes(spec, hp, sizes, mem), wire=wire_bytes(clt_design_comm(spec, hp, sizes)),
                       host=clt_host_read_bytes(spec, hp, sizes, chip, itemsize))
    comm = design_comm(spec, hp, sizes)
    return project(chip, flops=shape_flops(spec, hp, sizes), passes=matmul_passes(spec),
                   hbm=hbm_bytes(spec, hp, sizes, mem), wire=wire_bytes(comm),
                   host=host_read_bytes(spec, hp, sizes, chip, itemsize), useful=useful_share(spec))


def device_bytes(mem: dict) -> int:
    """A group's (or the CLT's) per-device peak: state plus one step's activations (``memory``)."""
    return int(mem["params"] + mem["optimizer"] + mem["counters"] + mem["activations"])


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def candidates(plans, n_devices: int, processes: int = 1) -> list[dict]:
    """Every mesh of ``n_devices`` that every group splits over (saejax.mesh.validate_group's rules;
    a CLT: stack 1)."""
    out = []
    for S in _divisors(n_devices):
        for L in _divisors(n_devices // S):
            D = n_devices // S // L
            if all((S == 1 if is_clt(spec) else spec.T % S == 0) and spec.width % L == 0 and hp.batch_size % D == 0
                   and hp.batch_size % processes == 0 for spec, hp in plans):
                out.append({"data": D, "stack": S, "latent": L})
    return out


def job_time(plans, sizes: dict, chip, itemsize: int = 4) -> tuple[float, int, list[dict]]:
    """(projected seconds of the whole job without overlap, peak device bytes, per-group projections)."""
    total, peak, per = 0.0, 0, []
    for spec, hp in plans:
        mem = memory(spec, hp, sizes)
        pr = analytic(spec, hp, sizes, chip, itemsize, mem)
        total += pr["serial"] * hp.total_steps
        peak = max(peak, device_bytes(mem))
        per.append(pr)
    return total, peak, per


def propose(plans, n_devices: int, chip, itemsize: int = 4, processes: int = 1,
            whole: bool = True) -> tuple[dict | None, dict]:
    """The mesh with the lowest projected job time (no overlap) that fits ``chip``'s memory, and
    every candidate's (time, peak). Data sharding only while a device keeps ``MIN_ROWS`` rows, latent
    sharding (with ``whole``) only when no mesh without it fits (each unless nothing else fits); ties
    go to more stack, then less latent, sharding."""
    table = {}
    for sizes in candidates(plans, n_devices, processes):
        t, peak, _ = job_time(plans, sizes, chip, itemsize)
        table[(sizes["data"], sizes["stack"], sizes["latent"])] = (t, peak)
    fits = {k: v for k, v in table.items() if v[1] <= chip.hbm}
    many = {k: v for k, v in fits.items() if min(hp.batch_size for _, hp in plans) // k[0] >= MIN_ROWS}
    pool = many or fits
    if whole:  # latent sharding only when nothing else fits
        pool = {k: v for k, v in pool.items() if k[2] == 1} or pool
    if not pool:
        return None, table
    best = min(pool, key=lambda k: (pool[k][0], -k[1], k[2]))
    return dict(zip(("data", "stack", "latent"), best)), table


def pad_plans(plans, multiple: int) -> list:
    """``plans`` with each group's idle slots (GroupSpec.pad) set so that its slots are the least
    multiple of ``multiple`` that holds its sites (1: none); a CLT as it is."""
    return [(p if is_clt(p) else dataclasses.replace(p, pad=-p.n_sites % multiple), hp) for p, hp in plans]


def propose_padded(plans, n_devices: int, chip, itemsize: int = 4, processes: int = 1, pad=0):
    """``propose`` with idle slots per ``mesh.pad_sites`` (``pad``): 0 none, N every group padded to a
    multiple of N; "auto": every padding to a multiple m of a divisor of ``n_devices`` is tried
    (``propose`` for each, without its preference for meshes without latent sharding) and the
    (padding, mesh) of least projected job time wins, its idle slots' work counted (ties: the fewest
    idle slots). Returns (the plans padded, the mesh or None, its table)."""
    if pad != "auto":
        plans = pad_plans(plans, int(pad) or 1)
        return (plans,) + propose(plans, n_devices, chip, itemsize, processes)
    best = None
    for m in (_divisors(n_devices) if not all(is_clt(p) for p, _ in plans) else [1]):
        padded = pad_plans(plans, m)
        mesh, table = propose(padded, n_devices, chip, itemsize, processes, whole=False)
        if mesh is None:
            continue
        rank = (table[key(mesh)][0], sum(p.pad for p, _ in padded if not is_clt(p)))
        if best is None or rank < best[0]:
            best = (rank, padded, mesh, table)
    if best is None:
        return pad_plans(plans, 1), None, {}
    return best[1:]


def plan_meshes(config, plans, n_devices: int, processes: int = 1) -> tuple[list, list[dict]]:
    """Each group's idle slots (``mesh.pad_sites``) and its mesh of ``n_devices``: (the plans padded,
    their meshes). ``mesh.plan = "fixed"``: the configured axes for every group (and pad_sites 0 or
    N); ``"auto"``: the planner's proposal (``propose_padded``) for that group alone (a CLT: among
    data x latent meshes, never padded). A group that no mesh of these devices splits and fits is a
    PlanError naming ``mesh.plan`` (a CLT: and its clt.* keys)."""
    from saejax import mesh as meshlib
    pad = config.mesh.get("pad_sites", 0)
    if config.mesh.plan == "fixed":
        return pad_plans(plans, int(pad) or 1), \
            [dict(zip(AXES, meshlib.mesh_shape(sizes_of(config.mesh), n_devices)))] * len(plans)
    chip = chiplib.get(config.mesh.target_chip)
    out, padded = [], []
    for spec, hp in plans:
        (p,), best, _ = propose_padded([(spec, hp)], n_devices, chip, store_itemsize(config) or 4, processes, pad)
        spec = p[0]
        if best is None and is_clt(spec):
            raise PlanError(f"mesh.plan='auto': no data x latent mesh of {n_devices} devices splits the CLT "
                            f"{spec.name} ({spec.L} layers, clt.width={spec.width}, train.batch_size={hp.batch_size} "
                            f"over {processes} processes) and fits a {chip.name} chip's {_gib(chip.hbm)} "
                            f"(mesh.target_chip); narrow it (clt.width, clt.layers)")
        if best is None:
            raise PlanError(f"mesh.plan='auto': no mesh of {n_devices} devices splits group {spec.name} "
                            f"({spec.n_sites} sites, width {spec.width}, train.batch_size={hp.batch_size} over "
                            f"{processes} processes) and fits a {chip.name} chip's {_gib(chip.hbm)} "
                            f"(mesh.target_chip)")
        out.append(best)
        padded.append(p)
    return padded, out


if __name__ == "__main__":
    _worker()


# ---------------------------------------------------------------------------------------------
# The dry run's report.


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:,.2f} GiB"


def _mb(n: float) -> str:
    return f"{n / 2 ** 20:,.1f} MiB"


def _ms(s: float) -> str:
    return f"{s * 1e3:,.2f} ms"


def store_itemsize(config) -> int:
    """Bytes per stored value the train stage reads (0: a synthetic source reads nothing)."""
    if config.train.source == "synthetic":
        return 0
    return {"float32": 4, "bfloat16": 2, "float16": 2}[config.harvest.dtype]


def memory_plan(config, plans, sizes: dict) -> dict:
    """The job's memory on the target chip, from shapes alone: each group's per-device bytes, the
    peak over the job (groups train one after another, each freed before the next starts), and each
    process's host bytes of training batches. What the dry run prints and the config docstrings quote.
    ``sizes``: one mesh for every group, or a list of one per group (``each_group``). A CLT is one
    more entry of "groups" (its own mesh, trained after the groups)."""
    chip = chiplib.get(config.mesh.target_chip)
    groups = {}
    for (spec, hp), sz in zip(plans, each_group(plans, sizes)):
        mem = memory(spec, hp, sz)
        host = (4 * clt_host_read_bytes(spec, hp, sz, chip, 4) if is_clt(spec)  # 4 float32 blocks, as a group's
                else host_train_memory(spec, hp, sz, chip))
        groups[spec.name] = {"device": device_bytes(mem), "host": host, "mem": mem, "sizes": sz,
                             "clt": is_clt(spec)}
    peak = max(groups, key=lambda g: groups[g]["device"])
    host = max(groups, key=lambda g: groups[g]["host"])
    return {"chip": chip, "groups": groups, "peak": groups[peak]["device"], "peak_group": peak,
            "host": groups[host]["host"], "host_group": host}


def check_memory(config, plans, sizes: dict) -> dict:
    """``memory_plan``; a PlanError naming the key when the peak exceeds the target chip's device
    memory or one process's host memory."""
    m = memory_plan(config, plans, sizes)
    chip = m["chip"]
    if m["peak"] > chip.hbm and m["groups"][m["peak_group"]]["clt"]:
        raise PlanError(f"mesh {m['groups'][m['peak_group']]['sizes']}: the CLT {m['peak_group']} needs {_gib(m['peak'])} "
                        f"per device, more than a {chip.name} chip's {_gib(chip.hbm)} (mesh.target_chip); split its "
                        f"latents more (mesh.latent, or mesh.plan='auto') or narrow it (clt.width, clt.layers)")
    if m["peak"] > chip.hbm:
        raise PlanError(f"mesh {m['groups'][m['peak_group']]['sizes']}: group {m['peak_group']} needs {_gib(m['peak'])} per device, more than "
                        f"a {chip.name} chip's {_gib(chip.hbm)} (mesh.target_chip); shard more (mesh.latent, "
                        f"mesh.stack) or train fewer layers per job (see the config's variants)")
    if m["host"] > chip.host_memory:
        raise PlanError(f"mesh {m['groups'][m['host_group']]['sizes']}: group {m['host_group']} holds {_gib(m['host'])} of batches per "
                        f"process, more than a {chip.name} host's {_gib(chip.host_memory)} (mesh.target_chip); "
                        f"lower train.batch_size")
    return m


def report(config, plans, sizes, programs: list[dict] | None) -> list[str]:
    """The dry run's cost lines: per group the program's counts (or, without ``programs``, the
    design's), the design minimum of communication, the projection on the target chip; then the
    job's memory peak and the planner's proposals (one mesh for every group; one per group) against
    the configured meshes. ``sizes``: one mesh for every group, or one per group (``each_group``)."""
    chip = chiplib.get(config.mesh.target_chip)
    itemsize = store_itemsize(config)
    meshes = each_group(plans, sizes)
    mem_plan = memory_plan(config, plans, meshes)
    lines = []
    for i, ((spec, hp), sz) in enumerate(zip(plans, meshes)):
        if is_clt(spec):
            lines += clt_report(config, spec, hp, sz, programs[i] if programs else None)
            continue
        mem = mem_plan["groups"][spec.name]["mem"]
        lines += _cost_lines(spec.name, chip, hp.total_steps, programs[i] if programs else None,
                             flops=shape_flops(spec, hp, sz), passes=matmul_passes(spec),
                             hbm=hbm_bytes(spec, hp, sz, mem), design=design_comm(spec, hp, sz),
                             host=host_read_bytes(spec, hp, sz, chip, itemsize), useful=useful_share(spec))
    clts = [g for g, v in mem_plan["groups"].items() if v["clt"]]
    what = ("the CLT " if mem_plan["groups"][mem_plan["peak_group"]]["clt"] else "group ") + mem_plan["peak_group"]
    lines.append(f"job peak per device: {_gib(mem_plan['peak'])} ({what}; each group's "
                 f"state is freed before the next starts) of a {chip.name} chip's {_gib(chip.hbm)}; host: "
                 f"{_gib(mem_plan['host'])} of batches per process of {_gib(chip.host_memory)}"
                 + "".join(f"; the CLT {g}: {_gib(mem_plan['groups'][g]['device'])} per device on "
                           f"{mem_plan['groups'][g]['sizes']}" for g in clts))
    n = math.prod(meshes[0].values())
    it, procs = itemsize or 4, max(1, n // chip.chips_per_host)
    pad = config.mesh.get("pad_sites", 0)
    one, best, table = propose_padded(plans, n, chip, it, procs, pad)
    per_plans, per = [], []
    for p in plans:
        (q,), m, _ = propose_padded([p], n, chip, it, procs, pad)
        per_plans.append(q)
        per.append(m)
    here = meshes_time(plans, meshes, chip, it)
    head = f"mesh planner ({n} {chip.name} chips): "
    if best is None:
        head += "no one mesh for every group fits"
        ref = None
    else:
        ref = table[key(best)][0]
        head += (f"one mesh for every group {best}{_idle(one)}, projected {ref / 3600:,.2f} h for the job without overlap "
                 f"(peak {_gib(table[key(best)][1])})")
    if all(per):
        t_per, peak_per = meshes_time(per_plans, per, chip, it)
        ref = t_per if ref is None else min(ref, t_per)
        head += (f"; per group (mesh.plan='auto'): "
                 + ", ".join(f"{spec.name} {m}{_idle([(spec, None)])}" for (spec, _), m in zip(per_plans, per))
                 + f", projected {t_per / 3600:,.2f} h (peak {_gib(peak_per)})")
    else:
        head += "; per group: " + ", ".join(spec.name for (spec, _), m in zip(plans, per) if m is None) + " fits no mesh"
    if ref:
        head += f"; the configured meshes (mesh.plan={config.mesh.plan!r}): {here[0] / ref:.2f}x the best projection"
    lines.append(head)
    return lines


def _idle(plans) -> str:
    """`` (with N idle slots)`` for the groups of ``plans`` that have any; else ''."""
    n = sum(p.pad for p, _ in plans if not is_clt(p))
    return f" (with {n} idle slot{'s' if n > 1 else ''})" if n else ""


def _cost_lines(name: str, chip, steps: int, prog: dict | None, *, flops: float, passes: int, hbm: float,
                design: dict, host: float, useful: float = 1.0) -> list[str]:
    """Two lines of the dry run for one group (or the CLT): the program's counts (without ``prog``:
    the design's) beside the design's, then the projection on ``chip`` and its limit. ``flops``:
    the design's dense work; ``useful``: its useful share (a padded group's real sites over slots),
    what the fraction of bf16 peak counts."""
    coll = prog["collectives"] if prog else design
    got = prog["flops"] if prog else flops
    pr = project(chip, flops=got, passes=passes, hbm=hbm,
                 wire=wire_bytes(coll, prog["received"] if prog else None), host=host, useful=useful)
    shown = lambda c: ", ".join(f"{k} {_mb(v)}" for k, v in c.items() if v) or "none"  # noqa: E731
    what = (f"compiled program ({prog['compile_s']:.1f} s to compile)" if prog else "from shapes (not compiled)")
    t = pr["times"]
    return [f"[{name}] step cost per device, {what}: {got / 1e12:,.3f} TFLOP "
            f"(design {flops / 1e12:,.3f}; x{passes} bf16 passes), "
            f"HBM {_gib(hbm)}, collectives: {shown(coll)} "
            f"(design minimum: {shown(design)}); store reads {_mb(host)} per host per step",
            f"[{name}] projected on {chip.name}: compute {_ms(t['compute'])} + HBM {_ms(t['HBM'])} + "
            f"interconnect {_ms(t['interconnect'])} = {_ms(pr['serial'])} per step without overlap "
            f"({pr['fraction']:.1%} of bf16 peak{'' if useful == 1 else ' in useful work'}), "
            f"{_ms(pr['overlap'])} with perfect overlap "
            f"({pr['fraction_overlap']:.1%}); host read {_ms(t['host read'])} (a floor, prefetched); "
            f"limited by {pr['limit']}; {pr['serial'] * steps / 3600:,.2f} h for {steps} steps"]


def meshes_time(plans, meshes, chip, itemsize: int = 4) -> tuple[float, int]:
    """(projected seconds of the job without overlap, peak device bytes) with group i on ``meshes[i]``."""
    total, peak = 0.0, 0
    for p, sz in zip(plans, meshes):
        t, pk, _ = job_time([p], sz, chip, itemsize)
        total, peak = total + t, max(peak, pk)
    return total, peak


# ---------------------------------------------------------------------------------------------
# A cross-layer transcoder (saejax.sae.clt; its step: saejax.train.clt_step). One dictionary over
# L layers on a data x latent mesh (stack 1); its batch x [2L, B, d] is laid out P(None, "data", None).

CLT_BM_PASSES = {"jumprelu": 10, "relu": 10, "topk": 12, "batchtopk": 12}  # BM_PASSES without AuxK's 4


def clt_blocks(spec) -> int:
    """P = L(L+1)/2 decoder blocks (layer l to every l' >= l)."""
    return spec.L * (spec.L + 1) // 2


def clt_shape_flops(spec, hp, sizes: dict) -> float:
    """The design's work per device per step: per layer the encoder forward and its weight gradient
    (2 matmuls of B d_in M), per decoder block its forward, weight gradient and the latents'
    gradient (3 matmuls of B M d_out; sparse decoding: B c d_out, c the latent shard's own cap,
    ``clt.shard_cap``, n times that with n Matryoshka prefixes: each gathered row meets the n
    blocks' outputs; dense decoding cuts the latents at the blocks, one decode's FLOPs)."""
    from saejax.sae.clt import shard_cap
    B, M = hp.batch_size // sizes["data"], spec.width // sizes["latent"]
    dec = shard_cap(spec, sizes["latent"]) * max(1, len(spec.matryoshka)) if spec.sparse else M
    return 2.0 * B * (2 * spec.L * spec.d_in * M + 3 * clt_blocks(spec) * dec * spec.d_out)


def clt_hbm_bytes(spec, hp, sizes: dict, mem: dict) -> float:
    """HBM bytes per device per step from shapes: the state as for a group (``hbm_bytes``), the
    kind's passes over each layer's [B, M] (``CLT_BM_PASSES``), the batch [2L, B, d] read once, and
    each decoder block's output [B, d_out] written forward and its gradient read backward.
    ``mem``: ``clt_step.state_bytes``."""
    B, M = hp.batch_size // sizes["data"], spec.width // sizes["latent"]
    passes = CLT_BM_PASSES.get(spec.arch, CLT_BM_PASSES["jumprelu"])
    state = 5 * mem["params"] + 2 * mem["optimizer"] + 2 * mem["counters"]
    return state + 4 * B * (spec.L * passes * M + spec.L * (spec.d_in + spec.d_out)
                            + 2 * clt_blocks(spec) * spec.d_out)


def clt_host_read_bytes(spec, hp, sizes: dict, chip, itemsize: int) -> int:
    """Store bytes one host reads per step: every CLT site (mlp_in.l and mlp.l) of its chips' rows."""
    per = min(chip.chips_per_host, math.prod(sizes[a] for a in AXES))
    data = {i // (sizes["stack"] * sizes["latent"]) for i in range(per)}
    return hp.batch_size // sizes["data"] * len(data) * spec.L * (spec.d_in + spec.d_out) * itemsize


def clt_design_comm(spec, hp, sizes: dict) -> dict:
    """The design minimum of communication of a CLT's step per device, operand bytes by kind: data D
    shards all-reduce the gradients of their 1/L_shards share of the parameters and which of those
    latents fired ([L, M / L_shards], the dead-latent counters); latent shards all-reduce the decoder
    output [L, B/D, d_out] (n of them with n Matryoshka prefixes; TopK gathers [B/D, k] candidates
    per layer); BatchTopK on any split gathers its candidates per layer over data x latent."""
    D, Ls = sizes["data"], sizes["latent"]
    B, L, M = hp.batch_size, spec.L, spec.width
    out = {"all-reduce": 0.0, "all-gather": 0.0}
    if D > 1:
        n = L * spec.d_in * M + clt_blocks(spec) * M * spec.d_out + L * M * (2 if spec.arch == "jumprelu" else 1) \
            + L * spec.d_out + L * M
        out["all-reduce"] += n * 4 / Ls
    if spec.arch == "batchtopk" and D * Ls > 1:
        out["all-gather"] += L * min(spec.k * B, B * M / (D * Ls)) * 4
    if Ls > 1:
        out["all-reduce"] += max(1, len(spec.matryoshka)) * L * (B / D) * spec.d_out * 4
        if spec.arch == "topk":
            out["all-gather"] += L * (B / D) * spec.k * 4
    return out


def clt_report(config, spec, hp, sizes: dict, prog: dict | None) -> list[str]:
    """The dry run's cost lines for the CLT on its mesh ``sizes`` (``prog``: ``measure`` of its step),
    as ``report``'s for a group (``report`` calls it for a CLT among its plans)."""
    chip = chiplib.get(config.mesh.target_chip)
    mem = memory(spec, hp, sizes)
    return _cost_lines(spec.name, chip, hp.total_steps, prog, flops=clt_shape_flops(spec, hp, sizes),
                       passes=matmul_passes(spec), hbm=clt_hbm_bytes(spec, hp, sizes, mem),
                       design=clt_design_comm(spec, hp, sizes),
                       host=clt_host_read_bytes(spec, hp, sizes, chip, store_itemsize(config)))
