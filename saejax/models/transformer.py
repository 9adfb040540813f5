"""The forward pass of the supported decoder families (config.FAMILIES), in plain JAX, with hook sites.

Parameters are a pytree (dicts of arrays), weights stored as [in, out] so that y = x @ W:

    embed        [V, d]
    lm_head      [d, V]            (only when embeddings are untied)
    final_norm   [d]
    layers/<i>/  wq [d, H*hd], wk [d, KV*hd], wv [d, KV*hd], wo [H*hd, d],
                 w_gate [d, F], w_up [d, F], w_down [F, d], and per family:
                 attn_norm [d], mlp_norm [d]              (norms "pre" and "sandwich")
                 post_attn_norm [d], post_mlp_norm [d]    (norms "sandwich" and "post")
                 q_norm [hd], k_norm [hd]                 (qk_norm "head"; "full": [H*hd], [KV*hd])
                 bq [H*hd], bk [KV*hd], bv [KV*hd]         (qkv_bias)

One block, with x [B, L, d] the residual stream entering layer i:

    pre (Llama, Qwen):   z = attention(attn_norm(x))      a = z @ wo                  x <- x + a
                         m = mlp(mlp_norm(x))                                          x <- x + m
    sandwich (Gemma):    a = post_attn_norm(attention(attn_norm(x)) @ wo)             x <- x + a
                         m = post_mlp_norm(mlp(mlp_norm(x)))                           x <- x + m
    post (OLMo 2):       a = post_attn_norm(attention(x) @ wo)                         x <- x + a
                         m = post_mlp_norm(mlp(x))                                     x <- x + m

with rms(x) = x / sqrt(mean(x^2) + eps), Gemma's norms (QK-norms too) scaling by (1 + w), the
others' by w; mlp(h) = (act(h W_gate) * h W_up) W_down. Hook sites (Gemma Scope's definitions):

    res.i  x after block i                                [B, L, d]
    att.i  z: per-head attention output before wo, heads
           concatenated (head-major: z[..., h*hd:(h+1)*hd]) [B, L, H*hd]
    mlp_in.i  the MLP's input: mlp_norm(x), the pre-MLP norm's gain included (OLMo 2, which
           has no pre-MLP norm: x, the residual stream between attention and MLP)  [B, L, d]
    mlp.i  m: the MLP sublayer output, the term added to the residual stream [B, L, d]

Attention: q = h wq (+ bq), QK-norm (per head before RoPE, or over the whole projection), RoPE;
scores s = (q . k) * scale with scale = query_pre_attn_scalar^-1/2 (Gemma) or hd^-1/2; Gemma 2
soft-caps s <- c tanh(s / c) before the causal (and, on sliding layers, window: q - k < W) mask;
softmax in float32. RoPE rotates the two halves of each head (transformers' rotate_half
convention); Gemma 3's sliding layers use their own base (rope_local_theta), unscaled.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from .config import SITE_KINDS, ModelConfig, ModelError


# --- sites -----------------------------------------------------------------------------------
def parse_site(config: ModelConfig, site: str) -> tuple[str, int]:
    """"kind.L" -> (kind, L); a one-line ModelError naming the site if it is not one."""
    m = re.fullmatch(r"(res|att|mlp_in|mlp)\.(\d+)", str(site))
    if not m or int(m.group(2)) >= config.n_layers:
        raise ModelError(f"bad site {site!r}: expected <kind>.<layer> with kind in {SITE_KINDS} "
                         f"and layer in 0..{config.n_layers - 1}")
    return m.group(1), int(m.group(2))


def site_width(config: ModelConfig, site: str) -> int:
    """Width of a site's activation: d_model for res/mlp_in/mlp, n_heads*head_dim for att."""
    kind, _ = parse_site(config, site)
    return config.att_width if kind == "att" else config.d_model


ORDER = {"att": 0, "mlp_in": 1, "mlp": 2, "res": 3}  # the sites of one layer in forward order


def site_position(config: ModelConfig, site: str) -> tuple[int, int]:
    """(layer, rank within the layer): site a comes before site b in a forward pass iff
    site_position(a) < site_position(b)."""
    kind, layer = parse_site(config, site)
    return layer, ORDER[kind]


def norm_gain(config: ModelConfig, w) -> np.ndarray:
    """The effective gain of an RMSNorm with weight ``w``: 1 + w (Gemma), w (others), float32."""
    w = np.asarray(w, np.float32)
    return (1.0 + w) if config.family.norm_offset else w


