"""Matryoshka training (saejax.sae.matryoshka): the loss and gradients of the one-decode
implementation against a direct computation (n separate masked decodes, autodiff), for every kind
that trains with prefixes, SAEs and (skip-)transcoder targets; stacked = separate."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import config as cfg
from saejax.analyze import absorption
from saejax.sae import jumprelu as jr
from saejax.sae import matryoshka
from saejax.sae.group import GroupSpec, init_params
from saejax.sae.kinds.jumprelu import theta
from saejax.train import optim
from saejax.train.step import init_state, losses

HI = jax.lax.Precision.HIGHEST
PREFIXES = (5, 24, 40, 64)


def _setup(arch, target, seed=0):
    T, d, M, B = 2, 8, 64, 64
    d_out = 6 if target != "x" else d
    sweep = (6.0, 10.0) if arch != "jumprelu" else (0.003, 0.01)
    spec = GroupSpec(arch=arch, sites=("a", "b"), d=d, width=M, sweep=sweep, auxk_k=16, matryoshka=PREFIXES,
                     threshold_init=0.05, bandwidth=0.05)
    hp = optim.Hyper(total_steps=100, batch_size=B, sparsity_warmup=0, dead_steps=1000)
    r = np.random.default_rng(seed)
    state = init_state(spec, hp, jax.random.key(seed))
    params = dict(state["params"])
    params["W_enc"] = params["W_enc"] + 0.3 * jnp.asarray(r.normal(size=params["W_enc"].shape), jnp.float32)
    params["b_enc"] = jnp.asarray(0.05 * r.normal(size=params["b_enc"].shape), jnp.float32)
    if target != "x":
        params["W_dec"] = jnp.asarray(r.normal(size=(T, 2, M, d_out)) / 3, jnp.float32)
        params["b_dec"] = jnp.asarray(r.normal(size=(T, 2, d_out)) / 3, jnp.float32)
    if target == "skip":
        params["W_skip"] = jnp.asarray(0.3 * r.normal(size=(T, 2, d, d_out)), jnp.float32)
    x = jnp.asarray(r.normal(size=(T, B, d)), jnp.float32)
    y = None if target == "x" else jnp.asarray(r.normal(size=(T, B, d_out)), jnp.float32)
    return spec, hp, dict(state, params=params), x, y


def _direct(spec, hp, params, state, x, y):
    """Sum over prefixes of n separate decodes of masked latents, plus the sparsity term."""
    y = x if y is None else y
    pre = jnp.matmul(x[:, None], params["W_enc"], precision=HI) + params["b_enc"][:, :, None, :]
    lam = state["lam"]
    if spec.arch == "jumprelu":
        f, l0 = jr.jumprelu_l0(pre, theta(params)[:, :, None, :], spec.bandwidth)
        sparsity = lam * jnp.mean(l0, -1)
    else:
        f = spec.kind.train_activation(spec, params, pre)
        sparsity = 0.0
    recon = 0.0
    for m in spec.matryoshka:
        fm = jnp.where(jnp.arange(spec.width) < m, f, 0.0)
        hat = jnp.matmul(fm, params["W_dec"], precision=HI) + params["b_dec"][:, :, None, :]
        if "W_skip" in params:
            hat = hat + jnp.matmul(x[:, None], params["W_skip"], precision=HI)
        recon = recon + jnp.mean(jnp.sum(jnp.square(hat - y[:, None]), -1), -1)
    return jnp.sum(recon + sparsity), recon


@pytest.mark.parametrize("arch,target", [("jumprelu", "x"), ("jumprelu", "skip"), ("topk", "x"),
                                         ("topk", "skip"), ("batchtopk", "y")])
def test_loss_and_gradients_match_separate_decodes(arch, target):
    spec, hp, state, x, y = _setup(arch, target)
    params = state["params"]
    total, out = losses(spec, hp, params, state, x, y)
    want_total, want_recon = _direct(spec, hp, params, state, x, y)
    np.testing.assert_allclose(out["loss"] - out["sparsity_loss"] - out["aux_loss"], want_recon, rtol=1e-5)
    np.testing.assert_allclose(total, want_total, rtol=1e-5)
    # The logged mse is the full dictionary's, below the sum over prefixes.
    plain = dataclasses.replace(spec, matryoshka=())
    np.testing.assert_allclose(out["mse"], losses(plain, hp, params, state, x, y)[1]["mse"], rtol=1e-5)
    assert np.all(np.asarray(out["mse"]) < np.asarray(want_recon))
    got = jax.grad(lambda p: losses(spec, hp, p, state, x, y)[0])(params)
    want = jax.grad(lambda p: _direct(spec, hp, p, state, x, y)[0])(params)
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert float(jnp.abs(want["W_dec"][:, :, :5]).max()) > 0  # the first block's gradient is there
    if arch == "jumprelu":
        assert np.count_nonzero(want["log_threshold"]) >= 5  # theta's pseudo-derivatives are exercised


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_stacked_equals_separate(arch):
    spec, hp, state, x, y = _setup(arch, "x", seed=1)
    params = state["params"]
    g = jax.grad(lambda p: losses(spec, hp, p, state, x)[0])(params)
    for t in range(spec.T):
        for k in range(spec.K):
            one = dataclasses.replace(spec, sites=spec.sites[t:t + 1], sweep=spec.sweep[k:k + 1])
            sl = lambda a: a[t:t + 1, k:k + 1]  # noqa: E731
            st = dict(state, **{n: sl(state[n]) for n in ("lam", "since_fired", "bt_threshold", "frozen")})
            gk = jax.grad(lambda p: losses(one, hp, p, st, x[t:t + 1])[0])(jax.tree_util.tree_map(sl, params))
            for n in params:
                # within 1e-5 of the gradient's scale (sums in another order round differently)
                np.testing.assert_allclose(gk[n], sl(g[n]), rtol=0, atol=1e-5 * float(np.abs(g[n]).max()),
                                           err_msg=(t, k, n))


def test_segments_cut_every_shard_at_its_boundaries():
    # 4 shards of 16 latents: boundaries 5, 24 (shard 1 at 8), 40 (shard 2 at 8) -> local cuts 5 and 8.
    assert matryoshka.segments(PREFIXES, 16, 4) == ((0, 5), (5, 8), (8, 16))
    assert matryoshka.segments(PREFIXES, 64, 1) == ((0, 5), (5, 24), (24, 40), (40, 64))


@pytest.mark.parametrize("value,width,error", [
    ((5, 3, 64), 64, "strictly increasing"), ((5, 32), 64, "end at the width"), ((64,), 64, "at least two"),
])
def test_bad_prefixes_are_refused(value, width, error):
    assert error in matryoshka.problem(matryoshka.resolve(value, width), width)


def test_config_checks():
    c = cfg.defaults()
    c.sae.widths = (64, 128)
    c.sae.matryoshka = (0.25, 1.0)
    cfg.validate(c)
    c.sae.matryoshka = (16, 64)
    with pytest.raises(cfg.ConfigError, match="sae.matryoshka"):
        cfg.validate(c)
    c.sae.widths = (64,)
    cfg.validate(c)
    c.sae.arch = "relu"
    with pytest.raises(cfg.ConfigError, match="sae.matryoshka.*relu"):
        cfg.validate(c)
    assert matryoshka.resolve((0.25, 1.0), 128) == (32, 128)


def _released(spec, state, src):
    """The trained SAE as released (folded to raw rows): saejax.release.SAE."""
    from saejax.release.fold import group_sae
    from saejax.release.sae import SAE
    from saejax.sae import io as sae_io
    arrays = sae_io.export_params(spec.arch, jax.device_get(state["params"]), jax.device_get(state["bt_threshold"]))
    folded, arch, k = group_sae(arrays, {"arch": spec.arch, "sites": list(spec.sites), "k": [],
                                         "norm_scale": [src.norm_scale(s) for s in spec.sites]}, 0, 0)
    return SAE(arch, {n: jnp.asarray(v) for n, v in folded.items()}, k)


def test_matryoshka_absorbs_less_than_plain():
    """Planted parents whose children imply them (HierarchicalSource): at the same width and L0
    (BatchTopK, k = 3) on the same rows, the plain SAE's parent latents miss a fifth of their
    parents' rows to latents that absorbed them (measured ~0.2 and recall ~0.77); Matryoshka with
    the parents' number of latents as its first prefix misses far fewer (~0.05, recall ~0.87)."""
    from saejax import mesh as meshlib
    from saejax.data.synthetic import HierarchicalSource
    from saejax.train import loop

    src = HierarchicalSource(("a",), d=32, n_parents=8, children=4, active=2, p_child=0.75, seed=0)
    mesh = meshlib.make_mesh(dict(data=1, stack=1, latent=1), jax.devices()[:1])
    hp = optim.Hyper(total_steps=300, batch_size=512, lr=3e-3, lr_warmup=20, sparsity_warmup=50, dead_steps=50)
    rows, labels = src.batch(["a"], 10 ** 6, 8192)[0], src.labels("a", 10 ** 6, 8192)
    got = {}
    for name, prefixes in (("plain", ()), ("matryoshka", (8, 48))):
        spec = GroupSpec(arch="batchtopk", sites=("a",), d=32, width=48, sweep=(3.0,), auxk_k=16,
                         matryoshka=prefixes, encoder_init_scale=32 / 48)
        sae = _released(spec, loop.train_group(spec, hp, src, mesh, progress=False, log_every=10 ** 6), src)
        l0 = float(np.mean(np.sum(np.asarray(sae.encode(rows)) > 0, -1)))
        assert abs(l0 - 3.0) < 0.3, (name, l0)  # equal L0
        got[name] = absorption.measure(sae, rows, labels)  # directions from the labels alone
        planted = absorption.absorption(np.asarray(sae.encode(rows)), sae.arrays["W_dec"], labels,
                                        src.features("a")[:8])
        assert abs(planted["rate"] - got[name]["rate"]) < 0.05  # the mean-difference probe finds the parents
    assert got["plain"]["rate"] > 0.1  # the plain SAE absorbs
    assert got["matryoshka"]["rate"] < 0.5 * got["plain"]["rate"], got
    assert got["matryoshka"]["recall"] > got["plain"]["recall"]


