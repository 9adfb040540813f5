"""Cross-layer transcoders (CLTs; Anthropic, "Circuit Tracing", 2025): one dictionary over L layers.

Layer l has M latents that read that layer's MLP input x_l (site ``mlp_in.l``) and write into the
MLP output of every layer l' >= l (site ``mlp.l'``). For rows normalized per site (E||x||^2 = 1):

    pre_l  = x_l W_enc[l] + b_enc[l]                                         [B, M]
    f_l    = the kind's activation of pre_l (per layer: JumpReLU, TopK or BatchTopK)
    y_hat_l' = sum_{l <= l'} f_l W_dec[l][:, l' - l, :] + b_dec[l']          [B, d_out]

Parameters (L layers; P = L(L+1)/2 decoder blocks in all):
    W_enc [L, d_in, M]  b_enc [L, M]  b_dec [L, d_out]  log_threshold [L, M] (jumprelu)
    W_dec  a list of L arrays, W_dec[l] [M, L - l, d_out]: latent m of layer l's decoder to layers
           l..L-1 (circuit-tracer's W_dec_l layout, so its rows are contiguous for sparse gathers)

Loss: sum over output layers l' of ||y_l' - y_hat_l'||^2 (summed over d, averaged over rows), plus
JumpReLU's lam * sum_l L0_l (pseudo-derivatives for theta, saejax.sae.jumprelu). TopK keeps each
row's k largest pre-activations per layer; BatchTopK the k*B largest per layer over the batch (and
infers with a running per-layer threshold, like the SAE kind).

Decoder norm: each latent's decoder concatenated over its output layers, [L - l, d_out] flattened,
has unit norm (the gradient along it removed, renormalized after each update). A latent's single
activation scales all its output blocks together, so that is exactly its one scale symmetry; a
unit norm per block would add L - l - 1 constraints the model does not have and forbid a latent from
writing strongly to one layer and weakly to another (the block norms say where a latent writes).

Decoding (``decode``): dense, f_l @ W_dec[l] as one matmul per source layer, O(L^2 M d) per row; or
sparse, gathering the decoder rows of each row's active latents only, O(L^2 c d) per row, c the
static cap on active latents per row and layer (``sparse_decode``, with its own VJP). Which latents
the sparse path keeps: each row's c largest of a score, -inf for latents that can matter neither to
the output nor to the gradients (JumpReLU: pre > theta - bandwidth/2, i.e. firing or inside the
threshold's pseudo-derivative window; TopK: its k; BatchTopK: those kept). Below the cap both
decodings give the same loss and gradients; above it the lowest-scoring latents of the row are
dropped from the decoding (they still count in the L0), and the step reports the fraction of rows
over the cap (``overflow``).

Matryoshka (``matryoshka``, prefix sizes m_1 < ... < m_n = M of every layer; Bussmann et al. 2025,
saejax.sae.matryoshka): the reconstruction term is the sum over prefixes i of the loss above with
only latents [0, m_i) of every layer decoding (the same prefix at every source layer, so prefix i is
a CLT of m_i latents per layer on its own). Each prefix block j = [m_{j-1}, m_j) is decoded once,
y_hat_i = b_dec + sum_{j <= i} d_j (running sums; autodiff gives each block the suffix sum of the
prefixes' errors): dense decoding cuts each layer's latents at the block boundaries (one decode's
FLOPs); sparse decoding weighs each kept latent by the one-hot of its block, so one gather of its
decoder row serves the n partial outputs. The logged mse and fvu stay the full dictionary's. On a
latent mesh the n partial outputs are summed over ``latent``: n all-reduces' bytes instead of one.

On a mesh that splits rows or latents, the step's loss and gradient run inside ``jax.shard_map``
(``loss_and_grad``): each latent shard selects and decodes its own active latents (``shard_cap``),
the partial outputs are summed over ``latent`` once, the gradients over ``data`` once
(docs/training.md, communication).
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from saejax.sae import jumprelu as jr
from saejax.sae import matryoshka as mat

ARCHS = ("jumprelu", "topk", "batchtopk")
DECODES = ("auto", "dense", "sparse")
PRECISIONS = {"highest": lax.Precision.HIGHEST, "default": lax.Precision.DEFAULT}
# auto: sparse decoding when the cap is at most this fraction of the layer's width and there are at
# least this many layers. Measured (benchmarks/clt_step.py, 2-core CPU, quiet): at L=30, M=2,304, d=576
# the sparse gradient took 0.72x the dense one at c=16, 0.92x at c=32 and 1.37x at c=64 (crossover
# c ~ 37 ~ M/63); at L=4, M=512, d=64 dense won at every c down to 4 (M/128).
SPARSE_MAX_FRACTION = 1 / 64
SPARSE_MIN_LAYERS = 16


@dataclasses.dataclass(frozen=True)
class CLTSpec:
    """The static description of one CLT (hashable: it parameterizes the compiled step)."""

    arch: str  # jumprelu | topk | batchtopk
    layers: tuple[int, ...]  # the L layers, increasing
    d_in: int
    d_out: int
    width: int  # M latents per layer
    sparsity: float  # jumprelu: lambda of the L0 term; topk/batchtopk: k per layer
    cap: int = 0  # sparse decoding: active latents kept per row and layer (topk: k; 0 = 4k or 4 x 64)
    decode: str = "auto"  # auto | dense | sparse
    threshold_init: float = 0.001
    bandwidth: float = 0.001
    encoder_init_scale: float = 1.0
    block_bytes: int = 32 << 20  # sparse decoding: row blocks whose largest gather is at most this
    precision: str = "highest"
    matryoshka: tuple[int, ...] = ()  # prefix sizes of every layer's latents, ending at width; (): plain

    @property
    def L(self) -> int:
        return len(self.layers)

    @property
    def in_sites(self) -> tuple[str, ...]:
        return tuple(f"mlp_in.{l}" for l in self.layers)

    @property
    def sites(self) -> tuple[str, ...]:
        """The output sites (one per layer; the labels of per-layer metrics)."""
        return tuple(f"mlp.{l}" for l in self.layers)

    @property
    def name(self) -> str:
        return f"clt_{self.arch}_L{self.L}_d{self.d_in}_w{self.width}_{self.sparsity:g}"

    @property
    def k(self) -> int:
        return int(self.sparsity) if self.arch != "jumprelu" else 0

    @property
    def active_cap(self) -> int:
        """c: latents per row and layer the sparse decoding keeps."""
        if self.arch == "topk":
            return self.k
        if self.cap:
            return min(self.cap, self.width)
        return min(self.width, 4 * self.k if self.k else 256)

    @property
    def sparse(self) -> bool:
        """Whether the step decodes sparsely (``decode``; auto: the measured crossover)."""
        if self.decode == "auto":
            return self.L >= SPARSE_MIN_LAYERS and self.active_cap <= SPARSE_MAX_FRACTION * self.width
        return self.decode == "sparse"

    @property
    def sweep(self) -> tuple[float, ...]:  # the train loop's labels (train.loop.sae_label)
        return (self.sparsity,)

    transcoder = False  # not a per-site transcoder group (train.loop.fingerprint asks)

    @property
    def kind(self):
        return _Names("lambda" if self.arch == "jumprelu" else "k")


@dataclasses.dataclass(frozen=True)
class _Names:
    sweep_name: str


def check(arch, layers, width, sparsity, cap, decode, fail, matryoshka=()) -> None:
    """Config checks; ``fail(key, message)`` raises."""
    if arch not in ARCHS:
        fail("clt.arch", f"{arch!r} is not one of {ARCHS} (circuit-tracer reads JumpReLU CLTs)")
    if decode not in DECODES:
        fail("clt.decode", f"{decode!r} is not one of {DECODES}")
    if not isinstance(width, int) or width <= 0:
        fail("clt.width", f"{width!r} is not a positive int")
    if list(layers) != sorted(set(layers)) or any(not isinstance(l, int) or l < 0 for l in layers):
        fail("clt.layers", f"{tuple(layers)!r} must be distinct increasing layer indices")
    if arch != "jumprelu" and (not float(sparsity).is_integer() or not 1 <= sparsity <= width):
        fail("clt.sparsity", f"k={sparsity!r} must be an integer in 1..clt.width for {arch}")
    if arch == "jumprelu" and not sparsity >= 0:
        fail("clt.sparsity", f"lambda={sparsity!r} must be >= 0")
    if not isinstance(cap, int) or cap < 0 or (arch != "jumprelu" and 0 < cap < sparsity):
        fail("clt.cap", f"{cap!r} must be 0 (automatic) or an int >= k")
    if matryoshka:
        why = (mat.problem(mat.resolve(matryoshka, width), width) if mat.well_formed(matryoshka)
               else f"{tuple(matryoshka)} must be latent counts or fractions of clt.width in (0, 1]")
        if why:
            fail("clt.matryoshka", f"{why} (latents per layer)")


def offsets(L: int) -> list[int]:
    """The index of block (l, l) in the list of the P = L(L+1)/2 blocks ordered by source, then target."""
    return [sum(L - j for j in range(l)) for l in range(L)]


# ---------------------------------------------------------------------------------------------
# Parameters.


def unit_concat(w_dec: list) -> list:
    """Each latent's decoder, concatenated over its output layers, at unit norm."""
    return [w / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(w), (1, 2), keepdims=True)), 1e-12) for w in w_dec]


