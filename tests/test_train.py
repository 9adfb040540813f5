"""The train step: stacking equals separate SAEs, decoder constraints, losses, Gemma Scope defaults.

Expected values come from hand formulas or from an independent computation, never from the
function under test.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import config as cfg
from saejax.data.synthetic import SyntheticSource
from saejax.sae.group import GroupSpec, SAEGroup
from saejax.train import optim
from saejax.sae import kinds
from saejax.train.plan import plan_groups
from saejax.train.step import init_state, losses, make_train_step

SWEEP = {"jumprelu": (0.01, 0.03), "relu": (0.01, 0.05), "topk": (2.0, 5.0), "batchtopk": (3.0, 2.0)}


def _data(T, B, d, seed=0):
    src = SyntheticSource(tuple(f"s{t}" for t in range(T)), d=d, n_features=48, active=3, seed=seed)
    scale = np.asarray([src.norm_scale(s) for s in src.sites], np.float32)[:, None, None]
    return src, jnp.asarray(src.batch(src.sites, 0, B) * scale)


def _slice(tree, t, k, TK):
    """The [t, k] SAE of every leaf with leading [T, K] axes, kept as [1, 1, ...]."""
    def one(a):
        if a.ndim >= 2 and a.shape[:2] == TK:
            return a[t:t + 1, k:k + 1]
        return a
    return jax.tree_util.tree_map(one, tree)


@pytest.mark.parametrize("arch", ["jumprelu", "topk", "batchtopk", "relu"])
def test_stacked_group_equals_separate_saes(arch):
    """One step of a [T=2, K=2] group = one step of each SAE alone (params, metrics and gradients)."""
    d, M, B = 8, 32, 64
    src, x = _data(2, B, d)
    kw = dict(bandwidth=0.05, threshold_init=0.05) if arch == "jumprelu" else {}
    spec = GroupSpec(arch=arch, sites=tuple(src.sites), d=d, width=M, sweep=SWEEP[arch], **kw)
    # lr warmup 0 and sparsity warmup 0: full lr and lambda; dead_steps 0: AuxK on from the first step.
    hp = optim.Hyper(total_steps=10, batch_size=B, lr=1e-2, lr_warmup=0, sparsity_warmup=0, dead_steps=0)
    state = init_state(spec, hp, jax.random.key(3))
    new, metrics = jax.jit(make_train_step(spec, hp))(state, x)
    grads = jax.grad(lambda p: losses(spec, hp, p, state, x)[0])(state["params"])
    assert float(jnp.max(jnp.abs(new["params"]["W_dec"] - state["params"]["W_dec"]))) > 1e-3  # it moved
    for t in range(2):
        for k in range(2):
            one = GroupSpec(arch=arch, sites=(src.sites[t],), d=d, width=M, sweep=(SWEEP[arch][k],), **kw)
            s1 = _slice(state, t, k, (2, 2))
            s1["opt_state"] = optim.optimizer(hp).init(s1["params"])
            n1, m1 = jax.jit(make_train_step(one, hp))(s1, x[t:t + 1])
            g1 = jax.grad(lambda p: losses(one, hp, p, s1, x[t:t + 1])[0])(s1["params"])
            for name in new["params"]:
                np.testing.assert_allclose(n1["params"][name], _slice(new["params"], t, k, (2, 2))[name],
                                           rtol=1e-5, atol=1e-7, err_msg=f"{arch} param {name} of SAE {t},{k}")
                np.testing.assert_allclose(g1[name], _slice(grads, t, k, (2, 2))[name], rtol=1e-5, atol=1e-8,
                                           err_msg=f"{arch} grad {name} of SAE {t},{k}")
            for name in ("loss", "mse", "fvu", "l0", "aux_loss", "sparsity_loss"):
                np.testing.assert_allclose(m1[name][0, 0], metrics[name][t, k], rtol=1e-5, atol=1e-8, err_msg=name)
            np.testing.assert_allclose(n1["bt_threshold"][0, 0], new["bt_threshold"][t, k], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("arch", ["jumprelu", "topk", "relu"])
def test_decoder_rows_unit_norm_after_steps(arch):
    d, M, B = 8, 32, 64
    src, _ = _data(1, B, d)
    spec = GroupSpec(arch=arch, sites=tuple(src.sites), d=d, width=M, sweep=SWEEP[arch][:1])
    hp = optim.Hyper(total_steps=5, batch_size=B, lr=3e-2, lr_warmup=0, sparsity_warmup=0)
    scale = src.norm_scale(src.sites[0])
    state, step = init_state(spec, hp, jax.random.key(0)), jax.jit(make_train_step(spec, hp))
    for i in range(5):
        state, _ = step(state, jnp.asarray(src.batch(src.sites, i, B) * scale))
    norms = np.linalg.norm(state["params"]["W_dec"], axis=-1)
    if arch == "relu":  # ReLU+L1 leaves decoder norms free: they moved away from the 0.1 init
        assert np.max(np.abs(norms - 0.1)) > 1e-3
    else:
        np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_relu_l1_is_weighted_by_decoder_norm():
    d, M, B, lam = 6, 10, 16, 0.3
    spec = GroupSpec(arch="relu", sites=("a",), d=d, width=M, sweep=(lam,))
    hp = optim.Hyper(total_steps=10, batch_size=B, sparsity_warmup=0)
    state = init_state(spec, hp, jax.random.key(0))
    rng = np.random.default_rng(0)
    p = {"W_enc": rng.normal(size=(d, M)), "b_enc": rng.normal(size=M) * 0.1,
         "W_dec": rng.normal(size=(M, d)) * rng.uniform(0.2, 3.0, size=(M, 1)), "b_dec": rng.normal(size=d) * 0.1}
    state["params"] = {k: jnp.asarray(v[None, None], jnp.float32) for k, v in p.items()}
    x = rng.normal(size=(B, d))
    _, out = losses(spec, hp, state["params"], state, jnp.asarray(x[None], jnp.float32))
    f = np.maximum(x @ p["W_enc"] + p["b_enc"], 0)
    want = lam * np.mean(np.sum(f * np.linalg.norm(p["W_dec"], axis=1), axis=1))
    assert abs(want - lam * np.mean(np.sum(f, 1))) > 0.1 * want  # the weighting matters in this case
    np.testing.assert_allclose(out["sparsity_loss"][0, 0], want, rtol=1e-5)
    mse = np.mean(np.sum((f @ p["W_dec"] + p["b_dec"] - x) ** 2, 1))
    np.testing.assert_allclose(out["mse"][0, 0], mse, rtol=1e-5)


def test_batchtopk_inference_uses_running_threshold():
    d, M, B = 8, 32, 64
    src, x = _data(1, B, d)
    spec = GroupSpec(arch="batchtopk", sites=tuple(src.sites), d=d, width=M, sweep=(3.0,))
    hp = optim.Hyper(total_steps=10, batch_size=B, lr=1e-2, lr_warmup=0)
    state, step = init_state(spec, hp, jax.random.key(0)), jax.jit(make_train_step(spec, hp))
    mins = []
    for i in range(3):
        xb = jnp.asarray(src.batch(src.sites, i, B) * src.norm_scale(src.sites[0]))
        _, f, _ = SAEGroup(spec).apply({"params": state["params"]}, xb, state["bt_threshold"], True)
        f = np.asarray(f)
        mins.append(f[f > 0].min())  # the smallest activation BatchTopK kept in this batch
        state, _ = step(state, xb)
    want = mins[0]
    for m in mins[1:]:
        want = 0.99 * want + 0.01 * m
    np.testing.assert_allclose(state["bt_threshold"][0, 0], want, rtol=1e-5)
    # At inference the module is a JumpReLU with that one threshold.
    pre, f, _ = SAEGroup(spec).apply({"params": state["params"]}, x, state["bt_threshold"], False)
    pre, thr = np.asarray(pre), float(state["bt_threshold"][0, 0])
    np.testing.assert_array_equal(np.asarray(f), np.where(pre > thr, pre, 0.0))


def test_defaults_are_gemma_scope():
    """config.defaults() -> plan_groups -> Hyper; the schedules and Adam are checked by calling them."""
    c = cfg.defaults()
    c.sae.widths = (32,)
    c.train.tokens = 4096 * 50_000
    (spec, hp), = plan_groups(c, SyntheticSource(("res.0",), d=8, n_features=16))
    assert spec.arch == "jumprelu" and spec.bandwidth == 0.001 and spec.threshold_init == 0.001
    assert spec.threshold_param == "log" and not spec.pre_encoder_bias
    assert spec.threshold_init_l0 == 0 and spec.encoder_init_scale == 1.0
    lr = optim.lr_schedule(hp)
    np.testing.assert_allclose([lr(0), lr(500), lr(1000), lr(30_000)], [7e-6, 7e-5 * 0.55, 7e-5, 7e-5], rtol=1e-6)
    np.testing.assert_allclose([optim.sparsity_scale(hp, s) for s in (0, 2500, 10_000, 20_000)], [0, 0.25, 1, 1])
    # Adam with b1=0, b2=0.999, eps=1e-8, checked on two steps of hand gradients after step 1000 (lr = 7e-5):
    # both step counters (Adam's bias correction, the lr schedule) are set to 1000.
    tx = optim.optimizer(hp)
    p = {"w": jnp.zeros(3)}
    st = tx.init(p)
    st = jax.tree_util.tree_map(lambda a: jnp.asarray(1000, a.dtype) if a.ndim == 0 else a, st)
    g1, g2 = np.array([1e-8, 2.0, -3.0]), np.array([1e-8, -1.0, 0.5])
    _, st = tx.update({"w": jnp.asarray(g1, jnp.float32)}, st, p)
    u2, _ = tx.update({"w": jnp.asarray(g2, jnp.float32)}, st, p)
    v = (0.999 * 0.001 * g1 ** 2 + 0.001 * g2 ** 2) / (1 - 0.999 ** 1002)
    want = -7e-5 * g2 / (np.sqrt(v) + 1e-8)  # b1 = 0: the first moment is the gradient itself
    np.testing.assert_allclose(u2["w"], want, rtol=1e-4)


def _recovery(w_dec, features):
    """Best-match cosine of each planted direction [n, d] with the decoder rows [M, d]."""
    w = w_dec / np.linalg.norm(w_dec, axis=-1, keepdims=True)
    return np.max(features @ w.T, axis=1)


def _train_planted(arch, sparsity, spec_kw, steps=1000, B=512):
    """d=64, 128 planted directions (4 active per row, Zipf 1), 256 latents; returns eval numbers."""
    src = SyntheticSource(("res.0",), d=64, n_features=128, active=4, zipf=1.0, noise=0.01, seed=0)
    spec = GroupSpec(arch=arch, sites=("res.0",), d=64, width=256, sweep=(sparsity,), **spec_kw)
    hp = optim.Hyper(total_steps=steps, batch_size=B, lr=3e-3, lr_warmup=50, sparsity_warmup=300, dead_steps=200)
    scale = src.norm_scale("res.0")
    state, step = init_state(spec, hp, jax.random.key(0)), jax.jit(make_train_step(spec, hp), donate_argnums=0)
    for i in range(steps):
        state, _ = step(state, jnp.asarray(src.batch(src.sites, i, B) * scale))
    x = src.batch(src.sites, 10 ** 6, 4096) * scale
    _, f, x_hat = SAEGroup(spec).apply({"params": state["params"]}, jnp.asarray(x), state["bt_threshold"], False)
    f, x_hat, x = np.asarray(f[0, 0]), np.asarray(x_hat[0, 0]), x[0]
    cos = _recovery(np.asarray(state["params"]["W_dec"][0, 0]), src.features("res.0"))
    return {"recovered": np.mean(cos > 0.9), "l0": np.mean(np.sum(f > 0, 1)),
            "fvu": np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2)}


def test_topk_recovers_planted_features():
    r = _train_planted("topk", 4, {})
    assert r["recovered"] >= 0.9 and r["fvu"] < 0.1, r


def test_jumprelu_recovers_planted_features():
    """With the short-run init (raw theta, W_enc = 4 d/M W_dec^T): >= 90% recovered at L0 within 2x of 4."""
    r = _train_planted("jumprelu", 0.01, {"threshold_param": "raw", "encoder_init_scale": 0.25})
    assert r["recovered"] >= 0.9 and 2 <= r["l0"] <= 8 and r["fvu"] < 0.1, r


@pytest.mark.parametrize("param", ["log", "raw"])
def test_calibrated_thresholds_fire_on_target_fraction(param):
    d, M, B = 8, 16, 64
    _, x = _data(1, B, d)
    spec = GroupSpec(arch="jumprelu", sites=("s0",), d=d, width=M, sweep=(0.0,), threshold_param=param,
                     threshold_init=1e-6, threshold_init_l0=2.0)  # n = 64 * 2 / 16 = 8 rows per latent
    hp = optim.Hyper(total_steps=3, batch_size=B, lr=1e-9, lr_warmup=0)
    state = init_state(spec, hp, jax.random.key(0))
    params = kinds.get("jumprelu").calibrate(spec, state["params"], x)
    pre, f, _ = SAEGroup(spec).apply({"params": params}, x)
    np.testing.assert_array_equal(np.sum(np.asarray(f) > 0, axis=2), 8)
    # The train step applies it at step 0 only (lr ~ 0: thresholds stay where step 0 put them).
    new, m = jax.jit(make_train_step(spec, hp))(state, x)
    np.testing.assert_allclose(m["l0"][0, 0], 8 * M / B, rtol=1e-6)
    new2, _ = jax.jit(make_train_step(spec, hp))(new, x[:, ::-1] * 2.0)
    np.testing.assert_allclose(new2["params"]["W_enc"], new["params"]["W_enc"], atol=1e-6)
    name = "log_threshold" if param == "log" else "threshold"
    np.testing.assert_allclose(new2["params"][name], params[name], rtol=1e-5)


def test_auxk_loss_and_gradient_reach_dead_latents():
    """AuxK = coeff * ||e - e_hat||^2, e_hat from the top auxk_k dead latents; it gives dead rows a gradient."""
    d, M, B, coeff = 4, 6, 3, 0.25
    rng = np.random.default_rng(1)
    p = {"W_enc": rng.normal(size=(d, M)), "b_enc": rng.normal(size=M) * 0.1,
         "W_dec": rng.normal(size=(M, d)), "b_dec": rng.normal(size=d) * 0.1}
    p["W_dec"] /= np.linalg.norm(p["W_dec"], axis=1, keepdims=True)
    x = rng.normal(size=(B, d))
    since = np.array([0, 0, 10, 0, 12, 20])  # dead_steps 10: latents 2, 4, 5 are dead

    def run(c):
        spec = GroupSpec(arch="topk", sites=("a",), d=d, width=M, sweep=(1.0,), auxk_k=2, auxk_coeff=c)
        hp = optim.Hyper(total_steps=10, batch_size=B, dead_steps=10)
        state = init_state(spec, hp, jax.random.key(0))
        state["params"] = {k: jnp.asarray(v[None, None], jnp.float32) for k, v in p.items()}
        state["since_fired"] = jnp.asarray(since[None, None], jnp.int32)
        xj = jnp.asarray(x[None], jnp.float32)
        (_, out), g = jax.value_and_grad(lambda q: losses(spec, hp, q, state, xj), has_aux=True)(state["params"])
        return out, np.asarray(g["W_dec"][0, 0])

    pre = x @ p["W_enc"] + p["b_enc"]
    f = np.where(pre >= np.sort(pre, 1)[:, -1:], np.maximum(pre, 0), 0)
    e = x - (f @ p["W_dec"] + p["b_dec"])
    dead_pre = np.where(since >= 10, pre, -np.inf)
    f_aux = np.where(dead_pre >= np.sort(dead_pre, 1)[:, -2:-1], np.maximum(pre, 0), 0)
    want = coeff * np.mean(np.sum((e - f_aux @ p["W_dec"]) ** 2, 1))
    out, g = run(coeff)
    np.testing.assert_allclose(out["aux_loss"][0, 0], want, rtol=1e-5)
    assert want > 1e-3
    fired = np.any(f > 0, 0)
    revived = (since >= 10) & ~fired & np.any(f_aux > 0, 0)
    assert revived.any()
    _, g0 = run(0.0)
    np.testing.assert_array_equal(g0[revived], 0.0)  # without AuxK a dead row gets no gradient at all
    assert np.all(np.abs(g[revived]).max(1) > 1e-6)  # with it, it does