def test_absorption_measure_on_constructed_latents():
    """Feature 0 on rows 0-99; its main latent 0 fires on rows 0-59; latent 1 (decoder along the
    feature plus a child direction) fires on rows 60-89; rows 90-99 nothing: rate 0.3, recall 0.6."""
    labels = np.zeros((200, 1), bool)
    labels[:100] = True
    f = np.zeros((200, 3))
    f[:60, 0] = 1
    f[60:90, 1] = 1
    f[100:, 2] = 1
    w_dec = np.array([[1.0, 0, 0], [0.7, 0.7, 0], [0, 0, 1]])
    r = absorption.absorption(f, w_dec, labels, np.array([[1.0, 0, 0]]))
    assert r["main_latent"] == [0] and r["rate"] == pytest.approx(0.3) and r["recall"] == pytest.approx(0.6)
    assert r["absorbers"] == [1]


def test_config_to_group_json(tmp_path):
    """sae.matryoshka in fractions reaches the group's spec, fingerprint and group.json; evaluate
    then reports each prefix's FVU, decreasing with the prefix."""
    import json
    import os

    import saejax.evaluate
    from saejax.train import loop
    c = cfg.defaults()
    c.workdir = str(tmp_path)
    c.train.source = "synthetic"
    c.synthetic.sites, c.synthetic.d, c.synthetic.n_features = 1, 16, 32
    c.sae.widths = (32,)
    c.sae.arch, c.sae.sparsity = "topk", (4,)
    c.sae.matryoshka = (0.25, 1.0)
    c.train.batch_size, c.train.tokens, c.train.lr, c.train.lr_warmup = 128, 128 * 40, 3e-3, 0.1
    c.train.log_every, c.train.checkpoint_every = 20, 1000
    c.mesh.data, c.mesh.latent = 2, 4
    loop.run(c)
    group = os.path.join(str(tmp_path), "train", "topk_d16_w32")
    with open(os.path.join(group, "final", "group.json")) as fh:
        assert json.load(fh)["matryoshka"] == [8, 32]
    with open(os.path.join(group, "fingerprint.json")) as fh:
        assert json.load(fh)["spec"]["matryoshka"] == [8, 32]
    fvu = saejax.evaluate.run(c)["saes"][0]["fvu_prefix"]
    assert fvu["8"] > fvu["32"]
