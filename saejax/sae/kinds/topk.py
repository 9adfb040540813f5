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

from saejax.sae import forward, matryoshka, sharded
from saejax.sae.kinds.base import Kind, recon_terms


def topk_activation(pre, ks: tuple[int, ...]):
    """Keep each row's k largest pre-activations (k per member), rectified."""
    kth = sharded.row_kth(pre, ks)
    return jnp.where(pre >= kth, jax.nn.relu(pre), 0.0)


def auxk_latents(spec, hp, state, pre):
    """(f_aux [T, K, B, M], dead [T, K, M]): each row's top ``auxk_k`` pre-activations among the dead
    latents, rectified."""
    dead = state["since_fired"] >= hp.dead_steps  # [T, K, M]
    kaux = min(spec.auxk_k, spec.width)
    masked = jnp.where(dead[:, :, None, :], pre, -jnp.inf)
    kth = sharded.row_kth(masked, (kaux,))
    return jnp.where(dead[:, :, None, :] & (masked >= kth), jax.nn.relu(pre), 0.0), dead


def auxk_loss(spec, y, x_hat, e_hat, dead):
    """[T, K]: AuxK's loss (the module docstring) from its reconstruction e_hat, 0 without dead
    latents; y the target."""
    e = lax.stop_gradient(y[:, None] - x_hat)
    return spec.auxk_coeff * jnp.mean(jnp.sum(jnp.square(e - e_hat), -1), -1) * jnp.any(dead, -1)


def auxk(spec, hp, params, state, y, pre, x_hat):
    """[T, K]: AuxK's loss on the dead latents (the module docstring), 0 for SAEs without any; y the target."""
    f_aux, dead = auxk_latents(spec, hp, state, pre)
    e_hat = forward.spec_einsum(spec, "tkbm,tkmd->tkbd", f_aux, params["W_dec"])
    return auxk_loss(spec, y, x_hat, e_hat, dead)


def loss_with_auxk(kind, spec, hp, params, state, x, y) -> dict:
    """TopK's and BatchTopK's loss terms of reconstructing y from x: the reconstruction and AuxK.

    With the batch split over the mesh's ``data`` axis, f and AuxK's f_aux go through W_dec in one
    matmul (stacked on a new axis), so W_dec's gradient is one contraction over both and one
    all-reduce per step, not two (docs/training.md, communication). Otherwise two matmuls, as
    written in the module docstring (no [2, B, M] copy).
    """
    if spec.matryoshka:
        return matryoshka_loss(kind, spec, hp, params, state, x, y)
    if sharded.axis_sizes(sharded.current_mesh(), "data") == (1,):
        pre, f, x_hat = kind.train_forward(spec, params, x)
        return pre, f, x_hat, auxk(spec, hp, params, state, y, pre, x_hat)
    pre = forward.pre_activations(spec, params, x)
    f = kind.train_activation(spec, params, pre)
    f_aux, dead = auxk_latents(spec, hp, state, pre)
    both = forward.spec_einsum(spec, "tksbm,tkmd->tksbd", jnp.stack([f, f_aux], 2), params["W_dec"])
    x_hat = both[:, :, 0] + params["b_dec"][:, :, None, :]
    s = forward.skip(spec, params, x)
    x_hat = x_hat if s is None else x_hat + s
    return pre, f, x_hat, auxk_loss(spec, y, x_hat, both[:, :, 1], dead)


def matryoshka_loss(kind, spec, hp, params, state, x, y):
    """``loss_with_auxk`` with Matryoshka prefixes: the top-k selection once over all latents, the
    prefix blocks decoded once (saejax.sae.matryoshka; autodiff turns the running sums into suffix
    sums), AuxK on the full dictionary's error. Returns (pre, f, x_hat, aux, recon): recon [T, K]
    the sum over the prefixes of their errors."""
    pre = forward.pre_activations(spec, params, x)
    f = kind.train_activation(spec, params, pre)
    base = params["b_dec"][:, :, None, :]
    s = forward.skip(spec, params, x)
    recon, x_hat = matryoshka.prefix_mse(matryoshka.decodes(spec, f, params["W_dec"]),
                                         base if s is None else base + s, y)
    return pre, f, x_hat, auxk(spec, hp, params, state, y, pre, x_hat), recon


class TopK(Kind):
    name = "topk"
    sweep_name = "k"
    release_name = "topk"
    saelens_name = "topk"
    infers_with_k = True
    matryoshka = True

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

    def loss(self, spec, hp, params, state, x, y, lam) -> dict:
        _, f, x_hat, aux, *recon = loss_with_auxk(self, spec, hp, params, state, x, y)
        return recon_terms(y, f, x_hat, aux=aux, **({"recon": recon[0]} if recon else {}))
