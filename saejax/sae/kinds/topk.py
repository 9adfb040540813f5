"""TopK (Gao et al. 2024): each row keeps its k largest pre-activations, rectified.

    f     = where(pre >= kth largest of the row, relu(pre), 0)      k per member: the sweep values
    loss  = ||x - x_hat||^2 + auxk_coeff * ||e - e_hat_dead||^2      AuxK, while any latent is dead

AuxK: e = x - x_hat (no gradient) is reconstructed by the top ``auxk_k`` pre-activations of the
latents dead for ``dead_steps`` steps, through W_dec alone. Thresholds are found shard by shard under
latent sharding (saejax.sae.sharded).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from saejax.sae import forward, sharded
from saejax.sae.kinds.base import Kind, recon_terms


def topk_activation(pre, ks: tuple[int, ...]):
    """Keep each row's k largest pre-activations (k per member), rectified."""
    kth = sharded.row_kth(pre, ks)
    return jnp.where(pre >= kth, jax.nn.relu(pre), 0.0)


def auxk(spec, hp, params, state, x, pre, x_hat):
    """[T, K]: AuxK's loss on the dead latents (the module docstring), 0 for SAEs without any."""
    dead = state["since_fired"] >= hp.dead_steps  # [T, K, M]
    kaux = min(spec.auxk_k, spec.width)
    masked = jnp.where(dead[:, :, None, :], pre, -jnp.inf)
    kth = sharded.row_kth(masked, (kaux,))
    f_aux = jnp.where(dead[:, :, None, :] & (masked >= kth), jax.nn.relu(pre), 0.0)
    e = lax.stop_gradient(x[:, None] - x_hat)
    e_hat = jnp.einsum("tkbm,tkmd->tkbd", f_aux, params["W_dec"], precision=forward.PRECISIONS[spec.precision])
    return spec.auxk_coeff * jnp.mean(jnp.sum(jnp.square(e - e_hat), -1), -1) * jnp.any(dead, -1)


class TopK(Kind):
    name = "topk"
    sweep_name = "k"
    release_name = "topk"
    saelens_name = "topk"
    infers_with_k = True

    def check_config(self, sae, check) -> None:
        """Target L0s are refused; every sweep value is an integer k within every width."""
        super().check_config(sae, check)
        for k in sae.sparsity:
            check(float(k).is_integer() and k >= 1, "sae.sparsity", f"k={k!r} must be a positive integer")
            check(all(k <= w for w in sae.widths), "sae.sparsity", f"k={k} exceeds a width")

    def ks(self, sweep) -> tuple[int, ...]:
        return tuple(int(k) for k in sweep)

    def activate(self, pre, threshold, ks):
        return topk_activation(pre, ks)

    def loss(self, spec, hp, params, state, x, lam) -> dict:
        pre, f, x_hat = self.train_forward(spec, params, x)
        return recon_terms(x, f, x_hat, aux=auxk(spec, hp, params, state, x, pre, x_hat))
