"""Delta LM loss: the model's next-token loss with SAE reconstructions spliced in at their site.

For one site, one forward pass evaluates N = 2 + Kc variants of the activation a [B, L, w] at once
through the model's N*B splice (the prefix up to the site is computed once):

    variant 0   clean            a
    variant 1   zero ablation    0                          at kept positions
    variant 2+j SAE j            x_hat_j = D_j(E_j(a * s)) / s   at kept positions

with s the site's norm_scale (SAEs were trained on a * s). Elsewhere every variant keeps a.
A dictionary that reads another site (a transcoder: reads mlp_in.L, writes mlp.L; ``read=``)
encodes that site's activation r of the same pass instead: x_hat_j = D_j(E_j(r * s_r)) / s, with
s_r the read site's norm_scale, through the model's cross-site splice (docs/models.md).
Kept positions are the ones the store kept (so the SAE was trained on them): not position 0, not
one of the store policy's ``skip_first`` positions after it, not a special token, and (with the
policy's ``max_norm_ratio`` r > 0) not an activation with ||a|| > r * median_norm of the site.

Losses, summed over CE positions p (input p kept by the token rules above, target p+1 not special):
    CE_n = -log softmax(logits_n[p])[token p+1]        KL_n = KL(softmax(clean[p]) || softmax(logits_n[p]))
Per SAE: delta_lm_loss = CE_sae - CE_clean; ce_score = (CE_ablate - CE_sae) / (CE_ablate - CE_clean).

The replacement model (``all_at_once_pass``): several sites written at once in one pass, each from
read sites of the same pass (errors compound), three variants N x B (variant-major): clean, every
written site zero-ablated, every written site replaced; at the token positions the store keeps (not
the activation-norm policy). A CLT's (evaluate/clt.py) and a transcoder group member's
(``transcoder_replacement_losses``: every mlp.L of the group from its mlp_in.L).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from saejax.sae import apply

MEMORY_BUDGET = 2 ** 30  # bytes of logits + latents one pass may hold (variants x contexts)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which positions a site's SAE was trained on (the store manifest's policy)."""

    special_ids: tuple[int, ...] = ()
    skip_first: int = 0
    max_norm: float = 0.0  # max_norm_ratio * median_norm of the site; 0: off
    read_max_norm: float = 0.0  # the same for the read site of a cross-site dictionary; 0: off


def token_keep(tokens, policy: Policy):
    """tokens [B, L] -> keep [B, L] bool by position and token: p > skip_first, token not special."""
    pos = jnp.arange(tokens.shape[1])[None, :]
    special = jnp.isin(tokens, jnp.asarray(policy.special_ids, tokens.dtype)) if policy.special_ids \
        else jnp.zeros(tokens.shape, bool)
    return (pos > policy.skip_first) & ~special


def ce_mask(tokens, policy: Policy):
    """tokens [B, L] -> [B, L-1]: predictions from kept inputs of non-special targets."""
    keep = token_keep(tokens, policy)
    special_t = ~token_keep(tokens, Policy(policy.special_ids, -1))  # special tokens only
    return keep[:, :-1] & ~special_t[:, 1:]


def variants(arch, ks, sae, scale, act, mask, x_in=None, in_scale=None):
    """act [B, L, w] -> [N*B, L, w], variant-major (clean, zero, SAE 0..Kc-1); see module doc.
    ``sae``: stacked arrays [1, Kc, ...] with the pre-encoder bias folded into b_enc. ``x_in``
    [B, L, w_in] (scaled by ``in_scale``): what the SAEs encode when they read another site."""
    B, L, w = act.shape
    x = act.astype(jnp.float32)
    src, s_in = (x, scale) if x_in is None else (x_in.astype(jnp.float32), in_scale)
    f = apply.encode_stacked(arch, sae, (src * s_in).reshape(1, B * L, src.shape[-1]), ks)
    x_hat = apply.decode_stacked(sae, f, (src * s_in).reshape(1, B * L, src.shape[-1]))[0].reshape(-1, B, L, w) / scale
    m = mask[:, :, None]  # [B, L, 1]
    out = jnp.concatenate([x[None], jnp.where(m, 0.0, x)[None], jnp.where(m[None], x_hat, x[None])])
    return out.reshape(-1, L, w).astype(act.dtype)


