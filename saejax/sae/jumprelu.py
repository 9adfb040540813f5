"""JumpReLU and its L0 with straight-through pseudo-derivatives (Rajamanoharan et al. 2024).

    jumprelu(z, theta) = z * H(z - theta)
    L0(z, theta)       = sum_i H(z_i - theta_i)      (over the last axis: the latents of a row)

H has zero derivative almost everywhere, so the threshold gets a pseudo-derivative through a kernel
K of bandwidth eps (the rectangle: K(u) = 1 for |u| < 1/2):

    d jumprelu / d theta = -(theta / eps) K((z - theta) / eps)
    d L0       / d theta_i = -(1 / eps)   K((z_i - theta_i) / eps)

z gets the ordinary derivative of z * H(z - theta) with H held fixed (H for jumprelu) and nothing
through the L0. ``theta`` may broadcast against ``z``: its cotangent is summed back to its own shape.

Training takes both from one op, ``jumprelu_l0``, whose backward pass writes the z cotangent once
and sums theta's two terms in one reduction; ``jumprelu`` is its first output. (The L0 as a sum of
a separate elementwise step function, with the L0 metric counted again from f, made XLA:CPU write
twice as many [B, M] arrays per train step; docs/training.md.)
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
def jumprelu_l0(z, theta, eps):
    """(jumprelu(z, theta), L0(z, theta)): latents [..., M] and each row's L0 [...].

    For theta > 0 (SAE thresholds always are): then a latent fires exactly where it is positive,
    and the L0 is counted from the latents themselves, in the reduction that reads them anyway.
    """
    f = jnp.where(z > theta, z, 0.0)
    return f, jnp.sum(jnp.sign(f), -1)


def _jumprelu_l0_fwd(z, theta, eps):
    return jumprelu_l0(z, theta, eps), (z, theta)


def _jumprelu_l0_bwd(eps, res, g):
    z, theta = res
    g_f, g_l0 = g
    dz = jnp.where(z > theta, g_f, 0.0)
    # jumprelu's -(theta/eps) K g_f plus the L0's -(1/eps) K g_l0 in one reduction, with theta
    # multiplied in after the sum (a sum of a [B, M] product with theta in it was far slower in
    # XLA:CPU's reduction kernels).
    window = rectangle((z - theta) / eps)
    d = _sum_to(window * (g_f + g_l0[..., None] / theta), jnp.shape(theta))
    return dz, -(theta * d) / eps


jumprelu_l0.defvjp(_jumprelu_l0_fwd, _jumprelu_l0_bwd)


def jumprelu(z, theta, eps):
    """z * H(z - theta), with the pseudo-derivative for theta (``jumprelu_l0``'s latents)."""
    return jumprelu_l0(z, theta, eps)[0]