# --- random parameters -----------------------------------------------------------------------
def random_params(config: ModelConfig, seed: int = 0) -> dict:
    """Deterministic random float32 parameters (numpy PCG64 from ``seed``).

    Linear weights ~ N(0, 1/fan_in); embeddings ~ N(0, 1), or N(0, 1/d) where the family scales
    them by sqrt(d); norm weights ~ 1 + N(0, 0.1^2), or N(0, 0.1^2) for a (1 + w) gain; biases
    ~ N(0, 0.1^2). Llama and Gemma 2 draw in the order they always did.
    """
    c, fam, rng = config, config.family, np.random.default_rng(seed)

    def lin(n_in, n_out):
        return (rng.standard_normal((n_in, n_out)) / math.sqrt(n_in)).astype(np.float32)

    def norm(n=c.d_model):
        return ((0.0 if fam.norm_offset else 1.0) + 0.1 * rng.standard_normal(n)).astype(np.float32)

    kvw = c.n_kv_heads * c.head_dim
    p = {"embed": (rng.standard_normal((c.vocab_size, c.d_model))
                   / (math.sqrt(c.d_model) if fam.embed_scale else 1.0)).astype(np.float32), "layers": []}
    for _ in range(c.n_layers):
        layer = {"attn_norm": norm(), "wq": lin(c.d_model, c.att_width), "wk": lin(c.d_model, kvw),
                 "wv": lin(c.d_model, kvw), "wo": lin(c.att_width, c.d_model),
                 "mlp_norm": norm(), "w_gate": lin(c.d_model, c.ffn), "w_up": lin(c.d_model, c.ffn),
                 "w_down": lin(c.ffn, c.d_model)}
        if fam.norms != "pre":
            layer["post_attn_norm"], layer["post_mlp_norm"] = norm(), norm()
        if fam.norms == "post":
            del layer["attn_norm"], layer["mlp_norm"]
        if fam.qk_norm:
            full = fam.qk_norm == "full"
            layer["q_norm"] = norm(c.att_width if full else c.head_dim)
            layer["k_norm"] = norm(kvw if full else c.head_dim)
        if fam.qkv_bias:
            for k, n in (("bq", c.att_width), ("bk", kvw), ("bv", kvw)):
                layer[k] = (0.1 * rng.standard_normal(n)).astype(np.float32)
        p["layers"].append(layer)
    p["final_norm"] = norm()
    if not c.tie_embeddings:
        p["lm_head"] = lin(c.d_model, c.vocab_size)
    return p


def partition_rules() -> list[tuple[str, P]]:
    """Tensor parallelism over the "latent" mesh axis: attention heads (columns of wq/wk/wv and
    their biases, rows of wo), the MLP hidden dim (columns of w_gate/w_up, rows of w_down) and the
    vocabulary; norms (QK-norms too) replicated. The batch is split over "data" by the caller's
    token sharding. OLMo 2's full-width QK-norm reduces over the split heads: XLA adds the
    all-reduce of the mean square."""
    return [(r"(wq|wk|wv|w_gate|w_up)$", P(None, "latent")),
            (r"(bq|bk|bv)$", P("latent")),
            (r"(wo|w_down)$", P("latent", None)),
            (r"embed$", P("latent", None)),
            (r"lm_head$", P(None, "latent")),
            (r".*", P())]


# --- pieces ----------------------------------------------------------------------------------
def rms_norm(x, w, eps: float, gemma: bool):
    """x / sqrt(mean(x^2) + eps) * w  (``gemma``: * (1 + w)), computed in float32."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    w = w.astype(jnp.float32)
    return (y * ((1.0 + w) if gemma else w)).astype(x.dtype)


def inv_freq(config: ModelConfig, local: bool = False) -> np.ndarray:
    """RoPE inverse frequencies [hd/2]: theta^(-2i/hd). ``local``: a sliding layer of a model with
    its own local base (Gemma 3: rope_local_theta, no scaling). Otherwise with the configured
    scaling: linear divides every frequency by ``factor``; Llama 3 divides wavelengths longer than
    L0/low_freq_factor by ``factor``, keeps those shorter than L0/high_freq_factor, and interpolates
    smoothly between."""
    hd = config.head_dim
    local = local and config.rope_local_theta is not None
    theta = config.rope_local_theta if local else config.rope_theta
    f = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
    s = None if local else config.rope_scaling
    if not s:
        return f.astype(np.float32)
    if s.get("rope_type") == "linear":
        return (f / np.float32(s["factor"])).astype(np.float32)
    factor, lo, hi, L0 = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                          s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / f
    scaled = np.where(wavelen > L0 / lo, f / factor, f)
    smooth = (L0 / wavelen - lo) / (hi - lo)
    mid = ~(wavelen < L0 / hi) & ~(wavelen > L0 / lo)
    return np.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled).astype(np.float32)


def rope(x, cos, sin):
    """x [B, L, n, hd] rotated: x*cos + rotate_half(x)*sin, rotate_half(a, b) = (-b, a)."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rot * sin).astype(x.dtype)


