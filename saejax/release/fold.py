"""Fold the input normalization into a trained SAE, as Gemma Scope released theirs.

Training sees normalized rows x = s * x_raw (s = norm_scale of the site, E||x||^2 = 1). An SAE
trained as

    pre   = (x - p * b_dec) @ W_enc + b_enc        p = 1 with a pre-encoder bias, else 0
    f     = act(pre; theta)                        the kind's inference formula (saejax.sae.kinds)
    x_hat = f @ W_dec + b_dec

is released (as its kind's ``release_name``: BatchTopK as a JumpReLU), with C = 1 / s, as

    W_enc' = W_enc                W_dec' = W_dec
    b_enc' = C (b_enc - p * b_dec @ W_enc)
    b_dec' = C b_dec              theta' = C theta

Then on raw activations pre' = x_raw @ W_enc + b_enc' = C pre. Every activation here is positively
homogeneous (act(C z; C theta) = C act(z; theta), and top-k picks the same latents), so the released
latents are f' = C f and the reconstruction f' @ W_dec' + b_dec' = C x_hat is in raw units.

A transcoder reads x = s_in * x_raw and reconstructs y = s_out * y_raw (two sites, two scales;
no pre-encoder bias), y_hat = f @ W_dec + b_dec (+ x @ W_skip). With C = 1 / s_in as above (so
f' = C f) and R = s_in / s_out:

    W_enc' = W_enc    b_enc' = C b_enc    theta' = C theta
    W_dec' = R W_dec  b_dec' = b_dec / s_out            W_skip' = R W_skip

so f' @ W_dec' + b_dec' + x_raw @ W_skip' = y_hat / s_out, in the output site's raw units. For
s_in = s_out this is the SAE fold.
"""
from __future__ import annotations

import numpy as np

from saejax.release.errors import ReleaseError
from saejax.sae import forward, kinds


def fold(arrays: dict, norm_scale: float, pre_encoder_bias: bool, out_scale: float | None = None
         ) -> dict[str, np.ndarray]:
    """One trained SAE (W_enc [d, M], b_enc [M], W_dec [M, d], b_dec [d], optional threshold [M])
    -> the released float32 arrays, which act on raw activations. Computed in float64.
    A transcoder: ``norm_scale`` its input site's, ``out_scale`` its output site's (W_dec [M, d_out],
    b_dec [d_out], optional W_skip [d, d_out])."""
    for value in (norm_scale,) + (() if out_scale is None else (out_scale,)):
        if not np.isfinite(value) or value <= 0:
            raise ReleaseError(f"norm_scale must be a positive number, got {value!r}")
    c = 1.0 / float(norm_scale)
    w_enc = np.asarray(arrays["W_enc"], np.float64)
    b_enc = np.asarray(arrays["b_enc"], np.float64)
    b_dec = np.asarray(arrays["b_dec"], np.float64)
    if pre_encoder_bias:
        b_enc = forward.fold_pre_bias(b_enc, b_dec, w_enc)
    out = {
        "W_enc": np.asarray(arrays["W_enc"], np.float32),
        "W_dec": np.asarray(arrays["W_dec"], np.float32),
        "b_enc": (c * b_enc).astype(np.float32),
        "b_dec": (c * b_dec).astype(np.float32),
    }
    if out_scale is not None:  # a transcoder: the output side in the output site's units
        r = float(norm_scale) / float(out_scale)
        out["W_dec"] = (r * np.asarray(arrays["W_dec"], np.float64)).astype(np.float32)
        out["b_dec"] = (b_dec / float(out_scale)).astype(np.float32)
        if "W_skip" in arrays:
            out["W_skip"] = (r * np.asarray(arrays["W_skip"], np.float64)).astype(np.float32)
    thr = arrays.get("threshold")
    out["threshold"] = (np.zeros(b_enc.shape, np.float32) if thr is None
                        else (c * np.asarray(thr, np.float64)).astype(np.float32))
    return out


def group_sae(arrays: dict, meta: dict, t: int, k: int) -> tuple[dict[str, np.ndarray], str, int | None]:
    """SAE (t, k) of a trained group, folded: (arrays, released kind's name, its k when the kind
    infers with k, else None)."""
    one = {name: np.asarray(a[t, k]) for name, a in arrays.items()}
    arch = meta["arch"]
    try:
        kind = kinds.get(arch)
    except ValueError:
        raise ReleaseError(f"group {meta.get('sites')}: unknown architecture {arch!r}") from None
    if kind.uses_threshold and "threshold" not in one:
        raise ReleaseError(f"{arch} group of sites {meta.get('sites')} has no threshold array")
    if meta.get("reads"):  # a transcoder: input and output scales
        folded = fold(one, float(meta["read_norm_scale"][t]), False, float(meta["norm_scale"][t]))
    else:
        folded = fold(one, float(meta["norm_scale"][t]), bool(meta.get("pre_encoder_bias", False)))
    top_k = int(meta["k"][k]) if kind.infers_with_k else None
    return folded, kind.release_name, top_k
