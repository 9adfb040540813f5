"""The SAELens export: one folder per SAE, read by ``sae_lens.SAE.load_from_disk``.

    <release>/saelens/<kind>/layer_<L>/width_<W>/average_l0_<N>/
        cfg.json                  SAELens 6 config (architecture, d_in, d_sae, metadata.hook_name, ...)
        sae_weights.safetensors   float32 W_enc [d, M], W_dec [M, d], b_enc [M], b_dec [d], threshold [M]

The weights are the folded ones (raw activations in, see fold.py) with the pre-encoder bias already
inside b_enc, so ``apply_b_dec_to_input`` is false and ``normalize_activations`` "none".
Architectures: each released kind's ``saelens_name`` (saejax.sae.kinds): jumprelu -> "jumprelu" (with
the threshold tensor), topk -> "topk" with k, relu -> "standard". Hook names are TransformerLens's: res ->
blocks.L.hook_resid_post, mlp -> blocks.L.hook_mlp_out, att -> blocks.L.attn.hook_z (SAELens then
flattens [..., n_heads, d_head] inputs itself: reshape_activations "hook_z").
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

from saejax.sae import kinds

SAELENS_VERSION = "6.0.0"  # the config format written here (SAELens >= 6 reads it as is)
HOOKS = {"res": "blocks.{L}.hook_resid_post", "mlp": "blocks.{L}.hook_mlp_out", "att": "blocks.{L}.attn.hook_z",
         "mlp_in": "blocks.{L}.mlp.hook_in"}  # the MLP's input (TransformerLens's bridge, circuit-tracer)


def hook_name(kind: str, layer: int) -> str:
    return HOOKS[kind].format(L=layer)


def config(kind: str, layer: int, arch: str, d: int, width: int, k: int | None = None,
           model: str = "", context_size: int | None = None, extra: dict | None = None) -> dict:
    """The cfg.json of one SAE of the released kind ``arch``; ``k`` for kinds that infer with k."""
    cfg = {
        "architecture": kinds.get(arch).saelens_name, "d_in": int(d), "d_sae": int(width), "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none",
        "reshape_activations": "hook_z" if kind == "att" else "none",
        "metadata": {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": SAELENS_VERSION,
                     "model_name": model, "hook_name": hook_name(kind, layer), "hook_head_index": None,
                     "context_size": context_size, "prepend_bos": True, **(extra or {})},
    }
    if k is not None:
        cfg["k"] = int(k)
        cfg["rescale_acts_by_decoder_norm"] = False
    return cfg


def write(folder: str, arrays: dict, cfg: dict, arch: str) -> None:
    """Write cfg.json and sae_weights.safetensors into ``folder`` (created): the threshold tensor
    only for a released kind ``arch`` that infers with one."""
    os.makedirs(folder, exist_ok=True)
    keys = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["threshold"] if kinds.get(arch).uses_threshold else [])
    save_file({n: np.ascontiguousarray(arrays[n], np.float32) for n in keys},
              os.path.join(folder, "sae_weights.safetensors"))
    with open(os.path.join(folder, "cfg.json"), "w") as fh:
        json.dump(cfg, fh, indent=1)
