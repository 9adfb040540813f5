"""The train step of one SAE group: every SAE of the group in one compiled update.

State (a pytree; every array with leading [T, K] axes belongs to one SAE each):
    params        the SAEGroup parameters
    opt_state     optax Adam state
    step          int32 scalar
    lam           [T, K]    each SAE's sweep value (before its warmup factor): the coefficient of
                            its sparsity term (jumprelu lambda, relu l1_coeff; topk and batchtopk
                            keep their k here, which their losses do not read)
    l0_ema        [T, K]    running L0 (for logs)
    since_fired   [T, K, M] steps since each latent last fired (dead-latent counters)
    bt_threshold  [T, K]    BatchTopK's global inference threshold (running mean of the batch minimum)
    frozen        [T, K]    SAEs masked out after going non-finite, and the idle slots
                            (GroupSpec.pad) from the start: they compute, but never change

Loss of SAE (t, k), averaged over the batch (the group's total is the sum, so each SAE's gradient
is exactly its own): mse + sparsity + aux, the terms its kind gives (``Kind.loss``, saejax.sae.kinds):
    jumprelu   ||x - x_hat||^2 + lam * ||f||_0          (pseudo-derivatives for theta)
               with target L0s t: ||x - x_hat||^2 + lam * t * (||f||_0 / t - 1)^2
    relu       ||x - x_hat||^2 + lam * sum_i f_i ||W_dec_i||   (Anthropic, April 2024)
    topk       ||x - x_hat||^2 + auxk_coeff * ||e - e_hat_dead||^2   (Gao et al. AuxK)
With Matryoshka prefixes (spec.matryoshka) ||x - x_hat||^2 is the sum over the prefixes of each
one's error (saejax.sae.matryoshka); the logged mse and fvu stay the full dictionary's.

Why the step is laid out as it is (site and member scans, a ``lax.cond`` per SAE): docs/training.md,
XLA:CPU notes.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from saejax.sae import sharded
from saejax.sae.group import GroupSpec, init_params
from saejax.train import optim


def init_state(spec: GroupSpec, hp: optim.Hyper, key, lam=None) -> dict:
    """Fresh state; ``lam`` [K] overrides the per-member sweep values."""
    params = init_params(spec, key)
    lam = jnp.asarray(spec.sweep if lam is None else lam, jnp.float32)
    TK = (spec.T, spec.K)
    return {
        "params": params,
        "opt_state": optim.optimizer(hp).init(params),
        "step": jnp.zeros((), jnp.int32),
        "lam": jnp.broadcast_to(lam, TK).astype(jnp.float32),
        "l0_ema": jnp.zeros(TK, jnp.float32),
        "since_fired": jnp.zeros(TK + (spec.width,), jnp.int32),
        "bt_threshold": jnp.zeros(TK, jnp.float32),
        "frozen": jnp.zeros(TK, bool).at[spec.n_sites:].set(True),  # idle slots: frozen from the start
    }


def _mask_frozen(frozen, new, old):
    """Keep ``old`` wherever the SAE is frozen, for every leaf with leading [T, K] axes."""
    def one(n, o):
        if n.ndim >= 2 and n.shape[:2] == frozen.shape:
            return jnp.where(frozen.reshape(frozen.shape + (1,) * (n.ndim - 2)), o, n)
        return n
    return jax.tree_util.tree_map(one, new, old)


def losses(spec: GroupSpec, hp: optim.Hyper, params, state, x, y=None):
    """Per-SAE loss terms and diagnostics for x [T, B, d] and its target y [T, B, d_out] (normalized;
    None: x itself, an SAE). Returns (total, aux)."""
    lam = state["lam"] * optim.sparsity_scale(hp, state["step"])
    terms = spec.kind.loss(spec, hp, params, state, x, x if y is None else y, lam)
    per_sae = terms["recon"] + terms["sparsity"] + terms["aux"]
    total = jnp.sum(jnp.where(state["frozen"], 0.0, per_sae))
    out = {
        "loss": per_sae,
        "mse": terms["mse"],
        "sparsity_loss": terms["sparsity"],
        "aux_loss": terms["aux"],
        "fvu": terms["fvu"],
        "l0": terms["l0"],
        "fired": terms["fired"],  # [T, K, M]
        "min_active": terms["min_active"],  # [T, K]: BatchTopK's inference threshold follows it (else inf)
        "lam": lam,
    }
    return total, out


def stack_shards() -> int:
    """How many devices the ``stack`` axis of the current mesh has (1 without a mesh)."""
    return sharded.axis_sizes(sharded.current_mesh(), "stack")[0]


def map_sites(fn, spec: GroupSpec, *trees):
    """``fn(sub_spec, *blocks)`` for one site per stack shard at a time, in a ``lax.scan``.

    Every leaf of ``trees`` has the T sites as its leading axis, laid out in S contiguous blocks
    over the mesh's ``stack`` axis. The scan's step j hands ``fn`` site j of every block (a
    [S, ...] slice, still one site per stack shard) and a spec of S sites, and the leaves of fn's
    result, each with S leading, are put back in site order (``sub``: ``spec.slots(S)``, whose
    site names do not matter; only its shapes do). So the [T, K, B, M] pre-activations
    of a step never exist at once, only those of the site each device works on.
    """
    S = stack_shards()
    T = spec.T
    if T == S:
        return fn(spec, *trees)
    n = T // S
    sub = spec.slots(S)
    split = lambda a: jnp.swapaxes(a.reshape((S, n) + a.shape[1:]), 0, 1)  # [T, ...] -> [n, S, ...]  # noqa: E731
    merge = lambda a: jnp.swapaxes(a, 0, 1).reshape((T,) + a.shape[2:])  # noqa: E731
    _, out = lax.scan(lambda _, blocks: (None, fn(sub, *blocks)), None,
                      jax.tree_util.tree_map(split, trees))
    return jax.tree_util.tree_map(merge, out)


def scan_saes(fn, spec: GroupSpec, carry, per_sae, per_site):
    """``fn(k, one, carry_k, per_sae_k, per_site_k) -> (new carry_k, out)`` for every SAE of the group,
    one SAE per stack shard at a time, each new carry slice written back into ``carry``.

    Leaves of ``carry`` and ``per_sae`` have leading [T, K] axes, those of ``per_site`` [T]; a scalar
    leaf of ``carry`` is shared by all SAEs (an optimizer's step count): every call gets its value
    on entry and must return the same new value, which is kept. The T sites lie in S contiguous
    blocks over the mesh's ``stack`` axis. ``fn`` gets member k of site j of every block: [S, 1, ...]
    slices (per_site: [S, ...]) and ``one``, the spec of those S sites with member k alone. The outs,
    [S, 1, ...] each, come back as [T, K, ...].

    With several sites per stack shard this is a ``lax.scan`` over them per member, with the state
    as the carry: a donated state is then updated in place, and a step holds no [T, K, d, M] buffer
    besides it, nor the activations of more than the SAE in flight (docs/training.md, stacked).
    """
    S, T, K = stack_shards(), spec.T, spec.K
    n = T // S
    sub = spec.slots(S)
    members = [dataclasses.replace(sub, sweep=(s,)) for s in spec.sweep]
    member = lambda a, k: a[:, k:k + 1] if a.ndim else a  # noqa: E731
    if n == 1:  # one site per stack shard: no scan; the members' new slices are joined
        news, outs = zip(*(fn(k, members[k], *jax.tree_util.tree_map(lambda a: member(a, k), (carry, per_sae)),
                              per_site) for k in range(K)))
        join = lambda *v: jnp.concatenate(v, axis=1) if v[0].ndim else v[0]  # noqa: E731
        return jax.tree_util.tree_map(join, *news), jax.tree_util.tree_map(join, *outs)

    # Leaves [T, ...] -> [S, n, ...]: site j of every stack shard is [:, j]. One scan over the sites
    # per member, each scan step reading and writing the carry once (docs/training.md, XLA:CPU notes).
    take = lambda a, j: lax.dynamic_index_in_dim(a, j, axis=1, keepdims=False)  # noqa: E731
    c, per_sae, per_site = jax.tree_util.tree_map(
        lambda a: a.reshape((S, n) + a.shape[1:]) if a.ndim else a, (carry, per_sae, per_site))
    outs = []
    for k in range(K):
        def body(c, j, k=k):
            ck = jax.tree_util.tree_map(lambda a, a0: member(take(a, j), k) if a.ndim else a0, c, carry)
            new, out = fn(k, members[k], ck, jax.tree_util.tree_map(lambda a: member(take(a, j), k), per_sae),
                          jax.tree_util.tree_map(lambda a: take(a, j), per_site))
            put = lambda a, v: lax.dynamic_update_slice(a, v[:, None], (0, j, k) + (0,) * (a.ndim - 3))  # noqa: E731
            return jax.tree_util.tree_map(lambda a, v: put(a, v) if a.ndim else v, c, new), out

        c, out = lax.scan(body, c, jnp.arange(n))
        outs.append(out)  # [n, S, 1, ...]
    c = jax.tree_util.tree_map(lambda a: a.reshape((T,) + a.shape[2:]) if a.ndim else a, c)
    return c, jax.tree_util.tree_map(lambda *o: jnp.swapaxes(jnp.concatenate(o, axis=2), 0, 1).reshape(
        (T, K) + o[0].shape[3:]), *outs)


def sae_update(spec: GroupSpec, hp: optim.Hyper, tx, params, opt_state, st, x, y=None):
    """One optimizer step of the SAEs in ``params`` (slices of a group) on x [T, B, d] with target y
    (None: x): the
    gradient of their summed loss (each SAE's loss depends on its own parameters only), Adam, the
    decoder constraints, the kind's constraint and the frozen mask. Returns (params, opt_state,
    per-SAE diagnostics)."""
    g, out = jax.grad(lambda q: losses(spec, hp, q, st, x, y), has_aux=True)(params)
    if spec.kind.unit_decoder:
        g = dict(g, W_dec=optim.remove_parallel_grad(g["W_dec"], params["W_dec"]))
    updates, new_opt = tx.update(g, opt_state, params)
    new = jax.tree_util.tree_map(jnp.add, params, updates)
    if spec.kind.unit_decoder:
        new = dict(new, W_dec=optim.unit_rows(new["W_dec"]))
    new = spec.kind.constrain(spec, spec.kind.revive(spec, hp, new, st, x))
    return _mask_frozen(st["frozen"], new, params), _mask_frozen(st["frozen"], new_opt, opt_state), out


def data_b_dec(hp: optim.Hyper, params, x):
    """``params`` with b_dec [T, K, d] set from the rows x [T, B, d] b_dec reconstructs (a transcoder's
    targets) (``hp.b_dec_init``): each site's mean, or its geometric median (Weiszfeld's iteration from
    the mean, 20 steps)."""
    m = jnp.mean(x, 1)
    if hp.b_dec_init == "median":
        def weiszfeld(m, _):
            w = 1.0 / jnp.maximum(jnp.linalg.norm(x - m[:, None], axis=-1), 1e-6)  # [T, B]
            return jnp.sum(w[..., None] * x, 1) / jnp.sum(w, 1)[:, None], None
        m = lax.scan(weiszfeld, m, None, length=20)[0]
    return dict(params, b_dec=jnp.broadcast_to(m[:, None], params["b_dec"].shape).astype(params["b_dec"].dtype))


def make_train_step(spec: GroupSpec, hp: optim.Hyper):
    """``step_fn(state, x, y=None) -> (state, metrics)``: x [T, B, d] the rows, y [T, B, d_out] their
    target (a transcoder's; None: x itself); jit it (with shardings) at the call site."""
    tx = optim.optimizer(hp)
    schedule = optim.lr_schedule(hp)

    def step_fn(state, x, y=None):
        params = state["params"]
        if spec.kind.calibrates(spec):
            params = lax.cond(state["step"] == 0, lambda p: map_sites(spec.kind.calibrate, spec, p, x),
                              lambda p: p, params)
        if hp.b_dec_init != "zero":
            params = lax.cond(state["step"] == 0, lambda p: data_b_dec(hp, p, x if y is None else y), lambda p: p, params)
        per_sae = {k: state[k] for k in ("lam", "since_fired", "bt_threshold", "frozen")}
        # The optimizer's scalar leaves (its step counts) are shared by all SAEs: their next values,
        # from an update of no parameters, for the SAEs that skip theirs.
        none = lambda a: a[:, :0] if a.ndim else a  # noqa: E731
        _, opt_next = tx.update(*jax.tree_util.tree_map(none, (params, state["opt_state"], params)))

        def one_sae(k, one, carry, st, xs):
            """SAE k of the sites in flight, with its own spec (TopK's k) and target L0. Frozen SAEs
            are not computed at all (NaN metrics). The branch also keeps the state's update in place
            (docs/training.md, XLA:CPU notes)."""
            hp_k = dataclasses.replace(hp, target_l0=(hp.target_l0[k],)) if hp.target_l0 else hp
            st = dict(st, step=state["step"])

            def train(c):
                p, o, out = sae_update(one, hp_k, tx, *c, st, *xs) if y is not None else \
                    sae_update(one, hp_k, tx, *c, st, xs)
                return (p, o), out

            def skip(c):
                out = jax.eval_shape(train, c)[1]
                o = jax.tree_util.tree_map(lambda a, n: a if a.ndim else n, c[1], opt_next)
                return (c[0], o), jax.tree_util.tree_map(
                    lambda s: jnp.full(s.shape, jnp.nan if jnp.issubdtype(s.dtype, jnp.floating) else 0, s.dtype), out)

            if spec.K == 1 and spec.T == stack_shards():  # the slices are the whole state
                return train(carry)
            return lax.cond(jnp.all(st["frozen"]), skip, train, carry)

        (new_params, opt_state), out = scan_saes(one_sae, spec, (params, state["opt_state"]), per_sae,
                                                 x if y is None else (x, y))
        frozen = state["frozen"]

        step = state["step"]
        l0_ema = jnp.where(step == 0, out["l0"], 0.99 * state["l0_ema"] + 0.01 * out["l0"])
        bt = jnp.where(jnp.isfinite(out["min_active"]), out["min_active"], state["bt_threshold"])
        bt_threshold = jnp.where(step == 0, bt, 0.99 * state["bt_threshold"] + 0.01 * bt)
        new_state = {
            "params": new_params,
            "opt_state": opt_state,
            "step": step + 1,
            "lam": state["lam"],
            "l0_ema": l0_ema,
            "since_fired": jnp.where(out["fired"], 0, state["since_fired"] + 1),
            "bt_threshold": bt_threshold,
            "frozen": frozen,
        }
        metrics = {k: out[k] for k in ("loss", "mse", "sparsity_loss", "aux_loss", "fvu", "l0", "lam")}
        metrics["dead_frac"] = jnp.mean((new_state["since_fired"] >= hp.dead_steps).astype(jnp.float32), -1)
        metrics["lr"] = schedule(step)
        return new_state, metrics

    return step_fn