_PASSES: dict = {}


def make_pass(model, site: str, arch: str, ks, policy: Policy, read: str | None = None):
    """A compiled pass: (params, sae [1, Kc, ...], scale, tokens [B, L], valid [B] bool[, read_scale])
    -> (nll_sum [N], kl_sum [N], n_positions) with N = Kc + 2 variants; contexts with valid False
    (batch padding) count nowhere. With ``read`` the SAEs encode that (earlier) site's activation
    times ``read_scale`` and write ``site``; a position is kept only if both sites' policies keep it."""

    def run(params, sae, scale, tokens, valid, read_scale=None):
        keep = token_keep(tokens, policy)

        def fn(act, reads=None):
            mask = keep
            if policy.max_norm > 0:
                mask = mask & (jnp.linalg.norm(act.astype(jnp.float32), axis=-1) <= policy.max_norm)
            if reads is None:
                return variants(arch, ks, sae, scale, act, mask)
            x_in = reads[read]
            if policy.read_max_norm > 0:
                mask = mask & (jnp.linalg.norm(x_in.astype(jnp.float32), axis=-1) <= policy.read_max_norm)
            return variants(arch, ks, sae, scale, act, mask, x_in, read_scale)

        logits, _ = model.apply(params, tokens, sites=(), logits=True,
                                splice={site: fn if read is None else (fn, (read,))})
        B, L = tokens.shape
        logp = jax.nn.log_softmax(logits.astype(jnp.float32)[:, :-1], axis=-1)
        logp = logp.reshape(-1, B, L - 1, logp.shape[-1])  # [N, B, L-1, V]
        nll = -jnp.take_along_axis(logp, tokens[None, :, 1:, None], axis=-1)[..., 0]
        clean = logp[0]
        kl = jnp.sum(jnp.exp(clean)[None] * (clean[None] - logp), axis=-1)  # [N, B, L-1]
        cm = ce_mask(tokens, policy) & valid[:, None]
        return jnp.sum(nll * cm, axis=(1, 2)), jnp.sum(kl * cm, axis=(1, 2)), jnp.sum(cm)

    key = (id(model), site, arch, ks, policy, read)  # one compiled pass per site and variant set
    if key not in _PASSES:
        _PASSES[key] = jax.jit(run)
    return _PASSES[key]


def variant_bytes(context_len: int, vocab: int, width: int, d: int) -> int:
    """Bytes one variant of one context holds in a pass: logits and log-probabilities (~3 x V),
    pre-activations and latents (2 x M), activations and reconstructions (~4 x d), float32."""
    return 4 * context_len * (3 * vocab + 2 * width + 4 * d)


