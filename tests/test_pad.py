"""Idle SAE slots (GroupSpec.pad, mesh.pad_sites): a padded group trains its real sites exactly as the
unpadded group does, logs and exports only them, and refuses a checkpoint of another slot count."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from saejax import config as cfg
from saejax import mesh as meshlib
from saejax.data.synthetic import SyntheticSource
from saejax.sae import io as sae_io
from saejax.sae.group import GroupSpec
from saejax.train import checkpoint as ckpt
from saejax.train import loop, optim
from saejax.train.export import save_final
from saejax.train.trainer import to_host

D, M, B = 16, 64, 128


def _setup(arch, T, **hp_kw):
    sites = tuple(f"res.{i}" for i in range(T))
    sweep = {"jumprelu": (1.0, 1.0), "topk": (3.0, 5.0), "batchtopk": (3.0, 5.0)}[arch]
    kw = dict(bandwidth=0.05, threshold_init=0.05, threshold_init_l0=8.0) if arch == "jumprelu" else dict(auxk_k=8)
    spec = GroupSpec(arch=arch, sites=sites, d=D, width=M, sweep=sweep, **kw)
    hp = optim.Hyper(total_steps=12, batch_size=B, lr=1e-2, lr_warmup=2, sparsity_warmup=4, dead_steps=3,
                     **hp_kw)
    return spec, hp, SyntheticSource(sites, d=D, n_features=48, active=3)


def _train(spec, hp, src, mesh, tmp, name):
    log = str(tmp / f"{name}.jsonl")
    state = loop.train_group(spec, hp, src, mesh, progress=False, log_every=4, log_path=log)
    final = str(tmp / name)
    save_final(final, spec, hp, src, state)
    return to_host(state), [json.loads(ln) for ln in open(log)], final


CASES = [("jumprelu", dict(target_l0=(4.0, 8.0), revive_steps=2, revive_bias=True, b_dec_init="median")),
         ("batchtopk", dict(revive_steps=2, revive_auxk=1.0))]


@pytest.mark.parametrize("arch,hp_kw", CASES, ids=[c[0] for c in CASES])
def test_padded_group_trains_its_real_sites_bitwise_as_unpadded(tmp_path, arch, hp_kw):
    spec, hp, src = _setup(arch, 3, **hp_kw)
    mesh = meshlib.make_mesh(dict(data=1, stack=1, latent=1), jax.devices()[:1])
    ref, ref_log, ref_final = _train(spec, hp, src, mesh, tmp_path, "ref")
    padded = dataclasses.replace(spec, pad=1)
    assert (padded.T, padded.n_sites, padded.name) == (4, 3, spec.name)
    got, got_log, got_final = _train(padded, hp, src, mesh, tmp_path, "pad")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref["params"]),
                            jax.tree_util.tree_leaves(got["params"])):
        assert b.shape[0] == 4
        assert np.array_equal(a, b[:3]), jax.tree_util.keystr(path)
        assert np.all(np.isfinite(b[3])), jax.tree_util.keystr(path)  # the idle slot stays finite
    assert not np.array_equal(ref["params"]["W_dec"], to_host(loop.Trainer(spec, hp, mesh).init_state())["params"]["W_dec"])
    for k in ("lam", "l0_ema", "bt_threshold", "since_fired"):
        assert np.array_equal(ref[k], got[k][:3]), k
    assert got["frozen"].tolist() == ref["frozen"].tolist() + [[True, True]]  # idle: frozen from the start
    assert len(ref_log) == len(got_log) == 3
    for r, g in zip(ref_log, got_log):  # every per-SAE array has the 3 real sites' rows, equal bitwise
        assert r.keys() == g.keys() and "heldout_fvu" in g
        for k in r:
            assert r[k] == g[k], k
    assert np.array(got_log[-1]["fvu"]).shape == (3, 2)
    a, b = sae_io.load_group(ref_final), sae_io.load_group(got_final)
    assert b[1]["sites"] == ["res.0", "res.1", "res.2"] and a[1] == b[1]
    for k in a[0]:
        assert np.array_equal(a[0][k], b[0][k]), k


def test_padded_group_on_8_devices_trains_like_one_device(tmp_path):
    """6 sites on stack 8 (2 idle slots): it trains (FVU falls) and its sites end as the unpadded
    group's on one device, to float tolerance (the collectives sum in another order)."""
    spec, hp, src = _setup("jumprelu", 6, target_l0=(4.0, 8.0))
    hp = dataclasses.replace(hp, total_steps=16)
    one = meshlib.make_mesh(dict(data=1, stack=1, latent=1), jax.devices()[:1])
    ref, _, _ = _train(spec, hp, src, one, tmp_path, "ref")
    padded = dataclasses.replace(spec, pad=2)
    with pytest.raises(meshlib.MeshError, match="mesh.pad_sites"):
        meshlib.validate_group(dict(data=1, stack=8, latent=1), spec.T, M, B, n_devices=8)
    mesh = meshlib.make_mesh(dict(data=1, stack=8, latent=1))
    got, log, _ = _train(padded, hp, src, mesh, tmp_path, "pad")
    fvu = [np.array(r["fvu"]) for r in log]
    assert all(f.shape == (6, 2) for f in fvu) and np.array(log[0]["heldout_l0"]).shape == (6, 2)
    assert np.all(fvu[-1] < fvu[0])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref["params"]),
                            jax.tree_util.tree_leaves(got["params"])):
        np.testing.assert_allclose(b[:6], a, rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))


