"""A released SAE in memory: encode, decode, and splice into a saejax model.

    pre   = x @ W_enc + b_enc                       x raw activations [..., d]
    f     = the released kind's inference formula (saejax.sae.kinds; jumprelu: pre * (pre > threshold),
            relu: max(pre, 0), topk: the k largest of max(pre, 0))
    x_hat = f @ W_dec + b_dec                       [..., d]

Arrays: W_enc [d, M], b_enc [M], W_dec [M, d], b_dec [d], threshold [M] (float32, jax arrays).
A transcoder (``reads`` set: it reads that site and writes ``site``): W_dec [M, d_out], b_dec
[d_out], and for a skip-transcoder W_skip [d, d_out]: x_hat = f @ W_dec + b_dec + x @ W_skip.
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
            "threshold": P("latent"), "b_dec": P(), "W_skip": P()}


@dataclasses.dataclass
class SAE:
    arch: str  # the released kind (saejax.sae.kinds): jumprelu | relu | topk
    arrays: dict
    k: int | None = None  # for a kind that infers with k
    site: str | None = None
    path: str = ""
    info: dict = dataclasses.field(default_factory=dict)
    reads: str | None = None  # a transcoder's input site (``site`` is then the site it writes)

    @property
    def d(self) -> int:
        return int(self.arrays["W_enc"].shape[0])

    @property
    def width(self) -> int:
        return int(self.arrays["W_enc"].shape[1])

    def encode(self, x):
        """x [..., d] raw -> f [..., M]."""
        return apply.encode(self.arch, self.arrays, jnp.asarray(x, jnp.float32), self.k)

    def decode(self, f, x=None):
        """f [..., M] -> x_hat [..., d_out]; a skip-transcoder needs its input x [..., d] for x @ W_skip."""
        if "W_skip" in self.arrays and x is None:
            raise ReleaseError(f"{self.path}: a skip-transcoder decodes with its input: decode(f, x)")
        return apply.decode(self.arrays, f, None if x is None else jnp.asarray(x, jnp.float32))

    def __call__(self, x):
        """x [..., d] -> the reconstruction x_hat [..., d_out] (a transcoder's: of the site it writes)."""
        return self.decode(self.encode(x), x)

    def check_width(self, model) -> None:
        """Raise naming the file when the model's site width differs from the SAE's input width."""
        w = model.site_width(self.reads or self.site)
        if w != self.d:
            raise ReleaseError(f"{self.path}: SAE input width {self.d} does not match "
                               f"{self.reads or self.site} width {w}")

    def splice(self, mask=None):
        """A ``model.apply(splice={self.site: ...})`` value: act [B, L, d] -> x_hat where ``mask``
        [B, L] is true (everywhere when None), the activation itself elsewhere. A transcoder's is
        the cross-site splice (fn, (reads,)): x_hat from the read site's activation of the same pass."""
        if self.reads is not None:
            def cross(act, reads):
                x_hat = self(reads[self.reads]).astype(act.dtype)
                return x_hat if mask is None else jnp.where(mask[..., None], x_hat, act)
            return cross, (self.reads,)

        def fn(act):
            x_hat = self(act).astype(act.dtype)
            return x_hat if mask is None else jnp.where(mask[..., None], x_hat, act)
        return fn

    def put(self, mesh) -> "SAE":
        """The SAE with its arrays placed on ``mesh`` (latents split over the "latent" axis)."""
        placed = {k: jax.device_put(v, NamedSharding(mesh, SHARDING[k])) for k, v in self.arrays.items()}
        return dataclasses.replace(self, arrays=placed)
