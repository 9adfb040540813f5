"""JumpReLU's dead-latent remedy, data-initialized b_dec and the linear lr decay (docs/sae.md)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import config as cfg
from saejax.data.synthetic import SyntheticSource
from saejax.sae.group import GroupSpec, SAEGroup
from saejax.train import optim
from saejax.train.step import data_b_dec, init_state, make_train_step


def _dead_after_training(**remedy):
    """A source built to leave latents dead: 16 planted directions in d = 32 (2 per row) for 128
    latents, so that the L0 term pushes most thresholds above every row. Returns the fraction of
    latents that never fire on 4,096 held-out rows."""
    src = SyntheticSource(("res.0",), d=32, n_features=16, active=2, zipf=1.0, noise=0.01, seed=0)
    spec = GroupSpec(arch="jumprelu", sites=("res.0",), d=32, width=128, sweep=(0.01,), threshold_param="raw",
                     encoder_init_scale=0.25)
    hp = optim.Hyper(total_steps=300, batch_size=256, lr=3e-3, lr_warmup=20, sparsity_warmup=100, **remedy)
    return _dead_fraction(src, spec, hp)


def _dead_fraction(src, spec, hp, dead_init: int = 0):
    """Train ``spec`` on ``src`` for hp.total_steps (the first ``dead_init`` latents start with
    b_enc = -10: no row reaches theta); the fraction of latents silent on 4,096 held-out rows."""
    scale = src.norm_scale("res.0")
    state, step = init_state(spec, hp, jax.random.key(0)), jax.jit(make_train_step(spec, hp), donate_argnums=0)
    if dead_init:
        state["params"] = dict(state["params"], b_enc=state["params"]["b_enc"].at[..., :dead_init].set(-10.0))
    for i in range(hp.total_steps):
        state, _ = step(state, jnp.asarray(src.batch(src.sites, i, hp.batch_size) * scale))
    x = src.batch(src.sites, 10 ** 6, 4096) * scale
    _, f, _ = SAEGroup(spec).apply({"params": state["params"]}, jnp.asarray(x), None, False)
    return float(np.mean(~np.any(np.asarray(f[0, 0]) > 0, 0)))


def test_threshold_nudge_revives_dead_latents():
    """Measured: 66% dead without the remedy, 32% with it (revive after 20 steps, 2% of theta a step)."""
    off = _dead_after_training()
    on = _dead_after_training(revive_steps=20, revive_nudge=0.02)
    assert off > 0.5 and on < 0.45, (off, on)


def test_nudge_lowers_only_dead_thresholds():
    spec = GroupSpec(arch="jumprelu", sites=("a",), d=4, width=6, sweep=(0.0,), threshold_param="log",
                     threshold_init=0.5)
    hp = optim.Hyper(total_steps=10, batch_size=3, lr=1e-9, lr_warmup=0, revive_steps=5, revive_nudge=0.1)
    state = init_state(spec, hp, jax.random.key(0))
    state["since_fired"] = jnp.asarray([[[0, 4, 5, 9, 0, 100]]], jnp.int32)
    x = jnp.zeros((1, 3, 4), jnp.float32)  # nothing fires, so no gradient moves theta
    new, _ = jax.jit(make_train_step(spec, hp))(state, x)
    np.testing.assert_allclose(np.exp(new["params"]["log_threshold"][0, 0]),
                               [0.5, 0.5, 0.45, 0.45, 0.5, 0.45], rtol=1e-5)


def test_b_dec_from_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 201, 3)).astype(np.float32) + np.asarray([[[5, 0, 0]], [[0, -3, 1]]], np.float32)
    x[:, :20] += 100.0  # outliers move the mean, not the median
    params = {"b_dec": jnp.zeros((2, 3, 3), jnp.float32)}
    mean = data_b_dec(optim.Hyper(1, 1, b_dec_init="mean"), params, jnp.asarray(x))["b_dec"]
    med = data_b_dec(optim.Hyper(1, 1, b_dec_init="median"), params, jnp.asarray(x))["b_dec"]
    np.testing.assert_allclose(mean[:, 1], x.mean(1), rtol=1e-5)
    want = np.asarray([[5, 0, 0], [0, -3, 1]], np.float32)
    assert np.abs(np.asarray(med[:, 2]) - want).max() < 0.5 < np.abs(np.asarray(mean[:, 0]) - want).max()


def test_linear_lr_decay():
    hp = optim.Hyper(total_steps=100, batch_size=1, lr=1.0, lr_warmup=0, lr_decay="linear", lr_decay_start=60,
                     lr_decay_end=0.1)
    lr = optim.lr_schedule(hp)
    np.testing.assert_allclose([float(lr(s)) for s in (0, 60, 80, 100)], [1.0, 1.0, 0.55, 0.1], rtol=1e-6)


@pytest.mark.parametrize("key,value", [("sae.revive_nudge", 1.0), ("sae.revive_auxk", -1.0),
                                       ("sae.revive_tokens", -1), ("sae.b_dec_init", "'geo'"),
                                       ("train.lr_decay", "'step'"), ("train.lr_decay_start", -1.0)])
def test_bad_values_name_their_key(key, value):
    with pytest.raises(cfg.ConfigError, match=key.replace(".", r"\.")):
        cfg.load("experiments/default.py", [f"{key}={value}"])


def test_remedies_are_jumprelu_only():
    with pytest.raises(cfg.ConfigError, match=r"sae\.revive_tokens"):
        cfg.load("experiments/default.py", ["sae.arch=topk", "sae.target_l0=()", "sae.sparsity=(8.0,)",
                                            "sae.revive_tokens=1000", "sae.revive_nudge=0.01"])


def test_bias_revive_fires_latents_a_threshold_nudge_cannot():
    """A dead latent whose pre-activations are all negative: no theta > 0 makes it fire; revive_bias
    lifts its b_enc so that it fires on its best of the first rows (and leaves live latents alone)."""
    spec = GroupSpec(arch="jumprelu", sites=("a",), d=4, width=3, sweep=(0.0,), threshold_param="raw",
                     threshold_init=0.5)
    hp = optim.Hyper(total_steps=10, batch_size=8, lr=1e-9, lr_warmup=0, revive_steps=5, revive_bias=True)
    state = init_state(spec, hp, jax.random.key(0))
    w = np.zeros((1, 1, 4, 3), np.float32)
    w[0, 0, 0] = [1.0, -1.0, 1.0]  # latents 0, 2 read +x0, latent 1 reads -x0
    state["params"] = dict(state["params"], W_enc=jnp.asarray(w), b_enc=jnp.asarray([[[0.0, -2.0, 0.0]]]))
    state["since_fired"] = jnp.asarray([[[0, 9, 9]]], jnp.int32)  # latent 0 alive; 1 and 2 dead
    x = np.zeros((1, 8, 4), np.float32)
    x[0, :, 0] = np.linspace(0.1, 0.8, 8)  # latent 1's pre-activations: -2.1 .. -2.8
    new, _ = jax.jit(make_train_step(spec, hp))(state, jnp.asarray(x))
    b = np.asarray(new["params"]["b_enc"][0, 0])
    pre = x[0] @ np.asarray(new["params"]["W_enc"][0, 0]) + b
    theta = np.asarray(new["params"]["threshold"][0, 0])
    assert abs(b[0]) < 1e-6 and (pre[:, 1] > theta[1]).sum() >= 1 and (pre[:, 2] > theta[2]).sum() >= 1
    np.testing.assert_allclose(pre[:, 1].max(), 1.1 * theta[1], rtol=1e-4)  # fires on its best row, just


def _dead_from_bad_init(**remedy):
    """Half of the latents start dead (b_enc = -10: no row reaches theta) on a source with more
    planted directions (256 in d = 64, 4 per row) than latents (128), so that revived latents have
    something to learn. Returns the fraction dead on 4,096 held-out rows after 300 steps."""
    src = SyntheticSource(("res.0",), d=64, n_features=256, active=4, zipf=0.5, noise=0.01, seed=1)
    spec = GroupSpec(arch="jumprelu", sites=("res.0",), d=64, width=128, sweep=(0.0,), threshold_param="raw",
                     encoder_init_scale=0.5)
    hp = optim.Hyper(total_steps=300, batch_size=256, lr=3e-3, lr_warmup=20, sparsity_warmup=100,
                     target_l0=(8.0,), **remedy)
    return _dead_fraction(src, spec, hp, dead_init=64)


def test_bias_revive_revives_what_the_nudge_cannot():
    """Latents whose pre-activations are far below zero: lowering theta cannot revive them, raising
    b_enc to their best row does, and they stay alive (there are more directions than latents)."""
    off = _dead_from_bad_init()
    nudge = _dead_from_bad_init(revive_steps=10, revive_nudge=0.02)
    bias = _dead_from_bad_init(revive_steps=10, revive_nudge=0.02, revive_bias=True)
    print(off, nudge, bias)
    assert off > 0.4 and nudge > 0.4 and bias < 0.1, (off, nudge, bias)
