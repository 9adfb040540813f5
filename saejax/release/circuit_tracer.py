"""circuit-tracer's transcoder set: one transcoder per layer 0..n-1, read by its ``load_transcoder_set``.

    <release>/circuit_tracer/width_<W>/member_<k>/
        config.yaml            model_kind: transcoder_set, feature_input_hook: mlp.hook_in,
                               feature_output_hook: hook_mlp_out, transcoders: [layer_0.safetensors, ...]
        layer_<L>.safetensors  float32 W_enc [M, d] (transposed), W_dec [M, d_out], b_enc [M], b_dec [d_out],
                               activation_function.threshold [M] (JumpReLU; absent: ReLU),
                               W_skip [d_out, d] (skip-transcoders; applied as x @ W_skip.T)

circuit-tracer computes f = act(x @ W_enc.T + b_enc), y_hat = f @ W_dec + b_dec (+ x @ W_skip.T) on
raw mlp_in.L rows (``blocks.L.mlp.hook_in``): the folded arrays, transposed. Its set loader needs
every layer from 0 to the last, so a set is written only for a (width, sweep member) whose
transcoders cover layers 0..n-1; it has no TopK transcoder (not exported). The hooks are relative
to ``blocks.L.`` as circuit-tracer's TransformerLens replacement model names them.
"""
from __future__ import annotations

import os

import numpy as np
from safetensors.numpy import save_file

INPUT_HOOK, OUTPUT_HOOK = "mlp.hook_in", "hook_mlp_out"


def set_dir(width_name: str, member: int) -> str:
    return f"circuit_tracer/{width_name}/member_{member}"


def layer_tensors(arrays: dict, uses_threshold: bool) -> dict[str, np.ndarray]:
    """One folded transcoder (saejax orientation) -> circuit-tracer's tensors."""
    out = {"W_enc": np.asarray(arrays["W_enc"], np.float32).T, "W_dec": arrays["W_dec"], "b_enc": arrays["b_enc"],
           "b_dec": arrays["b_dec"]}
    if uses_threshold:
        out["activation_function.threshold"] = arrays["threshold"]
    if "W_skip" in arrays:
        out["W_skip"] = np.asarray(arrays["W_skip"], np.float32).T
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def write_set(folder: str, layers: dict[int, dict], uses_threshold: bool, model: str = "") -> None:
    """Write a set: ``layers`` {L: folded arrays} for L = 0..n-1 (the caller checks the coverage)."""
    os.makedirs(folder, exist_ok=True)
    names = []
    for layer in sorted(layers):
        names.append(f"layer_{layer}.safetensors")
        save_file(layer_tensors(layers[layer], uses_threshold), os.path.join(folder, names[-1]))
    lines = ["model_kind: transcoder_set", f"model_name: {model!r}" if model else "model_name: null",
             f"feature_input_hook: {INPUT_HOOK}", f"feature_output_hook: {OUTPUT_HOOK}", "transcoders:"]
    lines += [f"  - {n}" for n in names]
    with open(os.path.join(folder, "config.yaml"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