def project_grad(g_dec: list, w_dec: list) -> list:
    """Remove from each latent's (concatenated) decoder gradient its component along the decoder."""
    return [g - jnp.sum(g * w, (1, 2), keepdims=True) * w for g, w in zip(g_dec, w_dec)]


def init_params(spec: CLTSpec, key) -> dict:
    """Decoders: random directions in each latent's concatenated output space, unit norm; encoders
    uniform in +-``encoder_init_scale`` / sqrt(d_in); biases 0; JumpReLU thresholds at ``threshold_init``."""
    L, M, di, do = spec.L, spec.width, spec.d_in, spec.d_out
    k_enc, *k_dec = jax.random.split(key, L + 1)
    w_dec = unit_concat([jax.random.normal(k, (M, L - l, do), jnp.float32) for l, k in enumerate(k_dec)])
    bound = spec.encoder_init_scale / math.sqrt(di)
    params = {
        "W_enc": jax.random.uniform(k_enc, (L, di, M), jnp.float32, -bound, bound),
        "b_enc": jnp.zeros((L, M), jnp.float32),
        "W_dec": w_dec,
        "b_dec": jnp.zeros((L, do), jnp.float32),
    }
    if spec.arch == "jumprelu":
        params["log_threshold"] = jnp.full((L, M), math.log(spec.threshold_init), jnp.float32)
    return params