def attention(config: ModelConfig, lp: Mapping, h, cos, sin, mask):
    """h [B, L, d] (normed; OLMo 2: the residual stream) -> z [B, L, H*hd], heads concatenated,
    before the output projection."""
    c, fam = config, config.family
    B, L, _ = h.shape
    G = c.n_heads // c.n_kv_heads
    q, k, v = h @ lp["wq"], h @ lp["wk"], h @ lp["wv"]
    if fam.qkv_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    if fam.qk_norm == "full":
        q, k = (rms_norm(t, lp[n], c.rms_eps, fam.norm_offset) for t, n in ((q, "q_norm"), (k, "k_norm")))
    q = q.reshape(B, L, c.n_heads, c.head_dim)
    k = k.reshape(B, L, c.n_kv_heads, c.head_dim)
    if fam.qk_norm == "head":
        q, k = (rms_norm(t, lp[n], c.rms_eps, fam.norm_offset) for t, n in ((q, "q_norm"), (k, "k_norm")))
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    v = v.reshape(B, L, c.n_kv_heads, c.head_dim)
    q = q.reshape(B, L, c.n_kv_heads, G, c.head_dim)
    scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5
    s = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
    if c.attn_softcap:
        s = c.attn_softcap * jnp.tanh(s / c.attn_softcap)
    s = jnp.where(mask, s, -jnp.inf)
    pr = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    z = jnp.einsum("bkgqs,bskd->bqkgd", pr, v)
    return z.reshape(B, L, c.att_width)


def mlp(config: ModelConfig, lp: Mapping, h):
    """h [B, L, d] -> (act(h W_gate) * h W_up) W_down; act = SiLU or tanh-GELU (GeGLU) by family."""
    g = h @ lp["w_gate"]
    g = jax.nn.gelu(g, approximate=True) if config.family.act == "gelu_tanh" else jax.nn.silu(g)
    return (g * (h @ lp["w_up"])) @ lp["w_down"]


def _tile(x, n: int):
    """[B, ...] -> [n*B, ...], variant-major (row v*B + b is copy v of row b)."""
    return x if n == 1 else jnp.tile(x, (n,) + (1,) * (x.ndim - 1))


def normalize_splice(config: ModelConfig, splice: Mapping | None) -> dict:
    """{site: fn | (fn, reads)} -> {site: (fn, reads tuple or None)}, checked: every site valid,
    every read site strictly before the written site in the forward pass. One-line ModelError
    naming the site otherwise (raised before anything is traced)."""
    out = {}
    for site, value in dict(splice or {}).items():
        pos = site_position(config, site)
        if callable(value):
            out[site] = (value, None)
            continue
        if not (isinstance(value, (tuple, list)) and len(value) == 2 and callable(value[0])
                and isinstance(value[1], (tuple, list)) and all(isinstance(r, str) for r in value[1])):
            raise ModelError(f"splice at {site!r}: expected fn or (fn, (read sites...)), got {value!r}")
        fn, reads = value[0], tuple(value[1])
        for r in reads:
            if site_position(config, r) >= pos:
                raise ModelError(f"splice at {site!r} reads {r!r}, which is not earlier in the forward pass "
                                 f"(a splice reads only sites before the one it writes)")
        out[site] = (fn, reads)
    return out


