"""A released cross-layer transcoder, as ``Suite.clt`` returns it (saejax layout, docs/formats.md)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from saejax.sae import clt_io


class CLT:
    """Raw-space inference of a released CLT: ``encode``, ``reconstruct`` and ``splice`` (the
    replacement model: every MLP output of its layers replaced in one forward pass)."""

    def __init__(self, arrays: dict, meta: dict):
        self.arrays, self.meta = arrays, meta
        self.folded = clt_io.fold(arrays, meta)
        self.layers = list(meta["layers"])

    def __repr__(self) -> str:
        return f"CLT({self.meta['arch']}, layers {self.layers}, width {self.meta['width']})"

    def encode(self, i: int, x):
        """Latents of the CLT's i-th layer for raw MLP inputs x [..., d_in]."""
        f = self.folded
        pre = x @ f["W_enc"][i] + f["b_enc"][i]
        if "threshold" in f:
            return jnp.where(pre > f["threshold"][i], pre, 0.0)
        k = int(self.meta["sparsity"])
        kth = jnp.sort(pre, -1)[..., -k:-k + 1]
        return jnp.where(pre >= kth, jnp.maximum(pre, 0.0), 0.0)

    def decode(self, j: int, latents: list):
        """The reconstruction of the j-th layer's MLP output from the latents of layers 0..j."""
        f = self.folded
        return f["b_dec"][j] + sum(latents[i] @ f[f"W_dec_{i}"][:, j - i] for i in range(j + 1))

    def reconstruct(self, x) -> np.ndarray:
        """x [L, ..., d_in] raw MLP inputs -> [L, ..., d_out]."""
        lat = [self.encode(i, jnp.asarray(x[i], jnp.float32)) for i in range(len(self.layers))]
        return np.stack([np.asarray(self.decode(j, lat)) for j in range(len(self.layers))])

    def splice(self) -> dict:
        """``model.apply(..., splice=clt.splice())``: {mlp.l': (fn, (mlp_in.l for l <= l'))}, each MLP
        output replaced by the reconstruction from the MLP inputs of the same pass."""
        def make(j):
            def fn(act, reads):
                lat = [self.encode(i, reads[f"mlp_in.{self.layers[i]}"].astype(jnp.float32)) for i in range(j + 1)]
                return self.decode(j, lat).astype(act.dtype)
            return fn
        return {f"mlp.{l}": (make(j), tuple(f"mlp_in.{m}" for m in self.layers[:j + 1]))
                for j, l in enumerate(self.layers)}
