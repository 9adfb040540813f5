"""A trained CLT's folder (saejax layout, docs/formats.md) and circuit-tracer's cross-layer layout.

saejax layout, ``<folder>/``:
    params.safetensors  float32 W_enc [L, d_in, M], b_enc [L, M], b_dec [L, d_out], threshold [L, M]
                        (jumprelu and batchtopk: the inference threshold), W_dec_<l> [M, L - l, d_out]
    clt.json            arch, layers, d_in, d_out, width, sparsity, norm_scale_in [L], norm_scale_out [L],
                        model, steps, tokens
The weights act on normalized rows (x_raw * norm_scale_in[l], outputs / norm_scale_out[l']);
``fold`` gives raw-space weights.

circuit-tracer's layout (``circuit_tracer.transcoder.cross_layer_transcoder.load_clt(folder)``):
    W_enc_<l>.safetensors  W_enc_<l> [M, d_in], b_enc_<l> [M], b_dec_<l> [d_out], threshold_<l> [M]
    W_dec_<l>.safetensors  W_dec_<l> [M, n - l, d_out]
for every layer l of the model, 0..n-1, raw-space weights (normalization folded in).
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import load_file, save_file

from saejax import files
from saejax.sae import clt


class ExportError(ValueError):
    """A CLT that a layout cannot hold; the message is one line."""


def arrays(spec: clt.CLTSpec, params, bt_threshold) -> dict[str, np.ndarray]:
    """Training parameters -> the saejax file's float32 arrays."""
    out = {k: np.asarray(params[k], np.float32) for k in ("W_enc", "b_enc", "b_dec")}
    if spec.arch == "jumprelu":
        out["threshold"] = np.exp(np.asarray(params["log_threshold"], np.float32))
    elif spec.arch == "batchtopk":
        out["threshold"] = np.broadcast_to(np.asarray(bt_threshold, np.float32)[:, None], out["b_enc"].shape).copy()
    for l, w in enumerate(params["W_dec"]):
        out[f"W_dec_{l}"] = np.asarray(w, np.float32)
    return out


def save(path: str, spec: clt.CLTSpec, params, bt_threshold, scales_in, scales_out, **meta) -> None:
    """Write a CLT folder atomically."""
    info = {"arch": spec.arch, "layers": list(spec.layers), "d_in": spec.d_in, "d_out": spec.d_out,
            "width": spec.width, "sparsity": spec.sparsity, "norm_scale_in": [float(s) for s in scales_in],
            "norm_scale_out": [float(s) for s in scales_out], **meta}
    with files.atomic_dir(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays(spec, params, bt_threshold).items()},
                  os.path.join(tmp, "params.safetensors"))
        with open(os.path.join(tmp, "clt.json"), "w") as fh:
            json.dump(info, fh, indent=1)


def load(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, clt.json) of a CLT folder; a missing file is named."""
    for name in ("params.safetensors", "clt.json"):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"CLT file missing: {os.path.join(path, name)}")
    with open(os.path.join(path, "clt.json")) as fh:
        return load_file(os.path.join(path, "params.safetensors")), json.load(fh)


def fold(a: dict, meta: dict) -> dict[str, np.ndarray]:
    """Raw-space weights: inputs scaled into W_enc, outputs' scales divided out of W_dec and b_dec."""
    s_in = np.asarray(meta["norm_scale_in"], np.float32)
    s_out = np.asarray(meta["norm_scale_out"], np.float32)
    out = {"W_enc": a["W_enc"] * s_in[:, None, None], "b_enc": a["b_enc"], "b_dec": a["b_dec"] / s_out[:, None]}
    if "threshold" in a:
        out["threshold"] = a["threshold"]
    L = len(s_in)
    for l in range(L):
        out[f"W_dec_{l}"] = a[f"W_dec_{l}"] / s_out[l:][None, :, None]
    return out


def write_circuit_tracer(path: str, a: dict, meta: dict, n_layers: int) -> None:
    """circuit-tracer's cross-layer layout in ``path`` (module docstring). It reads JumpReLU (and
    ReLU) CLTs over every layer 0..n-1 of the model: a TopK CLT, or one over fewer layers, is refused."""
    if meta["arch"] == "topk":
        raise ExportError("a TopK CLT has no circuit-tracer export: circuit-tracer reads JumpReLU and ReLU "
                          "CLTs only (train clt.arch=jumprelu or batchtopk)")
    if list(meta["layers"]) != list(range(n_layers)):
        raise ExportError(f"circuit-tracer's CLT covers every layer 0..{n_layers - 1}; this CLT has layers "
                          f"{meta['layers']}")
    f = fold(a, meta)
    os.makedirs(path, exist_ok=True)
    for l in range(n_layers):
        save_file({f"W_enc_{l}": np.ascontiguousarray(f["W_enc"][l].T), f"b_enc_{l}": f["b_enc"][l],
                   f"b_dec_{l}": f["b_dec"][l], f"threshold_{l}": f["threshold"][l]},
                  os.path.join(path, f"W_enc_{l}.safetensors"))
        save_file({f"W_dec_{l}": np.ascontiguousarray(f[f"W_dec_{l}"])}, os.path.join(path, f"W_dec_{l}.safetensors"))


def reconstruct(a: dict, meta: dict, x_raw: np.ndarray) -> np.ndarray:
    """Raw-space inference with numpy: x_raw [L, N, d_in] -> y_hat [L, N, d_out] (the reference the
    release round trips compare with; TopK keeps each row's k largest per layer)."""
    f = fold(a, meta)
    pre = np.einsum("lnd,ldm->lnm", x_raw, f["W_enc"]) + f["b_enc"][:, None]
    if "threshold" in f:
        acts = np.where(pre > f["threshold"][:, None], pre, 0.0)
    else:
        k = int(meta["sparsity"])
        kth = -np.sort(-pre, -1)[..., k - 1:k]
        acts = np.where(pre >= kth, np.maximum(pre, 0.0), 0.0)
    L = pre.shape[0]
    y = np.repeat(f["b_dec"][:, None], pre.shape[1], 1).astype(np.float64)
    for l in range(L):
        y[l:] += np.einsum("nm,mqd->qnd", acts[l], f[f"W_dec_{l}"])
    return y.astype(np.float32)