def _splice(fn: Callable, reads, act, seen: dict, carried: list):
    """Apply a splice function (``reads`` None: fn(act); else fn(act, {site: activation}) with each
    read activation tiled to act's batch); if its batch is N times the input's, tile the carried arrays."""
    B = act.shape[0]
    if reads is None:
        out = fn(act)
    else:
        out = fn(act, {r: _tile(seen[r], B // seen[r].shape[0]) for r in reads})
    if out.shape[1:] != act.shape[1:] or out.shape[0] % B:
        raise ModelError(f"splice function returned shape {out.shape} for an activation of shape "
                         f"{act.shape}; expected [N*{B}, {', '.join(map(str, act.shape[1:]))}]")
    n = out.shape[0] // B
    return out.astype(act.dtype), [_tile(x, n) for x in carried]


# --- the forward pass ------------------------------------------------------------------------
def forward(config: ModelConfig, params, tokens, sites: Sequence[str] = (), logits: bool = True,
            splice: Mapping | None = None, dtype=jnp.float32):
    """tokens [B, L] int -> (logits [N*B, L, V] float32 or None, {site: [B', L, w]}).

    ``sites`` are captured (after any splice at the same site, so a captured spliced site shows
    the replacement). ``splice`` maps site -> fn(act [B', L, w]) -> [N*B', L, w], or
    site -> (fn, reads): fn(act, {read site: [B', L, w_r]}) -> [N*B', L, w], the read sites
    strictly earlier in the pass, their activations as this pass computed them (after any splice
    there) and tiled to act's batch B'. Everything carried forward is tiled N times
    (variant-major). When ``logits`` is False, no layer after the last captured or spliced site is
    computed. Traceable: call under jax.jit with ``sites``, ``logits`` and ``splice`` static
    (closed over).
    """
    c = config
    splice = normalize_splice(c, splice)
    reads = {r for _, rs in splice.values() for r in (rs or ())}
    sites = tuple(sites)
    parsed = {s: site_position(c, s) for s in (*sites, *splice)}
    if logits:
        stop = (c.n_layers, 0)
    elif parsed:
        stop = max(parsed.values())
    else:
        stop = (-1, 0)
    fam = c.family
    off = fam.norm_offset
    dt = jnp.dtype(dtype)
    B, L = tokens.shape
    x = jnp.take(params["embed"].astype(dt), tokens, axis=0)
    if fam.embed_scale:
        x = x * jnp.asarray(math.sqrt(c.d_model), dt)
    pos = jnp.arange(L, dtype=jnp.float32)

    def rotary(local: bool):
        ang = pos[:, None] * jnp.asarray(inv_freq(c, local))[None, :]  # [L, hd/2]
        ang = jnp.concatenate([ang, ang], axis=-1)[None, :, None, :]  # [1, L, 1, hd]
        return jnp.cos(ang).astype(dt), jnp.sin(ang).astype(dt)

    rot = {False: rotary(False)}
    if c.rope_local_theta is not None:
        rot[True] = rotary(True)
    qi, ki = jnp.arange(L)[:, None], jnp.arange(L)[None, :]
    causal = ki <= qi
    window = causal & (qi - ki < c.sliding_window) if c.sliding_window else causal
    acts, seen = {}, {}

    def hook(site, a, carried):
        if site in splice:
            a, carried = _splice(*splice[site], a, seen, carried)
        if site in sites:
            acts[site] = a
        if site in reads:
            seen[site] = a
        return a, carried

    for i in range(min(c.n_layers, stop[0] + 1)):
        lp = jax.tree.map(lambda w: w.astype(dt), params["layers"][i])
        sliding = bool(c.sliding_layers and c.sliding_layers[i])
        cos, sin = rot[sliding and c.rope_local_theta is not None]
        h = x if fam.norms == "post" else rms_norm(x, lp["attn_norm"], c.rms_eps, off)
        z = attention(c, lp, h, cos, sin, window if sliding else causal)
        z, (x,) = hook(f"att.{i}", z, [x])
        if (i, ORDER["att"]) == stop:
            break
        a = z @ lp["wo"]
        if fam.norms != "pre":
            a = rms_norm(a, lp["post_attn_norm"], c.rms_eps, off)
        x = x + a
        h = x if fam.norms == "post" else rms_norm(x, lp["mlp_norm"], c.rms_eps, off)
        h, (x,) = hook(f"mlp_in.{i}", h, [x])
        if (i, ORDER["mlp_in"]) == stop:
            break
        m = mlp(c, lp, h)
        if fam.norms != "pre":
            m = rms_norm(m, lp["post_mlp_norm"], c.rms_eps, off)
        m, (x,) = hook(f"mlp.{i}", m, [x])
        if (i, ORDER["mlp"]) == stop:
            break
        x, _ = hook(f"res.{i}", x + m, [])
    if not logits:
        return None, acts
    h = rms_norm(x, params["final_norm"].astype(dt), c.rms_eps, off)
    w = params["embed"].astype(dt).T if c.tie_embeddings else params["lm_head"].astype(dt)
    out = jnp.matmul(h, w, preferred_element_type=jnp.float32)
    if c.final_softcap:
        out = c.final_softcap * jnp.tanh(out / c.final_softcap)
    return out, acts
