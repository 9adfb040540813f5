"""Gemma Scope's release layout: names, paths and the params.npz archive.

    <release>/<kind>/layer_<L>/width_<W>/average_l0_<N>/params.npz

Gemma Scope's own repositories hold one site kind each (google/gemma-scope-2b-pt-res, -mlp, -att)
and start at ``layer_<L>``; their ``-canonical`` repositories use a ``canonical`` folder instead of
``average_l0_<N>``. Width folders are named as Gemma Scope names them: floor(M / 1000) with ``k``
(16384 -> width_16k, 65536 -> width_65k, 131072 -> width_131k) and ``1m`` for 2^20. Widths that are
not powers of two, or below 1,000, are written exactly (width_1500, width_128).

params.npz (float32, no pickled objects):
    W_enc [d, M]   W_dec [M, d]   b_enc [M]   b_dec [d]   threshold [M]
    k      int64 scalar, only in releases of a kind that infers with k (TopK; threshold 0, unused)
A released SAE computes, on raw activations x (Gemma Scope's tutorial formula):
    pre = x @ W_enc + b_enc;  f = (pre > threshold) * relu(pre);  x_hat = f @ W_dec + b_dec

Transcoders (kind "transcoder": read mlp_in.L, write mlp.L) use the same archive for plain
transcoders, as google/gemma-scope-2b-pt-transcoders (W_dec [M, d_out], b_dec [d_out]). Skip-
transcoders use Gemma Scope 2's own layout (google/gemma-scope-2-*: the "_affine" transcoders):

    <release>/transcoder/layer_<L>_width_<W>_l0_<N>_affine/params.safetensors   (``gs2_dir``)
        w_enc [d, M]  w_dec [M, d_out]  b_enc [M]  b_dec [d_out]  threshold [M]
        affine_skip_connection [d, d_out]     y_hat = f @ w_dec + b_dec + x @ affine_skip_connection
    <release>/transcoder/layer_<L>_width_<W>_l0_<N>_affine/config.json
        {"architecture": "jump_relu", "model_name", "hf_hook_point_in", "hf_hook_point_out",
         "affine_connection": true}
as SAELens's ``gemma_3`` loader and circuit-tracer's ``load_gemma_scope_2_transcoder`` read them.
"""
from __future__ import annotations

import os
import re
import zipfile

import numpy as np

from saejax.release.errors import ReleaseError

KINDS = ("res", "att", "mlp_in", "mlp", "transcoder")
REPO_KINDS = {"transcoders": "transcoder"}  # a Gemma Scope repository's suffix -> the kind it holds
ARCH = "jumprelu"  # the SAE kind of Gemma Scope's own releases (folders without a suite.json)
KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
_WIDTH = re.compile(r"^width_(\d+)(k|m)?$")
_LAYER = re.compile(r"^layer_(\d+)$")
_L0 = re.compile(r"^average_l0_(\d+)$")


def width_name(width: int) -> str:
    """Latent width -> Gemma Scope's folder name (``width_16k``)."""
    if width >= 1000 and width & (width - 1) == 0:
        return f"width_{width // 10 ** 6}m" if width >= 10 ** 6 else f"width_{width // 1000}k"
    return f"width_{width}"


def parse_width(name: str) -> int:
    """``width_16k`` -> 16384, ``width_1m`` -> 1048576, ``width_1500`` -> 1500 (nominal; the
    archive's shapes are authoritative)."""
    m = _WIDTH.match(name if name.startswith("width_") else f"width_{name}")
    if not m:
        raise ReleaseError(f"not a width folder name: {name!r}")
    n, unit = int(m.group(1)), m.group(2)
    if unit is None:
        return n
    scale = 1000 if unit == "k" else 10 ** 6
    for p in range(10, 31):  # the power of two Gemma Scope abbreviates this way
        if (2 ** p) // scale == n:
            return 2 ** p
    return n * scale


def sae_dir(kind: str, layer: int, width: int, l0: float) -> str:
    """The release-relative folder of one SAE (posix separators)."""
    return f"{kind}/layer_{layer}/{width_name(width)}/average_l0_{int(round(l0))}"


def gs2_dir(layer: int, width: int, l0: float) -> str:
    """The release-relative folder of one skip-transcoder in Gemma Scope 2's layout."""
    return f"transcoder/layer_{layer}_{width_name(width)}_l0_{int(round(l0))}_affine"


GS2_KEYS = {"W_enc": "w_enc", "W_dec": "w_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold",
            "W_skip": "affine_skip_connection"}


