"""JumpReLU (Rajamanoharan et al. 2024; Gemma Scope), trained with its L0.

    f     = pre * H(pre - theta)          theta [T, K, M] > 0, a parameter: log_threshold (log theta,
                                          threshold_param "log") or threshold (theta itself, "raw")
    loss  = ||x - x_hat||^2 + lam * L0    with target L0s t: ||x - x_hat||^2 + lam * t * (L0/t - 1)^2

Dead-latent remedies (opt-in, docs/sae.md), for latents that have not fired for ``hp.revive_steps``
steps: ``revive`` lowers their theta by the fraction ``hp.revive_nudge`` per step; ``revive_auxk``
adds AuxK's loss (Gao et al.; saejax.sae.kinds.topk), the residual e = x - x_hat modelled by the
``auxk_k`` largest relu'd pre-activations of those latents through W_dec, weighted ``hp.revive_auxk``;
``hp.revive_bias`` raises their b_enc (after the update) until each fires on its best of the batch's
first ``REVIVE_ROWS`` rows, pre = theta (1 + ``REVIVE_MARGIN``) there: lowering theta cannot revive a
latent whose pre-activations are all negative; this can.

Training runs the fused op ``saejax.sae.jumprelu.mse_l0`` (reconstruction error and firing counts
with the rectangle-kernel pseudo-derivatives, over the batch in row blocks); the same activation
with those pseudo-derivatives alone is ``saejax.sae.jumprelu.jumprelu``.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from saejax.sae import forward
from saejax.sae import jumprelu as jr
from saejax.sae.kinds.base import Kind, terms
from saejax.sae.kinds.topk import auxk

REVIVE_ROWS = 128  # rows of the batch whose pre-activations hp.revive_bias reads (one [128, d] x [d, M] matmul)
REVIVE_MARGIN = 0.1


def theta(params):
    """Positive thresholds [T, K, M] from either parameterization; numpy arrays stay numpy (an
    exported group's thresholds are computed by numpy)."""
    if "log_threshold" in params:
        log = params["log_threshold"]
        return np.exp(log) if isinstance(log, np.ndarray) else jnp.exp(log)
    return params["threshold"]


def with_theta(params, value):
    """``params`` with thresholds ``value`` [T, K, M], in the parameterization ``params`` has."""
    if "log_threshold" in params:
        return dict(params, log_threshold=jnp.log(value))
    return dict(params, threshold=value)


def threshold_activation(pre, threshold):
    """pre * (pre > threshold): pre [T, K, N, M], threshold [T, K, M]."""
    return jnp.where(pre > threshold[:, :, None, :], pre, 0.0)


class JumpReLU(Kind):
    name = "jumprelu"
    sweep_name = "lambda"  # the coefficient of the L0 term (with target L0s, of the target term)
    release_name = "jumprelu"
    saelens_name = "jumprelu"
    uses_threshold = True
    matryoshka = True

    def check_config(self, sae, check) -> None:
        """Any sweep of lambdas, or target L0s."""

    def extra_params(self, spec) -> dict[str, float]:
        if spec.threshold_param == "log":
            return {"log_threshold": math.log(spec.threshold_init)}
        return {"threshold": spec.threshold_init}

    def activate(self, pre, threshold, ks):
        return threshold_activation(pre, threshold)

    def inference_threshold(self, params, bt_threshold):
        return theta(params)

    def train_activation(self, spec, params, pre):
        return jr.jumprelu(pre, theta(params)[:, :, None, :], spec.bandwidth)

    def loss(self, spec, hp, params, state, x, y, lam) -> dict:
        """mse and L0 from ``mse_l0`` over row blocks; the L0 term as the module docstring says."""
        n = jr.row_block_count(x.shape[1], spec.width)
        xb = jr.row_blocks(x, n)
        yb = None if y is x else jr.row_blocks(y, n)  # an SAE's target is x itself
        mse, counts, *full = jr.mse_l0(xb, yb, params["W_enc"], forward.encoder_bias(spec, params), params["W_dec"],
                                params["b_dec"], theta(params), params.get("W_skip"), spec.bandwidth,
                                forward.spec_matmul(spec), spec.matryoshka)
        l0_pseudo = jnp.sum(counts, -1) / x.shape[1]  # the L0, with theta's pseudo-derivative
        if hp.target_l0:  # lam * t * (L0/t - 1)^2: an L0 penalty 2 lam (L0/t - 1) that turns to a bonus below t
            target = jnp.asarray(hp.target_l0, jnp.float32)[None, :]
            sparsity = lam * target * jnp.square(l0_pseudo / target - 1.0)
        else:
            sparsity = lam * l0_pseudo
        aux = jnp.zeros_like(mse)
        if hp.revive_steps and hp.revive_auxk:
            aux = lax.cond(jnp.any(state["since_fired"] >= hp.revive_steps),
                           lambda: self.revive_auxk(spec, hp, params, state, x, y), lambda: aux)
        # With Matryoshka prefixes mse is their sum (the loss term) and full the full dictionary's (the metrics).
        metric = lax.stop_gradient(full[0]) if full else mse
        return terms(metric, metric / forward.batch_variance(y)[:, None], lax.stop_gradient(l0_pseudo), counts > 0,
                     recon=mse, sparsity=sparsity, aux=aux)

    def revive_auxk(self, spec, hp, params, state, x, y):
        """[T, K]: AuxK's loss on the latents dead for ``hp.revive_steps`` steps (module docstring)."""
        pre, _, x_hat = forward.reconstruct(spec, params, x, lambda p: threshold_activation(p, theta(params)))
        spec = dataclasses.replace(spec, auxk_coeff=hp.revive_auxk)
        return auxk(spec, dataclasses.replace(hp, dead_steps=hp.revive_steps), params, state, y, pre, x_hat)

    def revive(self, spec, hp, params, state, x):
        """The latents dead for ``hp.revive_steps`` steps: theta lowered by ``hp.revive_nudge``, then
        b_enc raised by ``hp.revive_bias`` (module docstring; its matmul runs only while one is dead)."""
        if not hp.revive_steps:
            return params
        dead = state["since_fired"] >= hp.revive_steps
        if hp.revive_nudge:
            params = with_theta(params, jnp.where(dead, (1.0 - hp.revive_nudge) * theta(params), theta(params)))
        if hp.revive_bias:
            def raise_bias(params):
                best = jnp.max(forward.pre_activations(spec, params, x[:, :REVIVE_ROWS]), axis=2)  # [T, K, M]
                lift = jnp.maximum(theta(params) * (1.0 + REVIVE_MARGIN) - best, 0.0)
                return dict(params, b_enc=params["b_enc"] + jnp.where(dead, lift, 0.0).astype(params["b_enc"].dtype))
            params = lax.cond(jnp.any(dead), raise_bias, lambda p: p, params)
        return params

    def constrain(self, spec, params):
        """A raw theta stays positive."""
        if "threshold" in params:
            return dict(params, threshold=jnp.maximum(params["threshold"], 1e-6))
        return params

    def calibrates(self, spec) -> bool:
        return spec.threshold_init_l0 > 0

    def calibrate(self, spec, params, x):
        """Thresholds from data (opt-in, ``spec.threshold_init_l0`` = L0_init > 0).

        theta_i = max(q_i, threshold_init), q_i the midpoint of the n-th and (n+1)-th largest
        pre-activations of latent i over the batch x [T, B, d], n = clip(round(B * L0_init / M), 1, B - 1):
        every latent starts firing on n of the B rows (pre > theta), so the SAE starts at L0 ~ L0_init
        instead of ~M/2 (docs/sae.md).
        """
        pre = forward.pre_activations(spec, params, x)  # [T, K, B, M]
        B = pre.shape[2]
        n = max(1, min(B - 1, round(B * spec.threshold_init_l0 / spec.width)))
        top = lax.top_k(jnp.swapaxes(pre, -1, -2), n + 1)[0]  # [T, K, M, n + 1]
        q = 0.5 * (top[..., -2] + top[..., -1])  # [T, K, M]
        return with_theta(params, jnp.maximum(q, spec.threshold_init).astype(pre.dtype))
