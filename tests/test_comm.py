"""The compiled train step communicates at the design minimum (docs/training.md, communication).

Each case compiles (does not run) one group's step on 8 virtual CPU devices and reads the
collective bytes per device per step from the compiled HLO (saejax.train.hlo: operand bytes times
loop trip counts). The minimum is computed here from the shapes, independently of the step:

    stack only   nothing (small [M] and [d] reductions for metrics aside)
    data D       one all-reduce of the gradients: (2dM + 2M + d) x 4 / L bytes
    latent L     the decoder output [B/D, d]; TopK/BatchTopK: AuxK's output [B/D, d] too, and the
                 candidates [B/D, k] (TopK) and [B/D, auxk_k] (AuxK) gathered
    BatchTopK    candidates min(k B, B M / (D L)) gathered over data x latent
    mixed        the sum, with the data term on the 1/L shard

A case passes within 1.1x of the minimum plus 64 KiB per SAE on the device (the issue allows
1 MiB; at these shapes a regression such as one gradient all-reduce per row block, or a [B, M]
gather, stays under 1 MiB per SAE, so the slack is tighter). JumpReLU runs with four or more row
blocks (``ROW_BLOCK_BYTES`` lowered), so that a reduction inside the block scan would show.
"""
import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from saejax import mesh as meshlib
from saejax.sae import jumprelu as jr
from saejax.sae import sharded
from saejax.sae.group import GroupSpec
from saejax.train import hlo, optim
from saejax.train.trainer import Trainer

d, M, B, T = 64, 512, 1024, 8
AUXK = 32
MESHES = {"stack": dict(data=1, stack=8, latent=1), "data": dict(data=8, stack=1, latent=1),
          "latent": dict(data=1, stack=1, latent=8), "mixed": dict(data=2, stack=2, latent=2)}
SLACK = 64 << 10  # bytes per SAE on a device


def _spec(arch, d=d, M=M, sites=T, sweep=None):
    if sweep is None:
        sweep = (8.0, 16.0) if arch != "jumprelu" else (0.003, 0.01)
    return GroupSpec(arch=arch, sites=tuple(f"res.{i}" for i in range(sites)), d=d, width=M, sweep=sweep,
                     auxk_k=AUXK)


def compiled_bytes(spec, batch, mesh):
    """Collective bytes by kind per device per step of ``spec``'s compiled step on ``mesh``."""
    t = Trainer(spec, optim.Hyper(total_steps=10, batch_size=batch), mesh)
    st = jax.tree_util.tree_map(lambda v, h: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=h),
                                t.abstract, t.state_shardings)
    x = jax.ShapeDtypeStruct(t.x_shape, np.float32, sharding=t.x_sharding)
    return hlo.collectives(t.step.lower(st, x).compile().as_text())


