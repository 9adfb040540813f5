"""The trained-group file format: what the train stage hands to evaluate and release.

A group folder holds two files (docs/formats.md):
    params.safetensors   float32 W_enc [T,K,d,M], b_enc [T,K,M], W_dec [T,K,M,d], b_dec [T,K,d],
                         and the threshold [T,K,M] of kinds that infer with one (jumprelu, batchtopk);
                         transcoders: W_dec [T,K,M,d_out], b_dec [T,K,d_out], skip-transcoders W_skip [T,K,d,d_out]
    group.json           arch, sites, sweep, sweep_name, k, norm_scale, pre_encoder_bias, d, width,
                         model, steps, tokens, lam, ...; transcoders also reads, read_norm_scale, d_out, skip
                         (sites are then the written sites, norm_scale their scales); a group with
                         pooled sites (sae.layer_groups) also layer_groups: {pooled site: {"sites": its
                         layers' sites, "norm_scale": theirs}}, the pooled site's own norm_scale being 1
The weights act on normalized inputs x = x_raw * norm_scale[t]; release folds that in. Files written
before the sweep had its kind's name hold ``sparsity`` instead of ``sweep``; ``load_group`` reads both.
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import load_file, save_file

from saejax import files
from saejax.sae import kinds

PARAM_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")


def export_params(arch: str, params, bt_threshold) -> dict[str, np.ndarray]:
    """Training parameters -> the file's float32 arrays: the four of every SAE and, for kinds that
    infer with one, the threshold (``Kind.inference_threshold``; ``bt_threshold`` [T, K] from the
    train state)."""
    params = {k: np.asarray(v, np.float32) for k, v in params.items()}
    out = {k: params[k] for k in PARAM_KEYS + (("W_skip",) if "W_skip" in params else ())}
    threshold = kinds.get(arch).inference_threshold(params, bt_threshold)
    if threshold is not None:
        out["threshold"] = np.asarray(threshold, np.float32)
    return out


def seeds(meta: dict) -> list[int]:
    """Each member's seed index: how many earlier members of the group have the same sweep value and
    L0 target (members that differ only in their random init, ``sae.seeds``); 0 for every member of a
    group trained without repeats."""
    targets = meta.get("target_l0") or [None] * len(meta["sweep"])
    seen: dict = {}
    out = []
    for key in zip(meta["sweep"], targets):
        out.append(seen.get(key, 0))
        seen[key] = out[-1] + 1
    return out


def layer_sites(meta: dict, t: int) -> list[str]:
    """The sites SAE site t of a group serves: its member layers' sites for a pooled site
    (``sae.layer_groups``), else the site itself."""
    site = meta["sites"][t]
    pool = (meta.get("layer_groups") or {}).get(site)
    return list(pool["sites"]) if pool else [site]


def on_layer(meta: dict, t: int, site: str) -> dict:
    """``meta`` as if site t were ``site``, one of the layers it serves (``layer_sites``): that site's
    name and norm scale at index t, so evaluation and release treat a pooled SAE as that layer's."""
    pool = (meta.get("layer_groups") or {}).get(meta["sites"][t])
    if pool is None:
        if site != meta["sites"][t]:
            raise ValueError(f"site {t} of the group is {meta['sites'][t]}, not {site}")
        return meta
    j = pool["sites"].index(site)
    sites, scales = list(meta["sites"]), list(meta["norm_scale"])
    sites[t], scales[t] = site, float(pool["norm_scale"][j])
    return {**meta, "sites": sites, "norm_scale": scales}


def save_group(path: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write a group folder atomically (a temporary folder renamed into place)."""
    with files.atomic_dir(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, os.path.join(tmp, "params.safetensors"))
        with open(os.path.join(tmp, "group.json"), "w") as fh:
            json.dump(meta, fh, indent=1)


def load_group(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """Read a group folder; errors name the file."""
    meta_path = os.path.join(path, "group.json")
    params_path = os.path.join(path, "params.safetensors")
    for p in (meta_path, params_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"trained group file missing: {p}")
    with open(meta_path) as fh:
        try:
            meta = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    try:
        params = load_file(params_path)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{params_path}: not a valid safetensors file ({e})") from None
    for k in PARAM_KEYS:
        if k not in params:
            raise KeyError(f"{params_path}: missing key {k!r}")
    if "sweep" not in meta:  # written before the sweep had its kind's name
        meta["sweep"] = meta.pop("sparsity")
    return params, meta