# ---------------------------------------------------------------------------------------------
# Forward.


def encode(spec: CLTSpec, params, x):
    """x [L, B, d_in] -> pre [L, B, M]."""
    return jnp.einsum("lbd,ldm->lbm", x, params["W_enc"], precision=PRECISIONS[spec.precision]) \
        + params["b_enc"][:, None, :]


@dataclasses.dataclass(frozen=True)
class Shards:
    """How the arrays a function sees are split, inside ``jax.shard_map`` (``loss_and_grad``): B the
    whole batch's rows, ``rows`` and ``latent`` the mesh axes over which rows and each layer's latents
    are split (() for none: one device, or the whole arrays), ``n_latent`` the latent shards."""

    B: int
    rows: tuple = ()
    latent: tuple = ()
    n_latent: int = 1


def _psum(a, axes):
    return lax.psum(a, axes) if axes else a


def _kth(a, k: int, axes: tuple = ()):
    """The k-th largest value of a's last axis, keepdims. ``axes``: mesh axes over which that last axis
    is split (inside shard_map): each shard's top min(k, n) are gathered and their k-th largest taken,
    which is exact (a shard holds at most k of the global top k; saejax.sae.sharded), never the whole axis."""
    if not axes:
        return lax.top_k(a, k)[0][..., k - 1:k]
    local = lax.top_k(lax.stop_gradient(a), min(k, a.shape[-1]))[0]
    cand = lax.all_gather(local, axes, axis=a.ndim - 1, tiled=True, to="invarying")
    return lax.top_k(cand, k)[0][..., k - 1:k]