def test_resume_with_another_padding_is_refused(tmp_path):
    spec, hp, src = _setup("jumprelu", 3)
    mesh = meshlib.make_mesh(dict(data=1, stack=1, latent=1), jax.devices()[:1])
    padded = dataclasses.replace(spec, pad=1)
    loop.train_group(padded, dataclasses.replace(hp, total_steps=4), src, mesh, progress=False,
                     ckpt_dir=str(tmp_path / "ck"), checkpoint_every=4)
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    with pytest.raises(ckpt.CheckpointError) as e:
        loop.train_group(spec, hp, src, mesh, progress=False, ckpt_dir=str(tmp_path / "ck"), checkpoint_every=4)
    msg = str(e.value)
    assert "\n" not in msg and "mesh.pad_sites" in msg and "4 SAE slots" in msg and "this plan 3" in msg
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before


def test_pad_sites_config_and_fingerprint():
    c = cfg.load("experiments/default.py", ["--config.mesh.pad_sites=4"])
    assert c.mesh.pad_sites == 4
    for bad, why in (("-1", "int >= 0"), ("x", "int >= 0"), ("auto", "needs mesh.plan='auto'")):
        with pytest.raises(cfg.ConfigError, match=f"mesh.pad_sites.*{why}"):
            cfg.load("experiments/default.py", [f"--config.mesh.pad_sites={bad}"])
    spec, hp, src = _setup("jumprelu", 3)
    # Idle slots are the mesh's business: a padded group's fingerprint is the unpadded one's.
    assert loop.fingerprint(dataclasses.replace(spec, pad=5), hp, 0, src) == loop.fingerprint(spec, hp, 0, src)


def test_padded_skip_transcoder_group_bitwise_and_export(tmp_path):
    """A skip-transcoder group (reads mlp_in.L, writes mlp.L) with an idle slot: its (input, target)
    rows get a zero block each, and its real pairs train bitwise as unpadded; final/ names the pairs."""
    from saejax.data.synthetic import SyntheticPairs
    src = SyntheticPairs((0, 1), d=D, n_features=32, active=2, seed=0, dense=2)
    spec = GroupSpec(arch="topk", sites=("mlp.0", "mlp.1"), reads=("mlp_in.0", "mlp_in.1"), d=D, d_out=D, skip=True,
                     width=M, sweep=(3.0,), auxk_k=8)
    hp = optim.Hyper(total_steps=8, batch_size=B, lr=1e-2, lr_warmup=1, dead_steps=2, b_dec_init="mean")
    mesh = meshlib.make_mesh(dict(data=1, stack=1, latent=1), jax.devices()[:1])
    ref, ref_log, ref_final = _train(spec, hp, src, mesh, tmp_path, "ref")
    got, got_log, got_final = _train(dataclasses.replace(spec, pad=1), hp, src, mesh, tmp_path, "pad")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref["params"]), jax.tree_util.tree_leaves(got["params"])):
        assert np.array_equal(a, b[:2]) and np.all(np.isfinite(b)), jax.tree_util.keystr(path)
    assert ref_log == got_log
    a, b = sae_io.load_group(ref_final), sae_io.load_group(got_final)
    assert a[1] == b[1] and b[1]["reads"] == ["mlp_in.0", "mlp_in.1"]
    for k in a[0]:
        assert np.array_equal(a[0][k], b[0][k]), k