def write_gs2(folder: str, arrays: dict, layer: int, model: str = "") -> None:
    """A skip-transcoder in Gemma Scope 2's layout (module docstring): params.safetensors and config.json."""
    from safetensors.numpy import save_file
    import json
    os.makedirs(folder, exist_ok=True)
    save_file({GS2_KEYS[n]: np.ascontiguousarray(arrays[n], np.float32) for n in GS2_KEYS if n in arrays},
              os.path.join(folder, "params.safetensors"))
    cfg = {"architecture": "jump_relu", "model_name": model,
           "hf_hook_point_in": f"model.layers.{layer}.mlp.input",
           "hf_hook_point_out": f"model.layers.{layer}.mlp.output",
           "affine_connection": "W_skip" in arrays}
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=1)


def read_gs2(path: str) -> dict[str, np.ndarray]:
    """A Gemma Scope 2 params.safetensors -> float32 arrays under saejax's names (W_skip [d, d_out]
    from affine_skip_connection, when present); ReleaseError naming ``path`` if bad."""
    from safetensors.numpy import load_file
    try:
        t = load_file(path)
    except FileNotFoundError:
        raise ReleaseError(f"{path}: file not found") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ReleaseError(f"{path}: not a valid safetensors file ({e})".splitlines()[0]) from None
    out = {}
    for ours, theirs in GS2_KEYS.items():
        if theirs in t:
            out[ours] = np.asarray(t[theirs], np.float32)
        elif ours != "W_skip":
            raise ReleaseError(f"{path}: missing key {theirs!r} (has {sorted(t)})")
    _check_shapes(path, out)
    return out


def _check_shapes(path: str, arrays: dict) -> None:
    """W_enc [d, M], W_dec [M, d_out], b_enc [M], b_dec [d_out], threshold [M], W_skip [d, d_out]."""
    w = arrays["W_enc"]
    if w.ndim != 2 or arrays["b_dec"].ndim != 1:
        raise ReleaseError(f"{path}: W_enc must be [d, M] and b_dec [d_out], got {w.shape}, {arrays['b_dec'].shape}")
    dd, m = w.shape
    d_out = arrays["b_dec"].shape[0]  # d for an SAE
    want = {"W_dec": (m, d_out), "b_enc": (m,), "threshold": (m,), "W_skip": (dd, d_out)}
    for name, shape in want.items():
        if name in arrays and arrays[name].shape != shape:
            raise ReleaseError(f"{path}: {name} has shape {arrays[name].shape}, expected {shape} "
                               f"(W_enc is {w.shape})")


def parse_path(rel: str, default_kind: str | None = None) -> dict | None:
    """A release-relative path of a params.npz -> {kind, layer, width, l0, canonical}, or None if
    it is not one. ``default_kind`` is the kind of a Gemma Scope repository without kind folders."""
    parts = rel.split("/")
    if parts[-1] != "params.npz" or len(parts) < 4:
        return None
    *head, layer, width, leaf, _ = parts
    kind = head[-1] if head and head[-1] in KINDS else default_kind
    if kind is None or not _LAYER.match(layer) or not _WIDTH.match(width):
        return None
    m = _L0.match(leaf)
    if not m and leaf != "canonical":
        return None
    return {"kind": kind, "layer": int(_LAYER.match(layer).group(1)), "width": parse_width(width),
            "l0": float(m.group(1)) if m else None, "canonical": leaf == "canonical"}


def write_params(path: str, arrays: dict, k: int | None = None) -> None:
    """Write one SAE's params.npz (float32 arrays, plus ``k`` for TopK), via a temporary file."""
    out = {name: np.ascontiguousarray(arrays[name], np.float32) for name in KEYS}
    if k is not None:
        out["k"] = np.asarray(k, np.int64)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        np.savez(fh, **out)
    os.replace(tmp, path)


def read_params(path: str, d: int | None = None) -> tuple[dict[str, np.ndarray], int | None]:
    """Read and check a params.npz: (float32 arrays, k or None). Never unpickles; a bad archive,
    a missing key or inconsistent shapes (or input width != ``d``) is a ReleaseError naming ``path``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            files = {name: z[name] for name in z.files}
    except FileNotFoundError:
        raise ReleaseError(f"{path}: file not found") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ReleaseError(f"{path}: not a valid npz archive ({e})") from None
    missing = [name for name in KEYS if name not in files]
    if missing:
        raise ReleaseError(f"{path}: missing key {missing[0]!r} (has {sorted(files)})")
    arrays = {name: np.asarray(files[name], np.float32) for name in KEYS}
    _check_shapes(path, arrays)  # W_dec [M, d_out]: d_out = d for an SAE, a transcoder's output width
    dd, m = arrays["W_enc"].shape
    if d is not None and dd != d:
        raise ReleaseError(f"{path}: input width {dd} does not match the site width {d}")
    k = None
    if "k" in files:
        k = int(np.asarray(files["k"]).reshape(()))
        if not 0 < k <= m:
            raise ReleaseError(f"{path}: k={k} is not in 1..{m}")
    return arrays, k