def design_minimum(arch, sizes, d, M, B, ks):
    """Bytes per SAE per step by the table above, for each member's k in ``ks`` (a list, one per SAE)."""
    D, L = sizes["data"], sizes["latent"]
    out = []
    for k in ks:
        n = 0
        if D > 1:
            n += (2 * d * M + 2 * M + d) * 4 // L
        if L > 1:
            n += (B // D) * d * 4  # decoder output
            if arch in ("topk", "batchtopk"):
                n += (B // D) * d * 4 + (B // D) * AUXK * 4  # AuxK's output and candidates
            if arch == "topk":
                n += (B // D) * k * 4
        if arch == "batchtopk" and D * L > 1:
            n += min(k * B, B * M // (D * L)) * 4
        out.append(n)
    return out


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("arch", ["jumprelu", "topk", "batchtopk"])
def test_step_collectives_at_design_minimum(arch, mesh_name, monkeypatch):
    sizes = MESHES[mesh_name]
    mesh = meshlib.make_mesh(sizes, jax.devices()[:8])
    spec = _spec(arch)
    monkeypatch.setattr(jr, "ROW_BLOCK_BYTES", 1 << 16)
    if arch == "jumprelu":
        with sharded.use_mesh(mesh):
            assert jr.row_block_count(B, M) >= 4
    got = compiled_bytes(spec, B, mesh)
    per_device = spec.K * spec.T // sizes["stack"]  # SAEs each device trains
    ks = [int(k) for k in spec.sweep] * (spec.T // sizes["stack"])
    need = sum(design_minimum(arch, sizes, d, M, B, ks))
    total = sum(got.values())
    assert total <= 1.1 * need + SLACK * per_device, (got, need)
    if sizes["latent"] == 1 and arch != "batchtopk":
        assert got["all-gather"] <= SLACK * per_device, got  # no activation gathers without latent sharding


_GEMMA_2B = """
import jax, numpy as np
from saejax import mesh as meshlib
from saejax.train import hlo, optim
from saejax.train.trainer import Trainer
from saejax.sae.group import GroupSpec
spec = GroupSpec(arch="jumprelu", sites=("res.0", "res.1"), d=2304, width=16384, sweep=(0.001,))
mesh = meshlib.make_mesh(dict(data=8, stack=2, latent=4), jax.devices())
t = Trainer(spec, optim.Hyper(total_steps=10, batch_size=4096), mesh)
st = jax.tree_util.tree_map(lambda v, h: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=h), t.abstract,
                            t.state_shardings)
x = jax.ShapeDtypeStruct(t.x_shape, np.float32, sharding=t.x_sharding)
print(hlo.collectives(t.step.lower(st, x).compile().as_text())["all-reduce"])
"""


def test_gemma2_2b_shapes_compile_on_64_devices():
    """Gemma 2 2B's 16k group on experiments/gemma2_2b.py's mesh (data 8 x stack 2 x latent 4),
    compiled for 64 virtual devices in a subprocess: one SAE per device, at the design minimum."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=64", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_GEMMA_2B)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = int(r.stdout.strip().splitlines()[-1])
    need = design_minimum("jumprelu", dict(data=8, stack=2, latent=4), 2304, 16384, 4096, [0])[0]
    assert need <= got <= 1.1 * need + SLACK, (got, need)


# A cross-layer transcoder's step (saejax.train.clt_step, one dictionary over Lc layers, stack 1). Its
# minimum, from the shapes (P = Lc(Lc+1)/2 decoder blocks, D data and S latent shards):
#     data D     one all-reduce of the gradients and the fired flags: (Lc d M + P M d + Lc M (jumprelu 3,
#                else 2) + Lc d) x 4 / S
#     latent S   the decoder output [Lc, B/D, d] summed over the source layers first; TopK: the
#                candidates [Lc, B/D, k] gathered
#     BatchTopK  candidates Lc min(k B, B M / (D S)) gathered over data x latent
CLT_MESHES = {"data": dict(data=8, stack=1, latent=1), "latent": dict(data=1, stack=1, latent=8),
              "mixed": dict(data=2, stack=1, latent=4)}
CLT_CASES = {"jumprelu-dense": ("jumprelu", "dense"), "jumprelu-sparse": ("jumprelu", "sparse"),
             "topk-sparse": ("topk", "sparse"), "batchtopk-dense": ("batchtopk", "dense"),
             # Matryoshka prefixes (boundaries inside latent shards): n partial outputs summed over latent
             "jumprelu-sparse-matryoshka": ("jumprelu", "sparse", (64, 200, 512)),
             "topk-dense-matryoshka": ("topk", "dense", (100, 512))}


def clt_minimum(arch, sizes, Lc, d, M, B, k, prefixes=1):
    D, S = sizes["data"], sizes["latent"]
    P = Lc * (Lc + 1) // 2
    n = 0
    if D > 1:
        n += (Lc * d * M + P * M * d + Lc * M * (3 if arch == "jumprelu" else 2) + Lc * d) * 4 // S
    if S > 1:
        n += prefixes * Lc * (B // D) * d * 4 + (Lc * (B // D) * k * 4 if arch == "topk" else 0)
    if arch == "batchtopk" and D * S > 1:
        n += Lc * min(k * B, B * M // (D * S)) * 4
    return n


@pytest.mark.parametrize("mesh_name", list(CLT_MESHES))
@pytest.mark.parametrize("case", list(CLT_CASES))
def test_clt_step_collectives_at_design_minimum(case, mesh_name):
    """The CLT step compiled on 8 virtual devices moves at most 1.1x its design minimum
    (cost.clt_design_comm, equal to the table above) plus 64 KiB (the issue allows 1 MiB; before the
    step ran in shard_map, XLA all-reduced each decoder block's output, 2.5x on the latent mesh, and
    the sparse decoding's W_dec gradient in every row block, 320x). The sparse decoding runs in four
    or more row blocks, so that a reduction inside its scan would show."""
    from saejax.sae import clt
    from saejax.train import cost
    from saejax.train.clt_step import CLTTrainer
    arch, decode, *mat = CLT_CASES[case]
    mat = tuple(mat[0]) if mat else ()
    sizes = CLT_MESHES[mesh_name]
    Lc, dd, MM, BB, k = 4, 64, 512, 512, 8
    spec = clt.CLTSpec(arch=arch, layers=tuple(range(Lc)), d_in=dd, d_out=dd, width=MM,
                       sparsity=0.01 if arch == "jumprelu" else float(k), cap=64 if arch == "jumprelu" else 0,
                       decode=decode, block_bytes=1 << 16, matryoshka=mat)
    hp = optim.Hyper(total_steps=10, batch_size=BB)
    rows = BB // sizes["data"]
    if decode == "sparse":
        assert rows // clt.row_block(spec, rows, clt.shard_cap(spec, sizes["latent"])) >= 4
    t = CLTTrainer(spec, hp, meshlib.make_mesh(sizes, jax.devices()[:8]))
    st = jax.tree_util.tree_map(lambda v, h: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=h),
                                t.abstract, t.state_shardings)
    got = hlo.collectives(t.step.lower(st, jax.ShapeDtypeStruct(t.x_shape, np.float32, sharding=t.x_sharding))
                          .compile().as_text())
    need = clt_minimum(arch, sizes, Lc, dd, MM, BB, k, max(1, len(mat)))
    assert sum(cost.clt_design_comm(spec, hp, sizes).values()) == need
    assert need <= sum(got.values()) <= 1.1 * need + SLACK, (got, need)


@pytest.mark.parametrize("sizes", [dict(data=1, stack=8, latent=1), dict(data=2, stack=4, latent=1),
                                   dict(data=1, stack=4, latent=2)], ids=["stack", "data", "latent"])
def test_padded_group_collectives_at_design_minimum(sizes):
    """6 sites + 2 idle slots (GroupSpec.pad) on 8 devices: the idle slots are reduced like real SAEs
    (the program does that work), so the minimum counts the 8 slots, and the step stays within the
    same bound of it as an unpadded group; cost.design_comm counts the slots too."""
    from saejax.train import cost
    mesh = meshlib.make_mesh(sizes, jax.devices()[:8])
    spec = dataclasses.replace(_spec("jumprelu", sites=6), pad=2)
    got = compiled_bytes(spec, B, mesh)
    per_device = spec.K * spec.T // sizes["stack"]
    need = sum(design_minimum("jumprelu", sizes, d, M, B, [0] * per_device))
    assert sum(cost.design_comm(spec, optim.Hyper(total_steps=10, batch_size=B), sizes).values()) == need
    total = sum(got.values())
    assert total <= 1.1 * need + SLACK * per_device, (got, need)
    if need:
        assert total >= need, (got, need)
