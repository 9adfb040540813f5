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

Transcoders (``transcoder_config``): SAELens's transcoder classes, by released kind and skip term:
jumprelu -> "jumprelu_transcoder" / "jumprelu_skip_transcoder", relu -> "transcoder" /
"skip_transcoder"; SAELens has no TopK transcoder, so a TopK transcoder is not exported (one-line
ReleaseError) and BatchTopK is a JumpReLU with its global threshold. cfg.json adds d_out and
metadata.hook_name_out (blocks.L.hook_mlp_out; hook_name is the input, blocks.L.mlp.hook_in);
W_dec [M, d_out], b_dec [d_out], and W_skip [d_out, d_in] (SAELens's orientation: x @ W_skip.T).
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


TRANSCODER_ARCH = {"jumprelu": "jumprelu_", "relu": ""}  # released kind -> SAELens transcoder prefix


def transcoder_architecture(arch: str, skip: bool) -> str | None:
    """SAELens's transcoder architecture for a released kind ``arch`` (None: SAELens has none)."""
    prefix = TRANSCODER_ARCH.get(arch)
    return None if prefix is None else f"{prefix}{'skip_' if skip else ''}transcoder"


def transcoder_config(layer: int, arch: str, d: int, d_out: int, width: int, skip: bool, model: str = "",
                      context_size: int | None = None, extra: dict | None = None) -> dict:
    """The cfg.json of one transcoder (mlp_in.L -> mlp.L) of the released kind ``arch``."""
    cfg = config("mlp_in", layer, arch, d, width, None, model=model, context_size=context_size,
                 extra={"hook_name_out": hook_name("mlp", layer), **(extra or {})})
    cfg["architecture"] = transcoder_architecture(arch, skip)
    cfg["d_out"] = int(d_out)
    return cfg


def write(folder: str, arrays: dict, cfg: dict, arch: str) -> None:
    """Write cfg.json and sae_weights.safetensors into ``folder`` (created): the threshold tensor
    only for a released kind ``arch`` that infers with one, W_skip (transposed) for a skip-transcoder."""
    os.makedirs(folder, exist_ok=True)
    keys = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["threshold"] if kinds.get(arch).uses_threshold else [])
    out = {n: np.ascontiguousarray(arrays[n], np.float32) for n in keys}
    if "W_skip" in arrays:
        out["W_skip"] = np.ascontiguousarray(np.asarray(arrays["W_skip"], np.float32).T)
    save_file(out, os.path.join(folder, "sae_weights.safetensors"))
    with open(os.path.join(folder, "cfg.json"), "w") as fh:
        json.dump(cfg, fh, indent=1)
