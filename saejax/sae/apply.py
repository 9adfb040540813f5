"""Inference with exported SAE arrays (the saejax.sae.io format), stacked [T, K] or single.

These are the formulas a released SAE is used with, written once for every consumer:

    pre   = x @ W_enc + b_enc                   (b_enc already includes -b_dec @ W_enc when
                                                 pre_encoder_bias; see ``fold_pre_bias``)
    f     = jumprelu / batchtopk: pre * (pre > threshold)
            topk: the k largest of max(pre, 0)      relu: max(pre, 0)
    x_hat = f @ W_dec + b_dec

Arrays of one SAE: W_enc [d, M], b_enc [M], W_dec [M, d], b_dec [d], threshold [M].
Stacked arrays carry leading [T, K] axes; ``x`` is then [T, N, d] and results [T, K, N, ...].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from saejax.sae.group import topk_activation

HIGHEST = lax.Precision.HIGHEST


def fold_pre_bias(arrays: dict, pre_encoder_bias: bool) -> dict:
    """Move a pre-encoder bias into b_enc: (x - b_dec) @ W_enc + b_enc = x @ W_enc + b_enc'."""
    if not pre_encoder_bias:
        return arrays
    b = arrays["b_enc"] - jnp.einsum("...d,...dm->...m", arrays["b_dec"], arrays["W_enc"], precision=HIGHEST)
    return dict(arrays, b_enc=b)


def activate(arch: str, pre, threshold=None, k=None):
    """Latents from pre-activations; ``threshold`` broadcasts against ``pre``; ``k`` an int."""
    if arch in ("jumprelu", "batchtopk"):
        return jnp.where(pre > threshold, pre, 0.0)
    if arch == "relu":
        return jax.nn.relu(pre)
    if arch == "topk":
        kth = lax.top_k(pre, k)[0][..., -1:]
        return jnp.where(pre >= kth, jax.nn.relu(pre), 0.0)
    raise ValueError(f"unknown architecture {arch!r}")


def encode(arch: str, arrays: dict, x, k=None):
    """One SAE: x [..., d] -> f [..., M]. ``arrays`` with the pre-encoder bias already folded."""
    pre = jnp.einsum("...d,dm->...m", x, arrays["W_enc"], precision=HIGHEST) + arrays["b_enc"]
    return activate(arch, pre, arrays.get("threshold"), k)


def decode(arrays: dict, f):
    return jnp.einsum("...m,md->...d", f, arrays["W_dec"], precision=HIGHEST) + arrays["b_dec"]


def encode_stacked(arch: str, arrays: dict, x, ks=None):
    """A group: x [T, N, d] -> f [T, K, N, M] (pre-encoder bias already folded)."""
    pre = jnp.einsum("tnd,tkdm->tknm", x, arrays["W_enc"], precision=HIGHEST) + arrays["b_enc"][:, :, None, :]
    if arch == "topk":
        return topk_activation(pre, tuple(int(k) for k in ks))
    thr = arrays.get("threshold")
    return activate(arch, pre, None if thr is None else thr[:, :, None, :])


def decode_stacked(arrays: dict, f):
    """A group: f [T, K, N, M] -> x_hat [T, K, N, d]."""
    return jnp.einsum("tknm,tkmd->tknd", f, arrays["W_dec"], precision=HIGHEST) + arrays["b_dec"][:, :, None, :]
