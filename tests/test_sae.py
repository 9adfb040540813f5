"""SAE modules: JumpReLU pseudo-gradients, Gemma Scope init, activations, stacking.

Every expected value is computed independently of the code under test (hand formulas, numpy).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.sae import jumprelu as jr
from saejax.sae.group import GroupSpec, SAEGroup, init_params
from saejax.sae.kinds.jumprelu import theta
from saejax.train import optim

EPS = 0.1
# Hand-made pre-activations z and thresholds theta: some z inside the kernel window |z - theta| < eps/2,
# some outside, on both sides of theta.
Z = np.array([[0.30, 0.52, 0.46, 0.90], [0.12, 0.20, 0.24, -0.40]], np.float32)
THETA = np.array([0.50, 0.50, 0.50, 0.20], np.float32)


def _kernel(z, theta, eps):
    return (np.abs((z - theta) / eps) < 0.5).astype(np.float32)


def test_jumprelu_forward_and_pseudo_gradients():
    g = np.array([[1.0, -2.0, 3.0, 0.5], [-1.5, 2.5, 1.0, 4.0]], np.float32)  # upstream cotangent
    out, vjp = jax.vjp(lambda z, t: jr.jumprelu(z, t, EPS), jnp.asarray(Z), jnp.asarray(THETA))
    np.testing.assert_allclose(out, Z * (Z > THETA), rtol=0, atol=0)
    dz, dtheta = vjp(jnp.asarray(g))
    # d/dz: ordinary derivative of z * H(z - theta) with H fixed; d/dtheta: -(theta/eps) K((z-theta)/eps).
    np.testing.assert_allclose(dz, g * (Z > THETA), rtol=1e-6)
    want = np.sum(-(THETA / EPS) * _kernel(Z, THETA, EPS) * g, axis=0)
    assert np.count_nonzero(want) >= 2  # the hand case exercises the kernel
    np.testing.assert_allclose(dtheta, want, rtol=1e-6)


def test_l0_pseudo_gradients_and_no_grad_to_z():
    g = np.array([1.5, 3.0], np.float32)  # upstream cotangent of each row's L0
    (f, l0), vjp = jax.vjp(lambda z, t: jr.jumprelu_l0(z, t, EPS), jnp.asarray(Z), jnp.asarray(THETA))
    np.testing.assert_array_equal(l0, (Z > THETA).sum(-1).astype(np.float32))
    dz, dtheta = vjp((jnp.zeros_like(f), jnp.asarray(g)))
    np.testing.assert_array_equal(dz, np.zeros_like(Z))
    want = np.sum(-(1.0 / EPS) * _kernel(Z, THETA, EPS) * g[:, None], 0)
    assert np.count_nonzero(want) >= 2
    np.testing.assert_allclose(dtheta, want, rtol=1e-6)


def test_jumprelu_l0_both_cotangents_and_broadcast_theta():
    """Latents and row L0 from one op: values, and theta's two pseudo-derivative terms summed, for a
    theta broadcast over rows (summed back) and one given per element."""
    g_f = np.array([[1.0, -2.0, 3.0, 0.5], [-1.5, 2.5, 1.0, 4.0]], np.float32)
    g_l0 = np.array([0.7, -1.3], np.float32)
    k = _kernel(Z, THETA, EPS)
    per_element = -(THETA / EPS) * k * g_f - (1.0 / EPS) * k * g_l0[:, None]
    for theta, want in ((THETA, per_element.sum(0)), (np.broadcast_to(THETA, Z.shape), per_element)):
        (f, l0), vjp = jax.vjp(lambda z, t: jr.jumprelu_l0(z, t, EPS), jnp.asarray(Z), jnp.asarray(theta))
        np.testing.assert_array_equal(f, Z * (Z > THETA))
        np.testing.assert_array_equal(l0, (Z > THETA).sum(-1).astype(np.float32))
        dz, dtheta = vjp((jnp.asarray(g_f), jnp.asarray(g_l0)))
        np.testing.assert_allclose(dz, g_f * (Z > THETA), rtol=1e-6)
        assert np.count_nonzero(want) >= 2
        np.testing.assert_allclose(dtheta, want, rtol=1e-6)


@pytest.mark.parametrize("blocks,target", [(1, "x"), (3, "x"), (3, "y"), (1, "skip"), (3, "skip")])
def test_mse_l0_equals_autodiff_through_jumprelu_l0(blocks, target):
    """The row-blocked training op gives the values and gradients of plain matmuls with
    ``jumprelu_l0`` (its per-latent counts are the L0 of the transposed [M, B] pre-activations),
    for any cotangents on the mse and on each latent's count: an SAE (target x), a transcoder
    (target y of another width) and a skip-transcoder (y_hat += x @ W_skip)."""
    T, K, B, d, M, eps = 2, 2, 12, 5, 7, 0.5
    d_out = d if target == "x" else 3
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(size=(T, B, d)), jnp.float32)
    y = x if target == "x" else jnp.asarray(r.normal(size=(T, B, d_out)), jnp.float32)
    p = {"w_enc": r.normal(size=(T, K, d, M)), "b_enc": 0.3 * r.normal(size=(T, K, M)),
         "w_dec": r.normal(size=(T, K, M, d_out)), "b_dec": r.normal(size=(T, K, d_out)),
         "theta": r.uniform(0.2, 1.5, size=(T, K, M))}
    if target == "skip":
        p["w_skip"] = 0.5 * r.normal(size=(T, K, d, d_out))
    p = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
    a = jnp.asarray(r.normal(size=(T, K)), jnp.float32)  # cotangent of each SAE's mse
    c = jnp.asarray(r.normal(size=(T, K, M)), jnp.float32)  # cotangent of each latent's count
    hi = jax.lax.Precision.HIGHEST

    def reference(p):
        pre = jnp.matmul(x[:, None], p["w_enc"], precision=hi) + p["b_enc"][:, :, None, :]
        f_t, counts = jr.jumprelu_l0(jnp.swapaxes(pre, -1, -2), p["theta"][..., None], eps)  # [T, K, M, B]
        x_hat = jnp.matmul(jnp.swapaxes(f_t, -1, -2), p["w_dec"], precision=hi) + p["b_dec"][:, :, None, :]
        if "w_skip" in p:
            x_hat = x_hat + jnp.matmul(x[:, None], p["w_skip"], precision=hi)
        mse = jnp.mean(jnp.sum(jnp.square(x_hat - y[:, None]), -1), -1)
        return mse, counts, pre

    def fused(p):  # row block c: rows c*b .. (c+1)*b - 1
        blocks_of = lambda a: jnp.moveaxis(a.reshape(T, blocks, B // blocks, a.shape[-1]), 1, 0)  # noqa: E731
        yb = None if target == "x" else blocks_of(y)
        return jr.mse_l0(blocks_of(x), yb, p["w_enc"], p["b_enc"], p["w_dec"], p["b_dec"], p["theta"],
                         p.get("w_skip"), eps, hi)

    mse, counts, pre = reference(p)
    window = np.abs((np.asarray(pre) - np.asarray(p["theta"])[:, :, None, :]) / eps) < 0.5
    assert 0 < np.mean(np.asarray(counts)) < B and window.sum() >= 20  # latents fire and sit in the window
    got_mse, got_counts = fused(p)
    np.testing.assert_allclose(got_mse, mse, rtol=1e-5)
    np.testing.assert_array_equal(got_counts, counts)
    want = jax.grad(lambda q: jnp.sum(a * reference(q)[0]) + jnp.sum(c * reference(q)[1]))(p)
    got = jax.grad(lambda q: jnp.sum(a * fused(q)[0]) + jnp.sum(c * fused(q)[1]))(p)
    for k in p:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert np.count_nonzero(want["theta"]) >= 10


@pytest.mark.parametrize("param", ["log", "raw"])
def test_threshold_gradient_through_parameterization(param):
    """d loss / d log_theta = theta * d loss / d theta (chain rule through exp); raw is the identity."""
    spec = GroupSpec(arch="jumprelu", sites=("a",), d=4, width=4, sweep=(0.0,), threshold_param=param,
                     bandwidth=EPS)
    params = init_params(spec, jax.random.key(0))
    name = "log_threshold" if param == "log" else "threshold"
    value = np.log(THETA) if param == "log" else THETA
    params = dict(params, W_enc=jnp.eye(4)[None, None], **{name: jnp.asarray(value)[None, None]})
    x = jnp.asarray(Z)[None]  # pre = x exactly (identity encoder, zero bias)
    lam = 0.7

    def loss(p):  # sum of latents + lam * L0 with both pseudo-derivatives
        pre = SAEGroup(spec).apply({"params": p}, x, method=SAEGroup.pre_activations)
        f, l0 = jr.jumprelu_l0(pre, theta(p)[:, :, None, :], EPS)
        return jnp.sum(f) + lam * jnp.sum(l0)

    got = np.asarray(jax.grad(loss)(params)[name][0, 0])
    k = _kernel(Z, THETA, EPS)
    d_theta = np.sum(-(THETA / EPS) * k - lam * (1.0 / EPS) * k, axis=0)
    want = THETA * d_theta if param == "log" else d_theta
    assert np.count_nonzero(want) >= 2
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("param", ["log", "raw"])
def test_gemma_scope_init(param):
    spec = GroupSpec(arch="jumprelu", sites=("a", "b"), d=16, width=64, sweep=(1e-3, 2e-3), threshold_param=param)
    p = init_params(spec, jax.random.key(1))
    assert p["W_dec"].shape == (2, 2, 64, 16) and p["W_enc"].shape == (2, 2, 16, 64)
    np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(p["W_enc"], np.swapaxes(p["W_dec"], -1, -2))
    np.testing.assert_array_equal(p["b_enc"], 0.0)
    np.testing.assert_array_equal(p["b_dec"], 0.0)
    np.testing.assert_allclose(theta(p), 0.001, rtol=1e-6)
    assert ("log_threshold" in p) == (param == "log")
    # Every SAE of the stack has its own random dictionary.
    assert not np.allclose(p["W_dec"][0, 0], p["W_dec"][0, 1]) and not np.allclose(p["W_dec"][0, 0], p["W_dec"][1, 0])


def test_remove_parallel_grad_hand_case():
    w = jnp.asarray([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]])
    g = jnp.asarray([[3.0, 4.0, 5.0], [1.0, 1.0, 1.0]])
    got = optim.remove_parallel_grad(g, w)
    # Row 2: g - (g.w) w = [1,1,1] - 1.4 * [0.6, 0.8, 0].
    np.testing.assert_allclose(got, [[0.0, 4.0, 5.0], [1 - 0.84, 1 - 1.12, 1.0]], atol=1e-6)
    np.testing.assert_allclose(np.sum(np.asarray(got) * np.asarray(w), -1), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(optim.unit_rows(g), axis=-1), 1.0, rtol=1e-6)


def test_topk_and_batchtopk_activations():
    spec = GroupSpec(arch="topk", sites=("a",), d=4, width=6, sweep=(2.0, 3.0))
    pre = jnp.asarray([[0.5, -1.0, 0.9, 0.1, 0.7, 0.2], [-0.3, -0.2, 0.4, -0.1, -0.5, -0.6]])
    pre = jnp.broadcast_to(pre, (1, 2, 2, 6))
    f = np.asarray(SAEGroup(spec).apply({"params": init_params(spec, jax.random.key(0))}, pre,
                                        method=SAEGroup.activate))
    np.testing.assert_allclose(f[0, 0], [[0, 0, 0.9, 0, 0.7, 0], [0, 0, 0.4, 0, 0, 0]])  # k=2, relu'd
    np.testing.assert_allclose(f[0, 1], [[0.5, 0, 0.9, 0, 0.7, 0], [0, 0, 0.4, 0, 0, 0]])  # k=3
    spec = GroupSpec(arch="batchtopk", sites=("a",), d=4, width=6, sweep=(2.0,))
    pre1 = pre[:, :1]
    f = np.asarray(SAEGroup(spec).apply({"params": init_params(spec, jax.random.key(0))}, pre1,
                                        method=SAEGroup.activate))
    # k*B = 4 largest of the whole batch: 0.9, 0.7, 0.5, 0.4.
    np.testing.assert_allclose(f[0, 0], [[0.5, 0, 0.9, 0, 0.7, 0], [0, 0, 0.4, 0, 0, 0]])


def test_encoder_init_scale():
    spec = GroupSpec(arch="jumprelu", sites=("a",), d=16, width=64, sweep=(1e-3,), encoder_init_scale=0.25)
    p = init_params(spec, jax.random.key(1))
    np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(p["W_enc"], 0.25 * np.swapaxes(p["W_dec"], -1, -2), rtol=1e-7)