def plan(n_sae: int, batch: int, context_len: int, vocab: int, width: int, d: int,
         budget: int = MEMORY_BUDGET) -> tuple[int, int]:
    """(contexts per pass, SAEs per pass) within ``budget``: all n_sae + 2 variants in one pass
    with as many contexts as fit (at least one); variants are split only if one context is too many."""
    per = variant_bytes(context_len, vocab, width, d)
    b = max(1, min(batch, budget // ((n_sae + 2) * per)))
    kc = n_sae if (n_sae + 2) * b * per <= budget else max(1, budget // (b * per) - 2)
    return b, kc


def site_losses(model, params, site: str, meta: dict, arrays: dict, t: int, tokens: np.ndarray,
                policy: Policy, batch: int = 8, budget: int = MEMORY_BUDGET, read: str | None = None,
                read_scale: float | None = None) -> list[dict]:
    """Delta LM loss, CE score and KL of the K SAEs of site index ``t`` of a group on held-out
    ``tokens`` [n, L]; one list entry per sweep member. ``read``, ``read_scale``: the SAEs read that
    earlier site (its norm scale) and write ``site`` (transcoders)."""
    arch = meta["arch"]
    folded = apply.site_arrays(meta, arrays, t)
    K, M = folded["b_enc"].shape[1:]
    ks = apply.inference_ks(meta)
    vocab = vocab_size(model)
    b, kc = plan(K, batch, tokens.shape[1], vocab, M, folded["b_dec"].shape[-1], budget)
    scale = jnp.float32(meta["norm_scale"][t])
    nll, kl = np.zeros(K), np.zeros(K)
    clean = ablate = kl_zero = count = 0.0
    for j0 in range(0, K, kc):
        sel = slice(j0, min(K, j0 + kc))
        sae = {k: v[:, sel] for k, v in folded.items()}
        fn = make_pass(model, site, arch, None if ks is None else ks[sel], policy, read)
        extra = () if read is None else (jnp.float32(read_scale),)
        for i in range(0, len(tokens), b):
            chunk = tokens[i:i + b]
            valid = np.arange(b) < len(chunk)
            if len(chunk) < b:  # pad with copies of the last context (valid False: not counted)
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - len(chunk), 0)])
            s_nll, s_kl, n = (np.asarray(a, np.float64) for a in
                              fn(params, sae, scale, jnp.asarray(chunk), jnp.asarray(valid), *extra))
            nll[sel] += s_nll[2:]
            kl[sel] += s_kl[2:]
            if j0 == 0:  # clean and ablated losses: once
                clean, ablate, kl_zero, count = clean + s_nll[0], ablate + s_nll[1], kl_zero + s_kl[1], count + n
    if count == 0:
        raise ValueError(f"site {site}: no held-out positions left after masking")
    ce_clean, ce_ablate = float(clean / count), float(ablate / count)
    out = []
    for k in range(K):  # plain floats for JSON; ce_score None when ablation changes nothing
        ce = float(nll[k] / count)
        denom = ce_ablate - ce_clean
        out.append({"ce_clean": ce_clean, "ce_ablate": ce_ablate, "ce_sae": ce, "delta_lm_loss": ce - ce_clean,
                    "ce_score": (ce_ablate - ce) / denom if denom != 0 else None,
                    "kl": float(kl[k] / count), "kl_ablate": float(kl_zero / count), "ce_positions": int(count)})
    return out



def all_at_once_pass(model, writes: dict, policy: Policy):
    """The compiled replacement pass: (params, arrs, tokens [B, T], valid [B] bool) -> (nll_sum [3],
    kl_sum [3], n_positions), variants clean, ablated, replacement (module doc). ``writes``: {written
    site: (read sites, y_hat)} with y_hat(arrs, ins) -> [B*T, w] the written site's replacement from
    the replacement variant's activations ``ins`` of the read sites ([B*T, w_in] each, float32)."""

    def run(params, arrs, tokens, valid):
        B, T = tokens.shape
        keep = token_keep(tokens, policy)[:, :, None]

        def make(reads, y_hat):
            def fn(act, got):
                x = act.astype(jnp.float32)
                if x.shape[0] == B:  # the first splice: clean, ablated, replacement from here on
                    x = jnp.concatenate([x, x, x])
                # the replacement variant's inputs (a read recorded before the first splice has batch B)
                ins = [got[r].astype(jnp.float32) for r in reads]
                ins = [r if r.shape[0] == B else r[2 * B:] for r in ins]
                y = y_hat(arrs, [r.reshape(B * T, -1) for r in ins]).reshape(B, T, -1)
                clean, zero, rep = x[:B], x[B:2 * B], x[2 * B:]
                out = jnp.concatenate([clean, jnp.where(keep, 0.0, zero), jnp.where(keep, y, rep)])
                return out.astype(act.dtype)
            return fn

        sp = {site: (make(reads, y_hat), tuple(reads)) for site, (reads, y_hat) in writes.items()}
        logits, _ = model.apply(params, tokens, sites=(), logits=True, splice=sp)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32)[:, :-1], axis=-1).reshape(3, B, T - 1, -1)
        nll = -jnp.take_along_axis(logp, tokens[None, :, 1:, None], axis=-1)[..., 0]
        kl = jnp.sum(jnp.exp(logp[0])[None] * (logp[0][None] - logp), axis=-1)
        cm = ce_mask(tokens, policy) & valid[:, None]
        return jnp.sum(nll * cm, axis=(1, 2)), jnp.sum(kl * cm, axis=(1, 2)), jnp.sum(cm)

    return jax.jit(run)


