"""A group of SAEs of one shape, stacked: one module, one compiled step.

Every SAE of a group has the same input width d, latent width M and architecture. Their
parameters carry two leading stack axes, ``T`` sites and ``K`` sweep members, and every
computation is a batched einsum over them, never a Python loop over SAEs:

    W_enc [T, K, d, M]   b_enc [T, K, M]   W_dec [T, K, M, d]   b_dec [T, K, d]
    threshold [T, K, M]  (jumprelu; stored as log_threshold under threshold_param="log")

For a batch ``x [T, B, d]`` (site t's rows, normalized so that E||x||^2 = 1), SAE (t, k) computes

    pre   = (x - b_dec * pre_encoder_bias) @ W_enc + b_enc                          [T, K, B, M]
    f     = jumprelu: pre * H(pre - theta)       relu: max(pre, 0)
            topk: the k largest of max(pre, 0)   batchtopk: the k*B largest over the batch
    x_hat = f @ W_dec + b_dec                                                        [T, K, B, d]

The sweep members of a site all read the same rows: the data is never copied K times.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from saejax.sae import jumprelu as jr
from saejax.sae import sharded

PRECISIONS = {"default": lax.Precision.DEFAULT, "high": lax.Precision.HIGH, "highest": lax.Precision.HIGHEST}


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """The static description of a group (hashable: it parameterizes compiled steps)."""

    arch: str  # jumprelu | topk | batchtopk | relu
    sites: tuple[str, ...]  # T sites, all of input width d
    d: int
    width: int  # M latents
    sparsity: tuple[float, ...]  # K members: lambda (jumprelu: L0, relu: L1) or k (topk, batchtopk)
    pre_encoder_bias: bool = False
    threshold_param: str = "log"
    threshold_init: float = 0.001
    bandwidth: float = 0.001
    # Opt-in fixes for short runs (docs/sae.md): 0 keeps Gemma Scope's init.
    threshold_init_l0: float = 0.0  # >0: theta set at step 0 so each latent fires on L0/M of the batch
    encoder_init_scale: float = 1.0  # W_enc = scale * W_dec^T at init (Gemma Scope: 1)
    auxk_k: int = 512
    auxk_coeff: float = 1.0 / 32
    dtype: str = "float32"
    precision: str = "highest"

    @property
    def T(self) -> int:
        return len(self.sites)

    @property
    def K(self) -> int:
        return len(self.sparsity)

    @property
    def name(self) -> str:
        return f"{self.arch}_d{self.d}_w{self.width}"

    @property
    def ks(self) -> tuple[int, ...]:
        """k per member (topk, batchtopk)."""
        return tuple(int(k) for k in self.sparsity)

    @property
    def unit_decoder(self) -> bool:
        """JumpReLU and TopK keep decoder rows unit-norm; ReLU+L1 leaves norms free (L1 is weighted by them)."""
        return self.arch != "relu"


# Partition rules over the mesh axes of saejax.mesh: SAEs over "stack", latents over "latent".
PARTITION_RULES = [
    (r"(^|/)W_enc$", P("stack", None, None, "latent")),
    (r"(^|/)W_dec$", P("stack", None, "latent", None)),
    (r"(^|/)(b_enc|threshold|log_threshold|since_fired)$", P("stack", None, "latent")),
    (r"(^|/)b_dec$", P("stack", None, None)),
    (r"(^|/)(lam|l0_ema|frozen|bt_threshold)$", P("stack", None)),
]


def _init_decoder(key, shape, dtype, norm: float):
    w = jax.nn.initializers.he_uniform(in_axis=-2, out_axis=-1, batch_axis=(0, 1))(key, shape, dtype)
    return norm * w / jnp.linalg.norm(w, axis=-1, keepdims=True)


class SAEGroup(nn.Module):
    """A stack of T x K SAEs of one shape; see the module docstring for the formulas."""

    spec: GroupSpec

    def setup(self):
        s = self.spec
        dtype = jnp.dtype(s.dtype)
        norm = 1.0 if s.unit_decoder else 0.1  # Anthropic (April 2024): small random-direction decoder
        self.W_dec = self.param("W_dec", _init_decoder, (s.T, s.K, s.width, s.d), dtype, norm)
        # Gemma Scope: W_enc = W_dec^T at init.
        self.W_enc = self.param(
            "W_enc", lambda _k, _s: s.encoder_init_scale * jnp.swapaxes(self.W_dec, -1, -2), (s.T, s.K, s.d, s.width))
        self.b_enc = self.param("b_enc", nn.initializers.zeros, (s.T, s.K, s.width), dtype)
        self.b_dec = self.param("b_dec", nn.initializers.zeros, (s.T, s.K, s.d), dtype)
        if s.arch == "jumprelu":
            name, value = ("log_threshold", math.log(s.threshold_init)) if s.threshold_param == "log" \
                else ("threshold", s.threshold_init)
            self.theta_param = self.param(name, nn.initializers.constant(value), (s.T, s.K, s.width), dtype)

    def theta(self):
        """Positive thresholds [T, K, M] (jumprelu)."""
        return jnp.exp(self.theta_param) if self.spec.threshold_param == "log" else self.theta_param

    def encoder_bias(self):
        """[T, K, M]: b_enc, minus b_dec W_enc with ``pre_encoder_bias`` ((x - b_dec) W_enc + b_enc
        without materializing K copies of x)."""
        s = self.spec
        if s.pre_encoder_bias:
            return self.b_enc - jnp.einsum("tkd,tkdm->tkm", self.b_dec, self.W_enc, precision=PRECISIONS[s.precision])
        return self.b_enc

    def pre_activations(self, x):
        """x [T, B, d] -> pre [T, K, B, M]."""
        prec = PRECISIONS[self.spec.precision]
        b_enc = self.encoder_bias()
        # A broadcast matmul, not einsum("tbd,tkdm->tkbm"): XLA:CPU lowers the einsum with the batch
        # dims first and then transposes [B, M]; this form ran the whole step 1.5-1.7x faster (docs/training.md).
        return jnp.matmul(x[:, None], self.W_enc, precision=prec) + b_enc[:, :, None, :]

    def activate(self, pre, bt_threshold=None, train: bool = True):
        """pre [T, K, B, M] -> latents f of the same shape."""
        s = self.spec
        if s.arch == "jumprelu":
            return jr.jumprelu(pre, self.theta()[:, :, None, :], s.bandwidth)
        if s.arch == "relu":
            return jax.nn.relu(pre)
        if s.arch == "topk":
            return topk_activation(pre, s.ks)
        if s.arch == "batchtopk":
            if train:
                return batchtopk_activation(pre, s.ks)
            # At inference BatchTopK is a JumpReLU with one global threshold per SAE.
            thr = bt_threshold[:, :, None, None]
            return jnp.where(pre > thr, pre, 0.0)
        raise ValueError(f"unknown architecture {s.arch!r}")

    def decode(self, f):
        """f [T, K, B, M] -> x_hat [T, K, B, d]."""
        prec = PRECISIONS[self.spec.precision]
        return jnp.einsum("tkbm,tkmd->tkbd", f, self.W_dec, precision=prec) + self.b_dec[:, :, None, :]

    def __call__(self, x, bt_threshold=None, train: bool = True):
        """x [T, B, d] -> (pre, f, x_hat)."""
        pre = self.pre_activations(x)
        f = self.activate(pre, bt_threshold, train)
        return pre, f, self.decode(f)


def _kth_largest(values, ks: tuple[int, ...]):
    """values [T, K, N, S] -> the k_K-th largest along S for each member K: [T, K, N, 1]."""
    kmax = max(ks)
    top, _ = lax.top_k(values, kmax)
    idx = jnp.asarray([k - 1 for k in ks], jnp.int32)[None, :, None, None]
    return jnp.take_along_axis(top, jnp.broadcast_to(idx, top.shape[:-1] + (1,)), axis=-1)


def topk_activation(pre, ks: tuple[int, ...]):
    """Keep each row's k largest pre-activations (k per member), rectified."""
    kth = sharded.row_kth(pre, ks)  # two-stage under latent sharding (saejax.sae.sharded)
    return jnp.where(pre >= kth, jax.nn.relu(pre), 0.0)


def batchtopk_activation(pre, ks: tuple[int, ...]):
    """Keep the k*B largest pre-activations over the whole batch of each SAE, rectified."""
    kth = sharded.batch_kth(pre, ks)  # [T, K, 1, 1]; two-stage over data and latent shards
    return jnp.where(pre >= kth, jax.nn.relu(pre), 0.0)


def init_params(spec: GroupSpec, key) -> dict:
    """Gemma Scope init: W_dec He-uniform with unit rows, W_enc = W_dec^T, biases 0, theta = 0.001.

    ``spec.encoder_init_scale`` s != 1 gives W_enc = s * W_dec^T (s ~ d/M for short runs, docs/sae.md).
    """
    x = jnp.zeros((spec.T, 1, spec.d), jnp.dtype(spec.dtype))
    return SAEGroup(spec).init(key, x)["params"]


def thresholds(spec: GroupSpec, params) -> jax.Array:
    """Positive JumpReLU thresholds [T, K, M] from either parameterization."""
    return jnp.exp(params["log_threshold"]) if "log_threshold" in params else params["threshold"]