def activate(spec: CLTSpec, params, pre, train: bool = True, bt_threshold=None, shards: Shards | None = None):
    """(f [L, B, M], l0 [L, B] with pseudo-derivatives in training (jumprelu), score [L, B, M]).

    ``score``: the sparse decoding keeps each row's ``active_cap`` largest (module docstring).
    Inference (``train=False``) of BatchTopK compares with ``bt_threshold`` [L]. ``shards``: inside
    shard_map, pre is this device's block and l0 its latents' share of each row's count."""
    sh = shards or Shards(pre.shape[1])
    if spec.arch == "jumprelu":
        theta = jnp.exp(params["log_threshold"])[:, None, :]
        f, l0 = jr.jumprelu_l0(pre, theta, spec.bandwidth)
        if not train:
            l0 = lax.stop_gradient(l0)
        return f, l0, jnp.where(pre > theta - spec.bandwidth / 2, pre, -jnp.inf)
    if spec.arch == "batchtopk" and not train:
        f = jnp.where(pre > bt_threshold[:, None, None], pre, 0.0)
    elif spec.arch == "topk":
        f = jnp.where(pre >= _kth(pre, spec.k, sh.latent), jax.nn.relu(pre), 0.0)
    else:  # batchtopk in training: the k*B largest of each layer's batch
        L, B, M = pre.shape
        kth = _kth(pre.reshape(L, B * M), spec.k * sh.B, sh.rows + sh.latent)[:, :, None]
        f = jnp.where(pre >= kth, jax.nn.relu(pre), 0.0)
    return f, jnp.sum(f > 0, -1).astype(jnp.float32), jnp.where(f > 0, pre, -jnp.inf)


def decode_dense(spec: CLTSpec, w_dec: list, f):
    """f [L, B, M] -> sum over sources of f_l @ W_dec[l] at the targets, [L, B, d_out] (no bias)."""
    L, B, _ = f.shape
    mm = partial(jnp.matmul, precision=PRECISIONS[spec.precision])
    y = None
    for l in range(L):
        part = mm(f[l], w_dec[l].reshape(w_dec[l].shape[0], -1)).reshape(B, L - l, spec.d_out)
        part = jnp.pad(part, ((0, 0), (l, 0), (0, 0)))
        y = part if y is None else y + part
    return jnp.swapaxes(y, 0, 1)


