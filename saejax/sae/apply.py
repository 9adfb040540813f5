"""Inference with exported SAE arrays (the saejax.sae.io format), stacked [T, K] or single.

These are the formulas a released SAE is used with, written once for every consumer (evaluation,
released SAEs):

    pre   = x @ W_enc + b_enc                   (b_enc already includes -b_dec @ W_enc when
                                                 pre_encoder_bias; see ``site_arrays``)
    f     = the kind's inference formula (saejax.sae.kinds: ``Kind.activate``)
    x_hat = f @ W_dec + b_dec

Stacked arrays: W_enc [T, K, d, M], b_enc [T, K, M], W_dec [T, K, M, d], b_dec [T, K, d],
threshold [T, K, M]; ``x`` is then [T, N, d] and results [T, K, N, ...]. One SAE: the same
without the [T, K] axes, ``x`` [..., d]. Transcoders: W_dec [.., M, d_out], b_dec [.., d_out]
and, for skip-transcoders, W_skip [.., d, d_out]: x_hat += x @ W_skip.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from saejax.sae import forward, kinds

HIGHEST = lax.Precision.HIGHEST


def site_arrays(meta: dict, arrays: dict, t: int) -> dict:
    """Site t's K SAEs of a group (arrays and group.json from saejax.sae.io) as stacked [1, K, ...]
    jax arrays, the pre-encoder bias folded into b_enc (``forward.fold_pre_bias``)."""
    site = {k: jnp.asarray(v[t:t + 1]) for k, v in arrays.items()}
    if meta["pre_encoder_bias"]:
        site["b_enc"] = forward.fold_pre_bias(site["b_enc"], site["b_dec"], site["W_enc"], HIGHEST)
    return site


def inference_ks(meta: dict) -> tuple[int, ...] | None:
    """The ``ks`` argument of ``encode_stacked`` for a group: each member's k if its kind infers
    with k, else None."""
    return tuple(int(k) for k in meta["k"]) if kinds.get(meta["arch"]).infers_with_k else None


def encode_stacked(arch: str, arrays: dict, x, ks=None):
    """A group: x [T, N, d] -> f [T, K, N, M] (pre-encoder bias already folded)."""
    # An einsum here, a broadcast matmul in training (forward.pre_activations): the sums agree to
    # rounding; this one gives evaluation's numbers.
    pre = jnp.einsum("tnd,tkdm->tknm", x, arrays["W_enc"], precision=HIGHEST) + arrays["b_enc"][:, :, None, :]
    return kinds.get(arch).activate(pre, arrays.get("threshold"), ks)


def decode_stacked(arrays: dict, f, x=None):
    """A group: f [T, K, N, M] -> x_hat [T, K, N, d]; a skip-transcoder's (``W_skip`` [T, K, d_in, d]
    in ``arrays``) adds x @ W_skip for its input x [T, N, d_in]."""
    x_hat = forward.decode(f, arrays["W_dec"], arrays["b_dec"], HIGHEST)
    if "W_skip" in arrays:
        x_hat = x_hat + jnp.einsum("tnd,tkde->tkne", x, arrays["W_skip"], precision=HIGHEST)
    return x_hat


def _one(arrays: dict) -> dict:
    return {name: a[None, None] for name, a in arrays.items()}


def encode(arch: str, arrays: dict, x, k=None):
    """One SAE: x [..., d] -> f [..., M]. ``arrays`` with the pre-encoder bias already folded."""
    f = encode_stacked(arch, _one(arrays), x.reshape(1, -1, x.shape[-1]), None if k is None else (k,))
    return f.reshape(x.shape[:-1] + f.shape[-1:])


def decode(arrays: dict, f, x=None):
    """One SAE: f [..., M] -> x_hat [..., d]; a skip-transcoder adds x @ W_skip (x [..., d_in] its input)."""
    xs = None if x is None else x.reshape(1, -1, x.shape[-1])
    x_hat = decode_stacked(_one(arrays), f.reshape(1, 1, -1, f.shape[-1]), xs)
    return x_hat.reshape(f.shape[:-1] + x_hat.shape[-1:])
