"""The forward pass of stacked SAEs around their kind's activation, written once.

For x [T, B, d] (site t's rows) and the parameters of T x K SAEs (leading [T, K] axes):

    pre   = (x - b_dec * pre_encoder_bias) @ W_enc + b_enc      = x @ W_enc + encoder_bias   [T, K, B, M]
    f     = the kind's activation of pre (saejax.sae.kinds)                                   [T, K, B, M]
    x_hat = f @ W_dec + b_dec  (+ x @ W_skip, a skip-transcoder's skip term)                [T, K, B, d_out]

A transcoder's x and target y are different sites (d_in, d_out); an SAE's target is x itself.
The pre-encoder bias is folded into the encoder bias (``fold_pre_bias``) rather than subtracted
from x, so the K members of a site share their rows without K copies of them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PRECISIONS = {"default": lax.Precision.DEFAULT, "high": lax.Precision.HIGH, "highest": lax.Precision.HIGHEST}
MATMUL_DTYPES = ("float32", "bfloat16")


@functools.lru_cache(maxsize=None)
def matmul_fn(precision: str = "highest", dtype: str = "float32"):
    """The training matmul ``(a, b) -> a @ b`` (broadcast batch axes): float32 at ``precision``
    (``PRECISIONS``), or, for ``dtype`` "bfloat16", inputs rounded to bfloat16 and the products
    accumulated in float32 (``preferred_element_type``); the result is float32 either way. One
    object per setting (cached): it is a static argument of compiled code."""
    if dtype == "bfloat16":
        return lambda a, b: jnp.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                                       preferred_element_type=jnp.float32)
    return functools.partial(jnp.matmul, precision=PRECISIONS[precision])


def spec_matmul(spec):
    """``matmul_fn`` of a GroupSpec's ``precision`` and ``matmul_dtype``."""
    return matmul_fn(spec.precision, spec.matmul_dtype)


def _bf16_einsum_impl(eq, a, b):
    return jnp.einsum(eq, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def bf16_einsum(eq: str, a, b):
    """``einsum(eq, a, b)`` of bfloat16-rounded inputs, accumulated and returned in float32, whose
    gradients are einsums of the same kind (bf16 inputs, f32 accumulation) returned in float32.
    (Autodiff through ``preferred_element_type`` would upcast the operands of the backward matmuls
    to float32 and round the cotangents to bfloat16.) Every index of ``a`` and ``b`` must appear in
    the other operand or in the output."""
    return _bf16_einsum_impl(eq, a, b)


def _bf16_einsum_fwd(eq, a, b):
    return _bf16_einsum_impl(eq, a, b), (a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))


def _bf16_einsum_bwd(eq, res, g):
    a, b = res
    ins, out = eq.split("->")
    ia, ib = ins.split(",")
    g = g.astype(jnp.bfloat16)
    return (_bf16_einsum_impl(f"{out},{ib}->{ia}", g, b), _bf16_einsum_impl(f"{ia},{out}->{ib}", a, g))


bf16_einsum.defvjp(_bf16_einsum_fwd, _bf16_einsum_bwd)


def spec_einsum(spec, eq: str, a, b):
    """``jnp.einsum(eq, a, b)`` in the group's matmul dtype (``bf16_einsum`` for "bfloat16")."""
    if spec.matmul_dtype == "bfloat16":
        return bf16_einsum(eq, a, b)
    return jnp.einsum(eq, a, b, precision=PRECISIONS[spec.precision])


def fold_pre_bias(b_enc, b_dec, w_enc, precision=lax.Precision.HIGHEST):
    """b_enc - b_dec @ W_enc: then (x - b_dec) @ W_enc + b_enc = x @ W_enc + that.

    b_enc [..., M], b_dec [..., d], W_enc [..., d, M] with any leading stack axes. numpy arrays are
    computed by numpy in their own dtype (a release folds in float64), jax arrays by XLA.
    """
    if isinstance(w_enc, np.ndarray):
        return b_enc - np.matmul(b_dec[..., None, :], w_enc)[..., 0, :]
    return b_enc - jnp.einsum("...d,...dm->...m", b_dec, w_enc, precision=precision)


def encoder_bias(spec, params):
    """[T, K, M]: the group's b_enc, with its pre-encoder bias folded in when ``spec.pre_encoder_bias``."""
    if spec.pre_encoder_bias:
        return fold_pre_bias(params["b_enc"], params["b_dec"], params["W_enc"], PRECISIONS[spec.precision])
    return params["b_enc"]


def pre_activations(spec, params, x):
    """x [T, B, d] -> pre [T, K, B, M] of a group in training layout (``spec``: a GroupSpec)."""
    if spec.matmul_dtype != "float32":
        return spec_einsum(spec, "tbd,tkdm->tkbm", x, params["W_enc"]) + encoder_bias(spec, params)[:, :, None, :]
    # A broadcast matmul, not an einsum: faster on XLA:CPU (docs/training.md, XLA:CPU notes).
    return jnp.matmul(x[:, None], params["W_enc"], precision=PRECISIONS[spec.precision]) \
        + encoder_bias(spec, params)[:, :, None, :]


def decode(f, w_dec, b_dec, precision=lax.Precision.HIGHEST):
    """f [T, K, N, M] -> x_hat [T, K, N, d]."""
    return jnp.einsum("tknm,tkmd->tknd", f, w_dec, precision=precision) + b_dec[:, :, None, :]


def skip(spec, params, x):
    """x [T, B, d_in] -> x @ W_skip [T, K, B, d_out], a skip-transcoder's affine skip term; None
    for a group without ``W_skip`` (every SAE and plain transcoder)."""
    if "W_skip" not in params:
        return None
    return spec_matmul(spec)(x[:, None], params["W_skip"])


def reconstruct(spec, params, x, activation):
    """x [T, B, d] -> (pre, f, x_hat) of a group, with f = activation(pre); x_hat includes the skip
    term x @ W_skip when the group has one (``skip``)."""
    pre = pre_activations(spec, params, x)
    f = activation(pre)
    if spec.matmul_dtype != "float32":
        x_hat = spec_einsum(spec, "tknm,tkmd->tknd", f, params["W_dec"]) + params["b_dec"][:, :, None, :]
    else:
        x_hat = decode(f, params["W_dec"], params["b_dec"], PRECISIONS[spec.precision])
    s = skip(spec, params, x)
    return pre, f, x_hat if s is None else x_hat + s


def batch_variance(x):
    """x [T, B, d] -> [T]: the mean squared distance of the rows from their mean (FVU's denominator)."""
    return jnp.mean(jnp.sum(jnp.square(x - jnp.mean(x, axis=1, keepdims=True)), -1), -1)


def recon_metrics(y, f, x_hat):
    """y [T, B, d] the target (x itself for an SAE, the output site's rows for a transcoder),
    f [T, K, B, M], x_hat [T, K, B, d] -> per-SAE (mse, fvu, l0), each [T, K]; FVU is the squared
    error over the target's variance around the batch mean."""
    mse = jnp.mean(jnp.sum(jnp.square(x_hat - y[:, None]), -1), -1)
    # L0 counted in float32 (docs/training.md, XLA:CPU notes).
    return mse, mse / batch_variance(y)[:, None], jnp.mean(jnp.sum((f > 0).astype(jnp.float32), -1), -1)
