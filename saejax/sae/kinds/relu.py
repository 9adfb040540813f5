"""ReLU with an L1 penalty weighted by decoder norms (Anthropic, April 2024).

    f     = max(pre, 0)
    loss  = ||x - x_hat||^2 + lam * sum_i f_i ||W_dec_i||      decoder norms free (init 0.1)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from saejax.sae.kinds.base import Kind, recon_terms


class ReLU(Kind):
    name = "relu"
    sweep_name = "l1_coeff"
    release_name = "relu"
    saelens_name = "standard"
    unit_decoder = False  # the L1 is weighted by the decoder norms instead

    def activate(self, pre, threshold, ks):
        return jax.nn.relu(pre)

    def loss(self, spec, hp, params, state, x, y, lam) -> dict:
        _, f, x_hat = self.train_forward(spec, params, x)
        dec_norm = jnp.linalg.norm(params["W_dec"], axis=-1)[:, :, None, :]
        return recon_terms(y, f, x_hat, sparsity=lam * jnp.mean(jnp.sum(f * dec_norm, -1), -1))
