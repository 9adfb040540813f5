"""BatchTopK (Bussmann et al. 2024): TopK over a whole batch in training, a JumpReLU at inference.

    training   f = where(pre >= (k*B)-th largest of the SAE's whole batch, relu(pre), 0)
    inference  f = pre * (pre > bt_threshold)     one threshold per SAE: the running mean (0.99)
                                                  of the smallest activation kept in each batch
    loss       as TopK's, AuxK included

It is released as a JumpReLU whose threshold array repeats that one threshold.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from saejax.sae import sharded
from saejax.sae.kinds.base import recon_terms
from saejax.sae.kinds.jumprelu import threshold_activation
from saejax.sae.kinds.topk import TopK, loss_with_auxk


def batchtopk_activation(pre, ks: tuple[int, ...]):
    """Keep the k*B largest pre-activations over the whole batch of each SAE, rectified."""
    kth = sharded.batch_kth(pre, ks)  # [T, K, 1, 1]
    return jnp.where(pre >= kth, jax.nn.relu(pre), 0.0)


class BatchTopK(TopK):
    name = "batchtopk"
    release_name = "jumprelu"
    saelens_name = "jumprelu"
    uses_threshold = True
    infers_with_k = False

    def activate(self, pre, threshold, ks):
        return threshold_activation(pre, threshold)

    def inference_threshold(self, params, bt_threshold):
        return jnp.broadcast_to(jnp.asarray(bt_threshold)[:, :, None], jnp.shape(params["b_enc"]))

    def train_activation(self, spec, params, pre):
        return batchtopk_activation(pre, self.ks(spec.sweep))

    def loss(self, spec, hp, params, state, x, y, lam) -> dict:
        _, f, x_hat, aux, *recon = loss_with_auxk(self, spec, hp, params, state, x, y)
        return recon_terms(y, f, x_hat, aux=aux, **({"recon": recon[0]} if recon else {}),
                           min_active=jnp.min(jnp.where(f > 0, f, jnp.inf), axis=(2, 3)))