def shard_cap(spec: CLTSpec, n_latent: int = 1) -> int:
    """c per latent shard: the latents of each row and layer that one of ``n_latent`` shards decodes.
    TopK: min(k, M / n_latent), exact (a shard may hold all k); JumpReLU and BatchTopK: the cap split
    evenly, ceil(cap / n_latent) (at most M / n_latent). One shard: ``active_cap``."""
    m = spec.width // n_latent
    if spec.arch == "topk":
        return min(spec.k, m)
    return min(m, -(-spec.active_cap // n_latent))


def select(spec: CLTSpec, f, score, shards: Shards | None = None):
    """(v [L, B, c], idx [L, B, c], overflow [L]: fraction of rows with more than c candidates).

    ``shards``: inside shard_map, each latent shard keeps its own c = ``shard_cap`` (indices into its
    own latents), and overflow is the fraction of (row, latent shard) pairs over it."""
    sh = shards or Shards(f.shape[1])
    c = shard_cap(spec, sh.n_latent)
    _, idx = lax.top_k(score, c)
    v = jnp.take_along_axis(f, idx, -1)
    over = (jnp.sum(score > -jnp.inf, -1) > c).astype(jnp.float32)
    if sh.rows or sh.latent:
        over = _psum(jnp.sum(over, -1), sh.rows + sh.latent) / (sh.B * sh.n_latent)
    else:
        over = jnp.mean(over, -1)
    return v, idx, over


def row_block(spec: CLTSpec, B: int, c: int | None = None) -> int:
    """Rows per block of the sparse decoding: the largest divisor of B whose biggest gather (layer 0's
    [b, c, L, d_out] float32; c ``active_cap`` unless given) is at most ``spec.block_bytes``."""
    per_row = (spec.active_cap if c is None else c) * spec.L * spec.d_out * 4
    fits = [b for b in range(1, B + 1) if B % b == 0 and b * per_row <= spec.block_bytes]
    return fits[-1] if fits else 1


def _blocks(a, b):
    """[L, B, ...] -> [B / b, L, b, ...]."""
    L, B = a.shape[:2]
    return jnp.moveaxis(a.reshape((L, B // b, b) + a.shape[2:]), 1, 0)


def _weights(vb, bb, n: int):
    """[b, c] values -> [b, c, n]: each kept latent's value in the column of its Matryoshka block."""
    return vb[..., None] * jax.nn.one_hot(bb, n, dtype=vb.dtype)


def _sparse_fwd_block(w_dec, vb, ib, bb, precision, n):
    """One block's decoding: vb, ib [L, b, c] -> [b, L, d_out]; with blocks bb [L, b, c] (Matryoshka)
    the n partial decodings [n, b, L, d_out]."""
    L = vb.shape[0]
    y = None
    for l in range(L):
        rows = jnp.take(w_dec[l], ib[l], axis=0)  # [b, c, L - l, d]
        if bb is None:
            part = jnp.pad(jnp.einsum("bc,bcqd->bqd", vb[l], rows, precision=precision), ((0, 0), (l, 0), (0, 0)))
        else:
            part = jnp.einsum("bcn,bcqd->nbqd", _weights(vb[l], bb[l], n), rows, precision=precision)
            part = jnp.pad(part, ((0, 0), (0, 0), (l, 0), (0, 0)))
        y = part if y is None else y + part
    return y


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def sparse_decode(v, idx, blk, w_dec, b: int, precision, n: int = 1):
    """sum_l sum_j v[l, :, j] W_dec[l][idx[l, :, j]] at the targets: v, idx [L, B, c] -> [L, B, d_out].
    With ``blk`` [L, B, c] (each kept latent's Matryoshka block; None: plain) the n partial sums
    [n, L, B, d_out], block j's latents in the j-th: one gather of each decoder row for all n.

    Row blocks of b rows in a ``lax.map``; the VJP gathers the same rows again for v's cotangent and
    scatter-adds v times the output cotangent (of the latent's block) into each W_dec[l] (a
    ``lax.scan`` whose carry is the decoder gradient): O(L^2 c d) per row both ways (n times that in
    the small [c, n] contractions), nothing of size M per row."""
    blocks = (_blocks(v, b), _blocks(idx, b), None if blk is None else _blocks(blk, b))
    out = lax.map(lambda a: _sparse_fwd_block(w_dec, a[0], a[1], a[2], precision, n), blocks)
    if blk is None:  # [nb, b, L, d]
        nb, _, L, d = out.shape
        return jnp.moveaxis(out.reshape(nb * b, L, d), 1, 0)
    nb, _, _, L, d = out.shape  # [nb, n, b, L, d]
    return jnp.moveaxis(jnp.moveaxis(out, 0, 1).reshape(n, nb * b, L, d), 2, 1)


def _sparse_decode_fwd(v, idx, blk, w_dec, b, precision, n):
    return sparse_decode(v, idx, blk, w_dec, b, precision, n), (v, idx, blk, w_dec)


def _sparse_decode_bwd(b, precision, n, res, g):
    v, idx, blk, w_dec = res
    L = v.shape[0]
    if blk is None:
        gb = jnp.swapaxes(_blocks(g, b), 1, 2)  # [nb, b, L, d]
    else:  # [n, L, B, d] -> [nb, n, b, L, d]
        gb = jnp.moveaxis(jnp.stack([jnp.swapaxes(_blocks(g[j], b), 1, 2) for j in range(n)]), 0, 1)

    def body(acc, blk_):
        vb, ib, bb, gy = blk_  # [L, b, c] x 3 (bb None: plain), gy [b, L, d] or [n, b, L, d]
        g_v, new = [], []
        for l in range(L):
            rows = jnp.take(w_dec[l], ib[l], axis=0)  # [b, c, L - l, d]
            if bb is None:
                g_v.append(jnp.einsum("bqd,bcqd->bc", gy[:, l:], rows, precision=precision))
                upd = vb[l][:, :, None, None] * gy[:, None, l:, :]  # [b, c, L - l, d]
            else:
                oh = jax.nn.one_hot(bb[l], n, dtype=vb.dtype)  # [b, c, n]
                h = jnp.einsum("nbqd,bcqd->bcn", gy[:, :, l:], rows, precision=precision)
                g_v.append(jnp.sum(oh * h, -1))
                upd = jnp.einsum("bcn,nbqd->bcqd", _weights(vb[l], bb[l], n), gy[:, :, l:], precision=precision)
            new.append(acc[l].at[ib[l].reshape(-1)].add(upd.reshape((-1,) + upd.shape[2:])))
        return new, jnp.stack(g_v)

    zeros = [jnp.zeros_like(w) for w in w_dec]
    bblocks = None if blk is None else _blocks(blk, b)
    g_w, g_v = lax.scan(body, zeros, (_blocks(v, b), _blocks(idx, b), bblocks, gb))
    g_v = jnp.moveaxis(g_v, 0, 1).reshape(v.shape)  # [nb, L, b, c] -> [L, B, c]
    return g_v, None, None, g_w


sparse_decode.defvjp(_sparse_decode_fwd, _sparse_decode_bwd)


def decode_blocks_dense(spec: CLTSpec, w_dec: list, f, latent_axis=None):
    """The n Matryoshka partial decodings [n, L, B, d_out] of f [L, B, M] (a device's latents inside
    shard_map over ``latent_axis``, to be summed over it): each layer's latents cut at every block
    boundary of any shard (``matryoshka.layout``), one dense decode per segment."""
    segs, onehot = mat.layout(spec.matryoshka, f.shape[-1], latent_axis)
    parts = [decode_dense(spec, [w[lo:hi] for w in w_dec], f[..., lo:hi]) for lo, hi in segs]
    if onehot is None:
        return jnp.stack(parts)
    return jnp.stack([sum(onehot[s, j] * p for s, p in enumerate(parts)) for j in range(len(spec.matryoshka))])


def block_of(spec: CLTSpec, idx, latent_axis=None):
    """Each latent index's Matryoshka block (its shard's offset added inside shard_map)."""
    if latent_axis is not None:
        idx = idx + lax.axis_index(latent_axis) * (spec.width // lax.axis_size(latent_axis))
    return jnp.searchsorted(jnp.asarray(spec.matryoshka, jnp.int32), idx, side="right").astype(jnp.int32)


def forward(spec: CLTSpec, params, x, train: bool = True, bt_threshold=None, sparse: bool | None = None,
            shards: Shards | None = None):
    """x [L, B, d_in] -> dict(pre, f, l0 [L, B], y_hat [L, B, d_out], overflow [L]); with Matryoshka
    prefixes also y_prefix [n, L, B, d_out], each prefix's reconstruction (the last is y_hat).

    ``shards``: inside shard_map (``loss_and_grad``), on this device's rows and latents: pre, f and l0
    are its shares; y_hat is whole, its latent shards' partial decodings summed over ``latent`` once
    (all source layers summed first: one all-reduce of [L, B, d_out], n with Matryoshka prefixes)."""
    sh = shards or Shards(x.shape[1])
    pre = encode(spec, params, x)
    f, l0, score = activate(spec, params, pre, train, bt_threshold, sh)
    sparse = spec.sparse if sparse is None else sparse
    axis = sh.latent[0] if sh.latent else None
    n = len(spec.matryoshka)
    if sparse:
        v, idx, over = select(spec, f, score, sh)
        b = row_block(spec, x.shape[1], shard_cap(spec, sh.n_latent))
        blk = block_of(spec, idx, axis) if n else None
        y = sparse_decode(v, idx, blk, params["W_dec"], b, PRECISIONS[spec.precision], max(n, 1))
    else:
        over = jnp.zeros((spec.L,), jnp.float32)
        y = decode_blocks_dense(spec, params["W_dec"], f, axis) if n else decode_dense(spec, params["W_dec"], f)
    y = _psum(y, sh.latent)
    out = {"pre": pre, "f": f, "l0": l0, "overflow": over}
    if n:
        out["y_prefix"] = jnp.cumsum(y, 0) + params["b_dec"][None, :, None, :]
        out["y_hat"] = out["y_prefix"][-1]
    else:
        out["y_hat"] = y + params["b_dec"][:, None, :]
    return out


def variance(y):
    """[L]: each layer's total variance over the batch (the FVU's denominator)."""
    return jnp.sum(jnp.var(y, axis=1), -1)


def loss_terms(spec: CLTSpec, params, x, y, lam, sparse: bool | None = None, shards: Shards | None = None,
               var=None) -> tuple:
    """(total loss, per-layer terms) for x [L, B, d_in], y [L, B, d_out] normalized rows.

    ``shards``: inside shard_map (``loss_and_grad``), the terms are the whole batch's (summed over
    the mesh), ``var`` the whole batch's ``variance(y)`` (the FVU's denominator)."""
    sh = shards or Shards(x.shape[1])
    out = forward(spec, params, x, sparse=sparse, shards=sh)
    # sums over the rows / B: the mean over the batch (jnp.mean's own sum / B on one device)
    # Matryoshka: every prefix's error is a term; the full dictionary's (the last) is the logged mse
    hats = out["y_prefix"] if spec.matryoshka else out["y_hat"][None]
    recon = _psum(jnp.sum(jnp.sum(jnp.square(hats - y), -1), -1), sh.rows) / sh.B  # [n, L]
    mse = recon[-1]
    l0 = _psum(jnp.sum(out["l0"], -1), sh.rows + sh.latent) / sh.B  # [L], with the pseudo-derivative (jumprelu)
    sparsity = lam * l0 if spec.arch == "jumprelu" else jnp.zeros_like(mse)
    active = jnp.min(jnp.where(out["f"] > 0, lax.stop_gradient(out["f"]), jnp.inf), axis=(1, 2))
    if sh.rows:
        fired = _psum(jnp.sum(out["f"] > 0, 1, dtype=jnp.int32), sh.rows) > 0
    else:
        fired = jnp.any(out["f"] > 0, 1)
    terms = {"mse": mse, "sparsity_loss": sparsity, "fvu": mse / (variance(y) if var is None else var),
             "l0": lax.stop_gradient(l0), "fired": fired, "overflow": out["overflow"],
             "min_active": lax.pmin(active, sh.rows + sh.latent) if sh.rows + sh.latent else active}
    return jnp.sum(recon) + jnp.sum(sparsity), terms


def param_specs(spec: CLTSpec) -> dict:
    """Each parameter's PartitionSpec on a data x latent mesh: latents over ``latent``, nothing over
    ``data`` (saejax.train.clt_step.PARTITION_RULES lays the state out the same way)."""
    out = {"W_enc": P(None, None, "latent"), "b_enc": P(None, "latent"), "W_dec": [P("latent", None, None)] * spec.L,
           "b_dec": P()}
    if spec.arch == "jumprelu":
        out["log_threshold"] = P(None, "latent")
    return out


def loss_and_grad(spec: CLTSpec, params, x, y, lam, mesh=None, sparse: bool | None = None):
    """((total loss, terms), gradients) of ``loss_terms``.

    On a mesh that splits rows (``data``) or latents (``latent``) it runs inside ``jax.shard_map``:
    each device encodes its rows with its latents, selects and decodes its own active latents (its
    ``shard_cap``, indices local to the shard), and the partial decodings are summed over ``latent``
    once per step ([L, B/D, d_out]); TopK/BatchTopK thresholds gather k candidates per shard
    (``_kth``). Each device's gradients are its rows' partial sums (the sparse decoding's row-block
    scan included), all-reduced over ``data`` once, after it. The design minimum (saejax.train.cost,
    ``clt_design_comm``); without such a mesh, autodiff of ``loss_terms`` on the whole arrays."""
    sizes = dict(mesh.shape) if mesh is not None else {}
    D, Ls = sizes.get("data", 1), sizes.get("latent", 1)
    if D * Ls == 1:
        return jax.value_and_grad(lambda q: loss_terms(spec, q, x, y, lam, sparse=sparse), has_aux=True)(params)
    sh = Shards(x.shape[1], rows=("data",), latent=("latent",), n_latent=Ls)
    ps = param_specs(spec)
    rows = P(None, "data", None)

    def local(p, x, y, lam, var):
        p = lax.pcast(p, ("data",), to="varying")  # each device's gradient: its own rows' partial sum
        (loss, terms), g = jax.value_and_grad(
            lambda q: loss_terms(spec, q, x, y, lam, sparse=sparse, shards=sh, var=var), has_aux=True)(p)
        return (loss, terms), lax.psum(g, "data")  # one all-reduce of the gradients per step

    terms_specs = {"mse": P(), "sparsity_loss": P(), "fvu": P(), "l0": P(), "fired": P(None, "latent"),
                   "overflow": P(), "min_active": P()}
    return jax.shard_map(local, mesh=mesh, in_specs=(ps, rows, rows, P(), P()),
                         out_specs=((P(), terms_specs), ps))(params, x, y, lam, variance(y))