def vocab_size(model) -> int:
    """The model's vocabulary size (0 when its config does not say)."""
    return int(getattr(model.config, "vocab_size", 0) or 0)


def all_at_once_losses(fn, params, arrs, tokens: np.ndarray, batch: int = 8, vocab: int = 0) -> dict:
    """Run ``all_at_once_pass``'s ``fn`` over held-out ``tokens`` [n, T] in batches of at most ``batch``
    contexts, fewer where the three variants' logits of ``vocab`` entries would pass MEMORY_BUDGET:
    ce_clean, ce_ablate, ce_replacement, delta_lm_loss, ce_score, kl, kl_ablate, ce_positions."""
    batch = max(1, min(batch, len(tokens), MEMORY_BUDGET // (3 * variant_bytes(tokens.shape[1], vocab, 0, 0))))
    nll, kl, count = np.zeros(3), np.zeros(3), 0
    for i in range(0, len(tokens), batch):
        chunk = tokens[i:i + batch]
        valid = np.arange(batch) < len(chunk)
        if len(chunk) < batch:  # pad with copies of the last context (valid False: not counted)
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)])
        s_nll, s_kl, n = (np.asarray(v, np.float64) for v in fn(params, arrs, jnp.asarray(chunk), jnp.asarray(valid)))
        nll, kl, count = nll + s_nll, kl + s_kl, count + int(n)
    if count == 0:
        raise ValueError("replacement model: no held-out positions left after masking")
    ce_clean, ce_ablate, ce_rep = (float(v / count) for v in nll)
    denom = ce_ablate - ce_clean
    return {"ce_clean": ce_clean, "ce_ablate": ce_ablate, "ce_replacement": ce_rep,
            "delta_lm_loss": ce_rep - ce_clean, "ce_score": (ce_ablate - ce_rep) / denom if denom else None,
            "kl": float(kl[2] / count), "kl_ablate": float(kl[1] / count), "ce_positions": count}


def transcoder_replacement_losses(model, params, meta: dict, arrays: dict, tokens: np.ndarray, policy: Policy,
                                  member: int, batch: int = 8) -> dict:
    """The replacement model of a transcoder group's sweep member ``member``: every site mlp.L of
    the group replaced at once by D(E(r * s_r)) / s (skip term included; r the replacement variant's
    own mlp_in.L, s_r and s the read and written sites' norm scales, as ``site_losses``); the
    losses of ``all_at_once_losses`` over held-out ``tokens`` [n, T]."""
    if not meta.get("reads"):
        raise ValueError(f"transcoder replacement: the group of sites {meta['sites']} reads no other site")
    arch = meta["arch"]
    ks = apply.inference_ks(meta)
    ks = None if ks is None else (ks[member],)
    T = len(meta["sites"])
    arrs = {"sae": [{k: v[:, member:member + 1] for k, v in apply.site_arrays(meta, arrays, t).items()}
                    for t in range(T)],
            "scale": [jnp.float32(meta["norm_scale"][t]) for t in range(T)],
            "read_scale": [jnp.float32(meta["read_norm_scale"][t]) for t in range(T)]}

    def y_hat(t):
        def fn(a, ins):
            sae, x = a["sae"][t], (ins[0] * a["read_scale"][t])[None]  # [1, B*T, d_in]
            return apply.decode_stacked(sae, apply.encode_stacked(arch, sae, x, ks), x)[0, 0] / a["scale"][t]
        return fn

    writes = {meta["sites"][t]: ((meta["reads"][t],), y_hat(t)) for t in range(T)}
    key = (id(model), "replacement", tuple(meta["sites"]), tuple(meta["reads"]), arch, ks, policy)
    if key not in _PASSES:  # one compiled pass per group and k: the members' arrays are arguments
        _PASSES[key] = all_at_once_pass(model, writes, policy)
    return all_at_once_losses(_PASSES[key], params, arrs, tokens, batch, vocab_size(model))
