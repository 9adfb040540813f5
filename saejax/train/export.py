"""Export of a trained group: ``<workdir>/train/<group>/final/`` (saejax.sae.io format, docs/formats.md)."""
from __future__ import annotations

import jax
import numpy as np

from saejax.sae import io as sae_io
from saejax.sae.group import GroupSpec, real_sites
from saejax.train import optim
from saejax.train.trainer import gather


def group_meta(spec: GroupSpec, hp: optim.Hyper, source, state, model: str = "") -> dict:
    pools = getattr(source, "pools", None) or {}  # sae.layer_groups: the pooled sites' layers and scales
    lg = {s: {"sites": list(pools[s]), "norm_scale": [float(source.norm_scale(m)) for m in pools[s]]}
          for s in spec.sites if s in pools}
    return {
        "arch": spec.arch, "sites": list(spec.sites), "d": spec.d, "width": spec.width,
        "sweep": list(spec.sweep), "sweep_name": spec.kind.sweep_name, "k": list(spec.kind.ks(spec.sweep)),
        "target_l0": list(hp.target_l0), "lam": np.asarray(jax.device_get(state["lam"])).tolist(),
        "l0_ema": np.asarray(jax.device_get(state["l0_ema"])).tolist(),
        "frozen": np.asarray(jax.device_get(state["frozen"])).tolist(),
        "norm_scale": [float(source.norm_scale(s)) for s in spec.sites],
        # transcoders: the sites read and their scales; norm_scale is then the written (output) sites'
        **({"reads": list(spec.reads), "read_norm_scale": [float(source.norm_scale(s)) for s in spec.reads],
            "d_out": spec.dout, "skip": spec.skip} if spec.transcoder else {}),
        "pre_encoder_bias": spec.pre_encoder_bias, "threshold_param": spec.threshold_param,
        "bandwidth": spec.bandwidth, "model": model, "steps": int(jax.device_get(state["step"])),
        "tokens": int(jax.device_get(state["step"])) * hp.batch_size, "batch_size": hp.batch_size,
        **({"matryoshka": list(spec.matryoshka)} if spec.matryoshka else {}),
        **({"layer_groups": lg} if lg else {}),
    }


def save_final(final: str, spec: GroupSpec, hp: optim.Hyper, source, state) -> None:
    """Write the trained ``state`` to the folder ``final``: gathered on every process, written by process 0.
    The real sites only: a group's idle slots (``spec.pad``) are left out, so ``final`` is the unpadded group's."""
    host = gather({k: v for k, v in state.items() if k != "opt_state"})
    host = real_sites(spec, host)
    if jax.process_index() == 0:
        arrays = sae_io.export_params(spec.arch, host["params"], host["bt_threshold"])
        sae_io.save_group(final, arrays, group_meta(spec, hp, source, host, getattr(source, "model", "")))
