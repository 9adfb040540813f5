"""JumpReLU and its step function with straight-through pseudo-derivatives (Rajamanoharan et al. 2024).

    jumprelu(z, theta) = z * H(z - theta)
    step(z, theta)     = H(z - theta)

H has zero derivative almost everywhere, so the threshold gets a pseudo-derivative through a kernel
K of bandwidth eps (the rectangle: K(u) = 1 for |u| < 1/2):

    d jumprelu / d theta = -(theta / eps) K((z - theta) / eps)
    d step     / d theta = -(1 / eps)     K((z - theta) / eps)

z gets the ordinary derivative of z * H(z - theta) with H held fixed (H for jumprelu) and nothing
through the step (0 for step). ``theta`` may broadcast against ``z``: its cotangent is summed back
to its own shape.

``jumprelu_l0`` is the training form: the latents and each row's L0 = sum_i step(z_i, theta_i)
together, with one pass for the z cotangent and one reduction for theta's. Written as ``jumprelu``
and ``step`` apart, XLA:CPU wrote eight [B, M] arrays per step instead of four (about 50 ms of a
500 ms step at B=4096, M=4608; docs/training.md).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def rectangle(u):
    """The rectangle kernel: 1 on (-1/2, 1/2), 0 elsewhere."""
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


def _sum_to(x, shape):
    """Sum ``x`` over the axes along which ``shape`` was broadcast to it."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, s in enumerate(shape) if s == 1 and x.shape[i + lead] != 1)
    return jnp.sum(x, axis=axes, keepdims=True).reshape(shape) if axes else x


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z, theta, eps):
    return z * (z > theta).astype(z.dtype)


def _jumprelu_fwd(z, theta, eps):
    return jumprelu(z, theta, eps), (z, theta)


def _jumprelu_bwd(eps, res, g):
    z, theta = res
    dz = g * (z > theta).astype(z.dtype)
    dtheta = -(theta / eps) * _sum_to(rectangle((z - theta) / eps) * g, jnp.shape(theta))
    return dz, dtheta


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(z, theta, eps):
    return (z > theta).astype(z.dtype)


def _step_fwd(z, theta, eps):
    return step(z, theta, eps), (z, theta)


def _step_bwd(eps, res, g):
    z, theta = res
    dtheta = -(1.0 / eps) * _sum_to(rectangle((z - theta) / eps) * g, jnp.shape(theta))
    return jnp.zeros_like(z), dtheta


step.defvjp(_step_fwd, _step_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu_l0(z, theta, eps):
    """(jumprelu(z, theta), sum over the last axis of step(z, theta)): latents [..., M], L0 [...].

    For theta > 0 (SAE thresholds always are): then a latent fires exactly where it is positive,
    and the L0 is counted from the latents themselves, in the reduction that reads them anyway.
    """
    fires = z > theta
    f = jnp.where(fires, z, 0.0)
    return f, jnp.sum(jnp.sign(f), -1)


def _jumprelu_l0_fwd(z, theta, eps):
    return jumprelu_l0(z, theta, eps), (z, theta)


def _jumprelu_l0_bwd(eps, res, g):
    z, theta = res
    g_f, g_l0 = g
    dz = jnp.where(z > theta, g_f, 0.0)
    # jumprelu's -(theta/eps) K g_f plus step's -(1/eps) K g_l0 in one reduction, theta multiplied
    # in after the sum (the sum of a [B, M] product with theta in it ran 10x slower on XLA:CPU).
    window = rectangle((z - theta) / eps)
    d = _sum_to(window * (g_f + g_l0[..., None] / theta), jnp.shape(theta))
    return dz, -(theta * d) / eps


jumprelu_l0.defvjp(_jumprelu_l0_fwd, _jumprelu_l0_bwd)
