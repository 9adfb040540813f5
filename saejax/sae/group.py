"""A group of SAEs of one shape, stacked: one module, one compiled step.

Every SAE of a group has the same input width d, latent width M and kind (saejax.sae.kinds).
Their parameters carry two leading stack axes, ``T`` sites and ``K`` sweep members, and every
computation is a batched einsum over them, never a Python loop over SAEs:

    W_enc [T, K, d, M]   b_enc [T, K, M]   W_dec [T, K, M, d]   b_dec [T, K, d]
    and the kind's own per-latent parameters [T, K, M] (jumprelu: threshold or log_threshold)

For a batch ``x [T, B, d]`` (site t's rows, normalized so that E||x||^2 = 1), SAE (t, k) computes
(saejax.sae.forward)

    pre   = (x - b_dec * pre_encoder_bias) @ W_enc + b_enc                          [T, K, B, M]
    f     = the kind's activation of pre: its training activation, or its inference formula
    x_hat = f @ W_dec + b_dec                                                        [T, K, B, d]

The sweep members of a site all read the same rows: the data is never copied K times.

Idle slots (``GroupSpec.pad``, config ``mesh.pad_sites``): ``pad`` SAE slots appended after the real
sites on the stacked axis, so that the mesh's ``stack`` axis can divide it (docs/training.md, padding).
``T`` counts slots (every shape: parameters, state, the batch x [T, B, d]); ``sites`` (and ``reads``)
name the real sites only, the first ``n_sites`` slots. Idle slots read zero rows and start frozen
(saejax.train.step.init_state); nothing the group writes or logs names them.

A group of transcoders (``GroupSpec.reads``) reads x [T, B, d] at its ``reads`` sites (mlp_in.L)
and reconstructs the rows y [T, B, d_out] of its ``sites`` (mlp.L, the sites it writes): W_dec
[T, K, M, d_out], b_dec [T, K, d_out], and for skip-transcoders W_skip [T, K, d, d_out] (initialized
at zero), x_hat += x @ W_skip.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from saejax.sae import forward, kinds


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """The static description of a group (hashable: it parameterizes compiled steps)."""

    arch: str  # the kind's name (saejax.sae.kinds): jumprelu | topk | batchtopk | relu | a registered one
    sites: tuple[str, ...]  # T sites, all of input width d
    d: int
    width: int  # M latents
    # K members, each one's value of the kind's swept parameter, named by ``kind.sweep_name``: lambda
    # (jumprelu; with target L0s, every member's is target_l0_coeff), l1_coeff (relu), k (topk, batchtopk).
    sweep: tuple[float, ...]
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
    precision: str = "highest"  # float32 matmuls' lax precision (train.matmul_precision)
    matmul_dtype: str = "float32"  # "bfloat16": training matmuls take bf16 inputs, accumulate in fp32
    # Transcoders: the T sites read (``sites`` are then the sites written), the output width (0: d) and
    # the skip term. Defaults: an SAE group.
    reads: tuple[str, ...] = ()
    d_out: int = 0
    skip: bool = False
    # Matryoshka prefix sizes m_1 < ... < m_n = width (saejax.sae.matryoshka); (): plain training.
    matryoshka: tuple[int, ...] = ()
    # Idle SAE slots after the real sites on the stacked axis (mesh.pad_sites; 0: none).
    pad: int = 0

    @property
    def T(self) -> int:
        """Slots on the stacked axis: the real sites and the idle ones (every shape uses it)."""
        return len(self.sites) + self.pad

    @property
    def n_sites(self) -> int:
        """The real sites (the first ``n_sites`` slots)."""
        return len(self.sites)

    def slots(self, n: int) -> "GroupSpec":
        """This spec with ``n`` slots: its first min(n, n_sites) sites, the rest idle (a sub-spec
        of the slots in flight, saejax.train.step.map_sites)."""
        real = min(n, self.n_sites)
        return dataclasses.replace(self, sites=self.sites[:real], reads=self.reads[:real], pad=n - real)

    @property
    def K(self) -> int:
        return len(self.sweep)

    @property
    def transcoder(self) -> bool:
        return bool(self.reads)

    @property
    def dout(self) -> int:
        """The output width: d_out for transcoders, d for SAEs."""
        return self.d_out or self.d

    @property
    def input_sites(self) -> tuple[str, ...]:
        """The sites whose rows x the group reads: ``reads`` for transcoders, ``sites`` for SAEs."""
        return self.reads or self.sites

    @property
    def name(self) -> str:
        """SAEs ``jumprelu_d576_w4096``; transcoders ``transcoder_jumprelu_d576_576_w4096`` (skip-transcoders
        ``skip_transcoder_...``)."""
        if self.transcoder:
            return f"{'skip_' if self.skip else ''}transcoder_{self.arch}_d{self.d}_{self.dout}_w{self.width}"
        return f"{self.arch}_d{self.d}_w{self.width}"

    @property
    def kind(self) -> kinds.Kind:
        return kinds.get(self.arch)


# Partition rules over the mesh axes of saejax.mesh: SAEs over "stack", latents over "latent".
PARTITION_RULES = [
    (r"(^|/)W_enc$", P("stack", None, None, "latent")),
    (r"(^|/)W_dec$", P("stack", None, "latent", None)),
    (r"(^|/)(b_enc|threshold|log_threshold|since_fired)$", P("stack", None, "latent")),
    (r"(^|/)b_dec$", P("stack", None, None)),
    (r"(^|/)W_skip$", P("stack", None, None, None)),  # a skip-transcoder's [T, K, d, d_out]: no latent axis
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
        norm = 1.0 if s.kind.unit_decoder else 0.1  # Anthropic (April 2024): small random-direction decoder
        self.W_dec = self.param("W_dec", _init_decoder, (s.T, s.K, s.width, s.dout), dtype, norm)
        if s.dout == s.d:  # Gemma Scope: W_enc = W_dec^T at init.
            self.W_enc = self.param("W_enc", lambda _k, _s: s.encoder_init_scale * jnp.swapaxes(self.W_dec, -1, -2),
                                    (s.T, s.K, s.d, s.width))
        else:  # a transcoder between widths: W_enc^T drawn as W_dec is, at the encoder scale
            self.W_enc = self.param("W_enc", lambda k, shape: s.encoder_init_scale * jnp.swapaxes(
                _init_decoder(k, (s.T, s.K, s.width, s.d), dtype, norm), -1, -2), (s.T, s.K, s.d, s.width))
        self.b_enc = self.param("b_enc", nn.initializers.zeros, (s.T, s.K, s.width), dtype)
        self.b_dec = self.param("b_dec", nn.initializers.zeros, (s.T, s.K, s.dout), dtype)
        self.W_skip = (self.param("W_skip", nn.initializers.zeros, (s.T, s.K, s.d, s.dout), dtype)
                       if s.skip else None)
        self.extra = {name: self.param(name, nn.initializers.constant(value), (s.T, s.K, s.width), dtype)
                      for name, value in s.kind.extra_params(s).items()}

    def _params(self) -> dict:
        skip = {} if self.W_skip is None else {"W_skip": self.W_skip}
        return {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec, **skip,
                **self.extra}

    def pre_activations(self, x):
        """x [T, B, d] -> pre [T, K, B, M]."""
        return forward.pre_activations(self.spec, self._params(), x)

    def activate(self, pre, bt_threshold=None, train: bool = True):
        """pre [T, K, B, M] -> latents f of the same shape: the kind's training activation, or its
        inference formula (``bt_threshold`` [T, K]: the train state's, for BatchTopK)."""
        s, params = self.spec, self._params()
        if train:
            return s.kind.train_activation(s, params, pre)
        return s.kind.activate(pre, s.kind.inference_threshold(params, bt_threshold), s.kind.ks(s.sweep))

    def __call__(self, x, bt_threshold=None, train: bool = True):
        """x [T, B, d] -> (pre, f, x_hat)."""
        return forward.reconstruct(self.spec, self._params(), x, lambda pre: self.activate(pre, bt_threshold, train))


def real_sites(spec, tree):
    """``tree`` with every leaf whose leading axis is the group's T slots cut to its real sites (the
    first ``n_sites``; the idle slots, ``pad``, left out); other leaves, and the tree of a spec
    without idle slots (a CLT's too), as they are. For what the group logs and exports."""
    if not getattr(spec, "pad", 0):
        return tree
    return jax.tree_util.tree_map(lambda a: a[:spec.n_sites] if jnp.ndim(a) and jnp.shape(a)[0] == spec.T else a, tree)


def init_params(spec: GroupSpec, key) -> dict:
    """Gemma Scope init: W_dec He-uniform with unit rows (0.1 for kinds without unit-norm decoders),
    W_enc = W_dec^T, biases 0, the kind's extra parameters at their initial values (jumprelu theta).

    ``spec.encoder_init_scale`` s != 1 gives W_enc = s * W_dec^T (s ~ d/M for short runs, docs/sae.md).
    Idle slots (``spec.pad``): the real sites' init is bitwise the unpadded spec's; the idle slots'
    is drawn the same way from ``fold_in(key, 1)`` and appended.
    """
    if spec.pad:
        real = dataclasses.replace(spec, pad=0)
        idle = dataclasses.replace(spec, sites=spec.sites[:1] * spec.pad, reads=spec.reads[:1] * spec.pad, pad=0)
        return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), init_params(real, key),
                                      init_params(idle, jax.random.fold_in(key, 1)))
    x = jnp.zeros((spec.T, 1, spec.d), jnp.dtype(spec.dtype))
    return SAEGroup(spec).init(key, x)["params"]
