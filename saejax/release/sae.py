"""A released SAE in memory: encode, decode, and splice into a saejax model.

    pre   = x @ W_enc + b_enc                       x raw activations [..., d]
    f     = the released kind's inference formula (saejax.sae.kinds; jumprelu: pre * (pre > threshold),
            relu: max(pre, 0), topk: the k largest of max(pre, 0))
    x_hat = f @ W_dec + b_dec                       [..., d]

Arrays: W_enc [d, M], b_enc [M], W_dec [M, d], b_dec [d], threshold [M] (float32, jax arrays).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from saejax.release.errors import ReleaseError
from saejax.sae import apply

# Latents over the mesh's "latent" axis; everything else replicated (saejax.mesh axes).
SHARDING = {"W_enc": P(None, "latent"), "W_dec": P("latent", None), "b_enc": P("latent"),
            "threshold": P("latent"), "b_dec": P()}


@dataclasses.dataclass
class SAE:
    arch: str  # the released kind (saejax.sae.kinds): jumprelu | relu | topk
    arrays: dict
    k: int | None = None  # for a kind that infers with k
    site: str | None = None
    path: str = ""
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def d(self) -> int:
        return int(self.arrays["W_enc"].shape[0])

    @property
    def width(self) -> int:
        return int(self.arrays["W_enc"].shape[1])

    def encode(self, x):
        """x [..., d] raw -> f [..., M]."""
        return apply.encode(self.arch, self.arrays, jnp.asarray(x, jnp.float32), self.k)

    def decode(self, f):
        """f [..., M] -> x_hat [..., d]."""
        return apply.decode(self.arrays, f)

    def __call__(self, x):
        """x [..., d] -> the reconstruction x_hat [..., d]."""
        return self.decode(self.encode(x))

    def check_width(self, model) -> None:
        """Raise naming the file when the model's site width differs from the SAE's input width."""
        w = model.site_width(self.site)
        if w != self.d:
            raise ReleaseError(f"{self.path}: SAE input width {self.d} does not match {self.site} width {w}")

    def splice(self, mask=None):
        """A ``model.apply(splice={site: fn})`` function: act [B, L, d] -> x_hat where ``mask``
        [B, L] is true (everywhere when None), the activation itself elsewhere."""
        def fn(act):
            x_hat = self(act).astype(act.dtype)
            return x_hat if mask is None else jnp.where(mask[..., None], x_hat, act)
        return fn

    def put(self, mesh) -> "SAE":
        """The SAE with its arrays placed on ``mesh`` (latents split over the "latent" axis)."""
        placed = {k: jax.device_put(v, NamedSharding(mesh, SHARDING[k])) for k, v in self.arrays.items()}
        return dataclasses.replace(self, arrays=placed)
