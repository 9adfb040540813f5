"""Optimizer and schedules: Gemma Scope's Adam, cosine lr warmup, linear sparsity warmup.

Gemma Scope: Adam (b1=0, b2=0.999, eps=1e-8), lr 7e-5 warmed up with a cosine from 0.1*lr over
1,000 steps, lambda warmed up linearly from 0 over 10,000 steps, no decay. Schedule lengths are
resolved from the config (steps, or fractions of the run) into the static ``Hyper`` below.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Hyper:
    """Static training hyper-parameters of one group (hashable: it parameterizes the step)."""

    total_steps: int
    batch_size: int
    lr: float = 7e-5
    b1: float = 0.0
    b2: float = 0.999
    eps: float = 1e-8
    lr_warmup: int = 1000
    lr_warmup_start: float = 0.1
    lr_decay: str = "none"
    lr_decay_end: float = 0.0
    lr_decay_start: int = 0  # "linear": the step the decay starts at
    sparsity_warmup: int = 10000
    dead_steps: int = 2500  # steps without firing after which a latent counts as dead
    target_l0: tuple[float, ...] = ()  # per member; empty: fixed lambda from the sparsity sweep
    # Dead-latent remedies (jumprelu; docs/sae.md): for a latent that has not fired for revive_steps steps,
    # theta is lowered by the fraction revive_nudge per step, and/or an AuxK loss of coefficient revive_auxk
    # (spec.auxk_k such latents per row) lets it model the residual. 0: off.
    revive_steps: int = 0
    revive_nudge: float = 0.0
    revive_auxk: float = 0.0
    revive_bias: bool = False  # and b_enc raised until each fires on its best of REVIVE_ROWS rows
    b_dec_init: str = "zero"  # "zero" | "mean" | "median": b_dec set from the first batch (geometric median)


def lr_schedule(hp: Hyper):
    """step -> learning rate: cosine warmup from lr_warmup_start*lr, then constant, or a cosine decay
    over the rest of the run, or a linear decay from step lr_decay_start, to lr_decay_end*lr."""

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        lr = jnp.float32(hp.lr)
        if hp.lr_warmup > 0:
            ramp = 0.5 * (1.0 - jnp.cos(jnp.pi * jnp.clip(t / hp.lr_warmup, 0.0, 1.0)))
            lr = lr * (hp.lr_warmup_start + (1.0 - hp.lr_warmup_start) * ramp)
        if hp.lr_decay == "cosine":
            span = max(hp.total_steps - hp.lr_warmup, 1)
            frac = jnp.clip((t - hp.lr_warmup) / span, 0.0, 1.0)
            lr = lr * (hp.lr_decay_end + (1.0 - hp.lr_decay_end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac)))
        elif hp.lr_decay == "linear":
            span = max(hp.total_steps - hp.lr_decay_start, 1)
            frac = jnp.clip((t - hp.lr_decay_start) / span, 0.0, 1.0)
            lr = lr * (1.0 - (1.0 - hp.lr_decay_end) * frac)
        return lr

    return schedule


def sparsity_scale(hp: Hyper, step):
    """Linear warmup factor of the sparsity coefficient, 0 -> 1 over sparsity_warmup steps."""
    if hp.sparsity_warmup <= 0:
        return jnp.float32(1.0)
    return jnp.clip(jnp.asarray(step, jnp.float32) / hp.sparsity_warmup, 0.0, 1.0)


def optimizer(hp: Hyper) -> optax.GradientTransformation:
    """Adam. With b1 = 0 (Gemma Scope's) the first moment is the gradient itself, so it is not
    stored: optax's scale_by_rms with Adam's bias correction and eps is that Adam exactly, in two
    thirds of the memory (optax documents the equivalence)."""
    if hp.b1 == 0:
        return optax.chain(optax.scale_by_rms(hp.b2, hp.eps, eps_in_sqrt=False, bias_correction=True),
                           optax.scale_by_learning_rate(lr_schedule(hp)))
    return optax.adam(lr_schedule(hp), b1=hp.b1, b2=hp.b2, eps=hp.eps)


def remove_parallel_grad(grad_dec, w_dec):
    """Remove from each decoder row's gradient its component along the (unit) row."""
    return grad_dec - jnp.sum(grad_dec * w_dec, axis=-1, keepdims=True) * w_dec


def unit_rows(w_dec):
    return w_dec / jnp.maximum(jnp.linalg.norm(w_dec, axis=-1, keepdims=True), 1e-12)
