"""Training on a device mesh gives the single-device result (8 virtual CPU devices, conftest.py).

Meshes: one device; (data 2 x latent 4), where TopK/BatchTopK thresholds go through the two-stage
top-k of saejax.sae.sharded; (stack 4 x data 2), where each device holds one site's SAEs;
(stack 2 x data 2 x latent 2), where each device holds two sites' SAEs and the step loops over them.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import config as cfg
from saejax import mesh as meshlib
from saejax.data.synthetic import SyntheticSource
from saejax.sae import sharded
from saejax.sae.group import GroupSpec
from saejax.train import loop, optim
from saejax.train.step import losses
from saejax.train.trainer import Trainer, norm_scales, to_host

SITES = tuple(f"res.{i}" for i in range(4))
MESHES = {
    "one": (dict(data=1, stack=1, latent=1), 1),
    "data2_latent4": (dict(data=2, stack=1, latent=4), 8),
    "stack4_data2": (dict(data=2, stack=4, latent=1), 8),
    # Two sites per stack shard: the step's scan over sites (step.scan_saes) runs on a sharded stack.
    "stack2_data2_latent2": (dict(data=2, stack=2, latent=2), 8),
}


def _mesh(name):
    sizes, n = MESHES[name]
    return meshlib.make_mesh(sizes, jax.devices()[:n])


def _source():
    return SyntheticSource(SITES, d=32, n_features=128, active=4, seed=0)


def _spec(arch):
    """``arch``, or ``arch:matryoshka``: prefixes 20 and 48 of 128 latents fall inside the 32-latent
    shards of latent 4 (and the 64 of latent 2)."""
    arch, _, variant = arch.partition(":")
    sparsity = (4.0, 12.0) if arch in ("topk", "batchtopk") else (0.003, 0.01)
    return GroupSpec(arch=arch, sites=SITES, d=32, width=128, sweep=sparsity, auxk_k=32,
                     matryoshka=(20, 48, 128) if variant else ())


def _hp(steps=100, **kw):
    return optim.Hyper(total_steps=steps, batch_size=256, lr=1e-3, lr_warmup=5, sparsity_warmup=30,
                       dead_steps=20, **kw)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _one_step(spec, hp, src, name):
    """(gradient of the group loss, state after one train step, metrics) on mesh ``name``."""
    t = Trainer(spec, hp, _mesh(name))
    x = t.put_batch(t.local_batch(src, 0, norm_scales(src, SITES)))
    state = t.init_state()

    def grad(st, xb):
        with sharded.use_mesh(t.mesh):
            return jax.grad(lambda p: losses(spec, hp, p, st, xb)[0])(st["params"])

    g = jax.jit(grad, in_shardings=(t.state_shardings, t.x_sharding))(state, x)
    g = to_host(g)
    new, m = t.step(state, x)
    return g, to_host(new), to_host(m)


@pytest.mark.parametrize("arch", ["jumprelu", "topk", "batchtopk", "jumprelu:matryoshka", "batchtopk:matryoshka"])
def test_one_step_update_matches_one_device(arch):
    spec, hp, src = _spec(arch), _hp(), _source()
    ref_g, ref, ref_m = _one_step(spec, hp, src, "one")
    for name in ("data2_latent4", "stack4_data2", "stack2_data2_latent2"):
        g, new, m = _one_step(spec, hp, src, name)
        for k in ref_g:  # the update direction: gradients agree to 1e-5 relative
            assert _rel(g[k], ref_g[k]) <= 1e-5, (name, k, _rel(g[k], ref_g[k]))
        # The Adam step itself. Its first update is lr * g / (|g| + eps), a sign function for
        # |g| >> eps = 1e-8: a latent whose gradient sums to rounding level (~1e-10) may step by
        # up to lr/100 either way, so parameters get an absolute slack of lr/100.
        for path, leaf in jax.tree_util.tree_leaves_with_path(new):
            want = dict(jax.tree_util.tree_leaves_with_path(ref))[path]
            if leaf.dtype.kind == "f":
                np.testing.assert_allclose(leaf, want, rtol=1e-5, atol=hp.lr / 100,
                                           err_msg=f"{name} {jax.tree_util.keystr(path)}")
            else:
                assert np.array_equal(leaf, want), (name, jax.tree_util.keystr(path))
        np.testing.assert_array_equal(m["l0"], ref_m["l0"])  # the same latents fired
    assert max(_rel(ref["params"][k], 0 * ref["params"][k] + 1e-30) for k in ("b_enc",)) > 0  # it moved
    assert np.abs(ref_g["W_enc"]).max() > 1e-4


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_hundred_steps_same_l0_and_fvu(arch):
    spec, hp, src = _spec(arch), _hp(100), _source()
    final = {}
    for name in ("one", "data2_latent4", "stack4_data2"):
        mesh = _mesh(name)
        state = loop.train_group(spec, hp, src, mesh, progress=False, log_every=100)
        # L0 and FVU of every SAE on the same fresh batch (a step training never saw).
        t = Trainer(spec, dataclasses.replace(hp, total_steps=10 ** 6), mesh)
        _, m = t.step(state, t.put_batch(t.local_batch(src, 10 ** 5, norm_scales(src, SITES))))
        final[name] = {k: np.asarray(m[k]) for k in ("l0", "fvu")}
    assert final["one"]["fvu"].max() < 0.9  # it trained
    for name in ("data2_latent4", "stack4_data2"):
        for k in ("l0", "fvu"):
            np.testing.assert_allclose(final[name][k], final["one"][k], rtol=0.02, err_msg=f"{name} {k}")


@pytest.mark.parametrize("ks", [(1,), (3, 17), (40,)])
def test_two_stage_topk_is_exact(ks):
    mesh = _mesh("data2_latent4")
    rng = np.random.default_rng(0)
    pre = rng.standard_normal((2, len(ks), 16, 64)).astype(np.float32)
    pre[..., 5] = pre[..., 6]  # ties
    pre[0, 0, 3] = -np.inf  # AuxK masks with -inf
    x = jax.device_put(pre, jax.sharding.NamedSharding(mesh, sharded.PRE_SPEC))

    def both(v):
        with sharded.use_mesh(mesh):
            return sharded.row_kth(v, ks), sharded.batch_kth(v, ks)

    row, batch = jax.jit(both)(x)
    top = -np.sort(-pre, axis=-1)
    want_row = np.stack([top[:, i, :, k - 1] for i, k in enumerate(ks)], 1)[..., None]
    flat = -np.sort(-pre.reshape(2, len(ks), -1), axis=-1)
    want_batch = np.stack([flat[:, i, k * 16 - 1] for i, k in enumerate(ks)], 1)[:, :, None, None]
    np.testing.assert_array_equal(np.asarray(row), want_row)
    np.testing.assert_array_equal(np.asarray(batch), want_batch)
    # The sharded program gathers candidates, never the [B, M] block.
    hlo = jax.jit(both).lower(x).compile().as_text()
    assert "all-gather" in hlo
    for line in hlo.splitlines():
        if "all-gather(" in line:
            assert "f32[2,%d,16,64]" % len(ks) not in line.split("=")[1].split("all-gather")[0]


def test_mesh_errors_name_the_axis():
    with pytest.raises(meshlib.MeshError, match=r"mesh\.stack=8 does not divide the 4 sites"):
        meshlib.validate_group(dict(data=1, stack=8, latent=1), T=4, width=128, batch_size=256, n_devices=8)
    with pytest.raises(meshlib.MeshError, match=r"mesh\.latent=8 does not divide the latent width 100"):
        meshlib.validate_group(dict(data=1, stack=1, latent=8), T=4, width=100, batch_size=256, n_devices=8)
    with pytest.raises(meshlib.MeshError, match=r"mesh\.data=8 does not divide train\.batch_size=100"):
        meshlib.validate_group(dict(data=-1, stack=1, latent=1), T=4, width=128, batch_size=100, n_devices=8)
    meshlib.validate_group(dict(data=2, stack=4, latent=1), T=4, width=128, batch_size=256, n_devices=8)


def _config(tmp_path, **over):
    c = cfg.defaults()
    c.workdir = str(tmp_path)
    c.train.source = "synthetic"
    c.synthetic.sites, c.synthetic.d, c.synthetic.n_features = 4, 32, 128
    c.sae.widths = (128, 256)
    c.sae.sparsity = (0.003, 0.01)
    c.train.batch_size, c.train.tokens = 256, 256 * 50
    for k, v in over.items():
        cfg.set_value(c, k, v)
    cfg.validate(c)
    return c


def test_dry_run_reports_memory_and_reads_no_data(tmp_path, monkeypatch, capsys):
    def no_reads(*a, **k):
        raise AssertionError("dry run read data")

    monkeypatch.setattr(SyntheticSource, "batch", no_reads)
    monkeypatch.setattr(SyntheticSource, "norm_scale", no_reads)
    c = _config(tmp_path, **{"mesh.data": 2, "mesh.latent": 4})
    assert loop.run(c, dry_run=True) == []
    err = capsys.readouterr().err
    for width in (128, 256):
        line = next(ln for ln in err.splitlines() if f"w{width}] dry run" in ln)
        assert "50 steps, 12,800 tokens" in line
        # params per device: W_enc, W_dec, b_enc, log_threshold split 4 ways over latent; b_dec whole.
        T, K, d = 4, 2, 32
        params = 4 * T * K * (2 * d * width + 2 * width) // 4 + 4 * T * K * d
        assert f"params {params / 2 ** 20:,.1f} MiB" in line
        assert "compiled step temp" in line
    assert not (tmp_path / "train").exists()


def test_bad_mesh_fails_before_compiling(tmp_path):
    c = _config(tmp_path, **{"mesh.data": 1, "mesh.latent": 8, "sae.widths": (100,)})
    with pytest.raises(meshlib.MeshError, match=r"mesh\.latent=8"):
        loop.run(c)
    assert not (tmp_path / "train").exists()


def test_target_l0_lands_within_ten_percent():
    """Target mode: the L0 term lam * t * (L0/t - 1)^2 pulls each member to its own target, from
    above (the dense start) and, after an overshoot, from below."""
    targets = (6.0, 20.0)
    spec = dataclasses.replace(_spec("jumprelu"), sites=SITES[:1], sweep=(0.1,) * 2, threshold_param="raw",
                               encoder_init_scale=32 / 128)
    hp = dataclasses.replace(_hp(1500, target_l0=targets), sparsity_warmup=100)
    src = SyntheticSource(SITES[:1], d=32, n_features=128, active=4, seed=0)
    mesh = _mesh("one")
    state = loop.train_group(spec, hp, src, mesh, progress=False, log_every=1500)
    t = Trainer(spec, dataclasses.replace(hp, total_steps=10 ** 6), mesh)
    l0 = []
    for s in range(4):  # measured on fresh batches
        state, m = t.step(state, t.put_batch(t.local_batch(src, 10 ** 5 + s, norm_scales(src, SITES[:1]))))
        l0.append(np.asarray(m["l0"])[0])
    l0 = np.mean(l0, axis=0)
    np.testing.assert_allclose(l0, targets, rtol=0.10)
