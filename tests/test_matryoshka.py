"""Matryoshka training (saejax.sae.matryoshka): the loss and gradients of the one-decode
implementation against a direct computation (n separate masked decodes, autodiff), for every kind
that trains with prefixes, SAEs and (skip-)transcoder targets; stacked = separate."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import config as cfg
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
                np.testing.assert_allclose(gk[n], sl(g[n]), rtol=1e-5, atol=1e-7, err_msg=(t, k, n))


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
