"""The train step of a cross-layer transcoder (saejax.sae.clt) and its Trainer.

``CLTTrainer`` has the interface of ``train.trainer.Trainer``, so ``train.loop.train_group`` trains
a CLT with the same logging, checkpoints (orbax, bitwise resume), preemption and non-finite checks
as every group. The batch is the 2L aligned sites of the CLT, inputs then outputs,
x [2L, B, d] = (mlp_in.l for l in layers) + (mlp.l for l in layers), each normalized by its own
site's scale; it is laid out ``P(None, "data", None)``.

State (per-layer arrays [L, 1] so that the loop's per-SAE logging sees one "SAE" per output layer):
    params, opt_state (Adam, optim.optimizer), step
    lam [L, 1]           the sweep value (jumprelu lambda; topk/batchtopk k, unread)
    l0_ema [L, 1], since_fired [L, M], bt_threshold [L] (BatchTopK inference), frozen [L, 1]
A CLT is one dictionary: it trains or freezes as a whole (frozen is all-or-nothing).

Mesh: latents of every layer over ``latent`` (W_enc's M, each W_dec[l]'s rows, b_enc, thresholds),
rows over ``data``; ``stack`` must be 1 (there is one dictionary, nothing to stack).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from saejax import mesh as meshlib
from saejax.sae import clt
from saejax.train import optim

PARTITION_RULES = [
    (r"(^|/)W_enc$", P(None, None, "latent")),
    (r"(^|/)W_dec/\d+$", P("latent", None, None)),
    (r"(^|/)(b_enc|log_threshold|since_fired)$", P(None, "latent")),
]


def init_state(spec: clt.CLTSpec, hp: optim.Hyper, key) -> dict:
    params = clt.init_params(spec, key)
    L1 = (spec.L, 1)
    return {
        "params": params,
        "opt_state": optim.optimizer(hp).init(params),
        "step": jnp.zeros((), jnp.int32),
        "lam": jnp.full(L1, spec.sparsity, jnp.float32),
        "l0_ema": jnp.zeros(L1, jnp.float32),
        "since_fired": jnp.zeros((spec.L, spec.width), jnp.int32),
        "bt_threshold": jnp.zeros((spec.L,), jnp.float32),
        "frozen": jnp.zeros(L1, bool),
    }


def split(spec: clt.CLTSpec, xy):
    """[2L, B, d] -> (x [L, B, d_in], y [L, B, d_out])."""
    return xy[:spec.L], xy[spec.L:]


def make_train_step(spec: clt.CLTSpec, hp: optim.Hyper, mesh=None):
    """``step_fn(state, xy) -> (state, metrics)``: the gradient of the CLT loss, its decoder
    constraint, Adam; per-layer metrics [L, 1]. ``mesh``: the loss and its gradient run shard by
    shard on it (``clt.loss_and_grad``)."""
    tx = optim.optimizer(hp)
    schedule = optim.lr_schedule(hp)

    def update(state, x, y, lam):
        params = state["params"]
        (_, terms), g = clt.loss_and_grad(spec, params, x, y, lam, mesh)
        g = dict(g, W_dec=clt.project_grad(g["W_dec"], params["W_dec"]))
        updates, opt = tx.update(g, state["opt_state"], params)
        new = jax.tree_util.tree_map(jnp.add, params, updates)
        return dict(new, W_dec=clt.unit_concat(new["W_dec"])), opt, terms

    def step_fn(state, xy):
        x, y = split(spec, xy)
        lam = state["lam"][0, 0] * optim.sparsity_scale(hp, state["step"])
        frozen = jnp.any(state["frozen"])

        def skip(_):
            out = jax.eval_shape(lambda: update(state, x, y, lam))
            nan = jax.tree_util.tree_map(
                lambda s: jnp.full(s.shape, jnp.nan if jnp.issubdtype(s.dtype, jnp.floating) else 0, s.dtype),
                out[2])
            _, opt = tx.update(jax.tree_util.tree_map(jnp.zeros_like, state["params"]), state["opt_state"],
                               state["params"])
            keep = jax.tree_util.tree_map(lambda o, n: n if not o.ndim else o, state["opt_state"], opt)
            return state["params"], keep, nan

        params, opt, terms = lax.cond(frozen, skip, lambda _: update(state, x, y, lam), None)
        step = state["step"]
        col = lambda a: jnp.asarray(a)[:, None]  # noqa: E731
        l0 = col(terms["l0"])
        bt = jnp.where(jnp.isfinite(terms["min_active"]), terms["min_active"], state["bt_threshold"])
        since = jnp.where(terms["fired"], 0, state["since_fired"] + 1)
        new_state = {
            "params": params, "opt_state": opt, "step": step + 1, "lam": state["lam"],
            "l0_ema": jnp.where(step == 0, l0, 0.99 * state["l0_ema"] + 0.01 * l0),
            "since_fired": since,
            "bt_threshold": jnp.where(step == 0, bt, 0.99 * state["bt_threshold"] + 0.01 * bt),
            "frozen": state["frozen"],
        }
        metrics = {
            "loss": col(terms["mse"] + terms["sparsity_loss"]), "mse": col(terms["mse"]),
            "sparsity_loss": col(terms["sparsity_loss"]), "aux_loss": jnp.zeros_like(l0), "fvu": col(terms["fvu"]),
            "l0": l0, "lam": jnp.broadcast_to(lam, l0.shape), "overflow": col(terms["overflow"]),
            "dead_frac": col(jnp.mean((since >= hp.dead_steps).astype(jnp.float32), -1)),
            "lr": schedule(step),
        }
        return new_state, metrics

    return step_fn


def heldout(spec: clt.CLTSpec, params, bt_threshold, xy) -> dict:
    """Per-layer FVU and L0 [L, 1] at inference (BatchTopK: its running thresholds), dense decoding."""
    x, y = split(spec, xy)
    out = clt.forward(spec, params, x, train=False, bt_threshold=bt_threshold, sparse=False)
    mse = jnp.mean(jnp.sum(jnp.square(out["y_hat"] - y), -1), -1)
    return {"heldout_fvu": (mse / clt.variance(y))[:, None], "heldout_l0": jnp.mean(out["l0"], -1)[:, None]}


class CLTTrainer:
    """A CLT's compiled step on a mesh, with ``train.trainer.Trainer``'s interface (``train_group``)."""

    def __init__(self, spec: clt.CLTSpec, hp: optim.Hyper, mesh, seed: int = 0):
        if mesh.shape.get("stack", 1) != 1:
            raise meshlib.MeshError(f"mesh.stack={mesh.shape['stack']}: a CLT is one dictionary; "
                                    f"use data and latent only")
        self.spec, self.hp, self.mesh, self.seed = spec, hp, mesh, seed
        self.abstract = jax.eval_shape(lambda k: init_state(spec, hp, k), jax.random.key(0))
        self.state_shardings = meshlib.tree_shardings(self.abstract, PARTITION_RULES, mesh)
        self.x_sharding = NamedSharding(mesh, P(None, "data", None))
        self.x_shape = (2 * spec.L, hp.batch_size, spec.d_in)
        replicated = NamedSharding(mesh, P())
        self.init = jax.jit(lambda k: init_state(spec, hp, k), out_shardings=self.state_shardings)
        self.step = jax.jit(make_train_step(spec, hp, mesh), in_shardings=(self.state_shardings, self.x_sharding),
                            out_shardings=(self.state_shardings, replicated), donate_argnums=0)
        self.heldout_metrics = jax.jit(
            lambda st, xy: heldout(spec, st["params"], st["bt_threshold"], xy),
            in_shardings=(self.state_shardings, self.x_sharding), out_shardings=replicated)
        self.finite = jax.jit(lambda p: jnp.broadcast_to(jnp.all(jnp.stack(
            [jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(p)])), (spec.L, 1)),
            out_shardings=replicated)
        self.replicate = jax.jit(lambda a: a, out_shardings=replicated)
        idx = self.x_sharding.addressable_devices_indices_map(self.x_shape).values()
        B = hp.batch_size
        b0, b1 = min(i[1].start or 0 for i in idx), max(i[1].stop or B for i in idx)
        self.rows = (b0 // (b1 - b0), B // (b1 - b0))
        self.serialize = mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"

    @property
    def data_sites(self) -> list[str]:
        return list(self.spec.in_sites + self.spec.sites)

    def init_state(self):
        return self.init(jax.random.key(self.seed))

    def norm_scales(self, source) -> np.ndarray:
        """What train_group passes back to local_batch: ``scales``."""
        return self.scales(source)

    def scales(self, source) -> np.ndarray:
        """[2L, 1, 1]: each input and output site's own norm scale."""
        return np.asarray([source.norm_scale(s) for s in self.data_sites], np.float32)[:, None, None]

    def local_batch(self, source, step: int, scales=None) -> np.ndarray:
        """This process's rows of ``step``, [2L, B_local, d], each site normalized by its own scale
        (``scales``, the loop's per-output-site scales, is not used)."""
        part, parts = self.rows
        return source.batch(self.data_sites, step, self.hp.batch_size, part, parts) * self.scales(source)

    def local_heldout(self, source, scales=None):
        fn = getattr(source, "heldout_batch", None)
        x = None if fn is None else fn(self.data_sites, self.hp.batch_size, *self.rows)
        return None if x is None else x * self.scales(source)

    def put_batch(self, x_local: np.ndarray):
        return jax.make_array_from_process_local_data(self.x_sharding, x_local, self.x_shape)


def plan_clt(config, source) -> tuple[clt.CLTSpec, optim.Hyper]:
    """The CLT and its optimizer settings from ``config.clt`` and ``config.train`` (the same keys as
    every group: tokens, batch, lr and schedules). ``clt.layers`` () means every layer whose mlp_in and
    mlp sites the source has. A layer whose site the source lacks, or sites whose rows are not aligned
    (a store without harvest.pairs joining them), is a one-line error."""
    import math

    from saejax import config as cfg
    from saejax.sae import matryoshka as mat
    c, t = config.clt, config.train
    have = set(source.sites)
    layers = tuple(c.layers) or tuple(sorted(
        int(s.split(".")[1]) for s in have if s.startswith("mlp_in.") and f"mlp.{s.split('.')[1]}" in have))
    if not layers:
        raise cfg.ConfigError("config key 'clt.enabled': the training source has no mlp_in.l and mlp.l sites "
                              "(harvest.kinds needs mlp_in and mlp)")
    sites = [f"{k}.{l}" for l in layers for k in ("mlp_in", "mlp")]
    for site in sites:
        if site not in have:
            raise cfg.ConfigError(f"config key 'clt.layers': site {site} is not in the training source "
                                  f"(harvest mlp_in and mlp of every CLT layer, joined by harvest.pairs)")
    keys = getattr(source, "align_key", None)
    if keys is not None and len({keys[s] for s in sites}) > 1:
        loose = next(s for s in sites if keys[s] != keys[sites[0]])
        raise cfg.ConfigError(f"config key 'harvest.pairs': the store's rows of {loose} are not aligned with "
                              f"{sites[0]}'s; a CLT needs its {len(sites)} sites joined by pairs "
                              f"(experiments/smollm2_clt.py: clt_pairs)")
    d_in, d_out = source.width(f"mlp_in.{layers[0]}"), source.width(f"mlp.{layers[0]}")
    spec = clt.CLTSpec(arch=c.arch, layers=layers, d_in=d_in, d_out=d_out, width=c.width,
                       sparsity=float(c.sparsity), cap=c.cap, decode=c.decode,
                       threshold_init=config.sae.threshold_init, bandwidth=config.sae.bandwidth,
                       precision=t.matmul_precision, matryoshka=mat.resolve(c.matryoshka, c.width))
    total = max(1, math.ceil(t.tokens / t.batch_size))
    hp = optim.Hyper(total_steps=total, batch_size=t.batch_size, lr=t.lr, b1=t.b1, b2=t.b2, eps=t.eps,
                     lr_warmup=cfg.schedule_steps(t.lr_warmup, total), lr_warmup_start=t.lr_warmup_start,
                     lr_decay=t.lr_decay, lr_decay_end=t.lr_decay_end,
                     sparsity_warmup=cfg.schedule_steps(t.sparsity_warmup, total),
                     dead_steps=max(1, math.ceil(t.dead_tokens / t.batch_size)))
    return spec, hp


def clt_pairs(layers) -> list[tuple[str, str]]:
    """harvest.pairs that join mlp_in.l and mlp.l of every layer into one aligned group."""
    layers = list(layers)
    return [(f"mlp_in.{l}", f"mlp.{l}") for l in layers] + [(f"mlp_in.{layers[0]}", f"mlp_in.{l}") for l in layers[1:]]


def state_bytes(spec: clt.CLTSpec, hp: optim.Hyper, mesh) -> dict:
    """Per-device bytes of the CLT's step from shapes and shardings (``mesh`` may be an AbstractMesh):
    the state (params, optimizer, counters) and one step's activations, estimated as 7 live [L, B, M]
    fp32 buffers (pre, f, the sparse score, masks and pseudo-derivative products, their cotangents),
    the batch [2L, B, d], y_hat and its cotangent [L, B, d_out] (n of each with n Matryoshka prefixes), the gradient and Adam temporaries
    (3 x the parameters: the CLT is one dictionary, its whole gradient is live at once) and, with
    sparse decoding, a forward and a backward row block's gathers (2 x ``block_bytes``). What the
    planner and the job's memory peak use (saejax.train.cost)."""
    a = jax.eval_shape(lambda k: init_state(spec, hp, k), jax.random.key(0))
    sh = meshlib.tree_shardings(a, PARTITION_RULES, mesh)

    def total(tree, shardings):
        return sum(meshlib.shard_bytes(x.shape, x.dtype, s) for x, s in
                   zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)))
    out = {"params": total(a["params"], sh["params"]), "optimizer": total(a["opt_state"], sh["opt_state"]),
           "counters": sum(total(a[k], sh[k]) for k in a if k not in ("params", "opt_state"))}
    L, B, f32 = spec.L, hp.batch_size, np.float32
    rows = NamedSharding(mesh, P(None, "data", None))
    out["activations"] = (7 * meshlib.shard_bytes((L, B, spec.width), f32, NamedSharding(mesh, P(None, "data", "latent")))
                          + meshlib.shard_bytes((2 * L, B, spec.d_in), f32, rows)
                          + 2 * max(1, len(spec.matryoshka)) * meshlib.shard_bytes((L, B, spec.d_out), f32, rows)
                          + 3 * out["params"] + (2 * spec.block_bytes if spec.sparse else 0))
    return out


def save_final(final: str, spec: clt.CLTSpec, hp: optim.Hyper, source, state) -> None:
    """The trained CLT's folder (saejax.sae.clt_io), written by process 0."""
    from saejax.sae import clt_io
    from saejax.train.trainer import gather
    host = gather({k: v for k, v in state.items() if k != "opt_state"})
    if jax.process_index() == 0:
        steps = int(host["step"])
        clt_io.save(final, spec, host["params"], host["bt_threshold"],
                    [source.norm_scale(s) for s in spec.in_sites], [source.norm_scale(s) for s in spec.sites],
                    model=getattr(source, "model", ""), steps=steps, tokens=steps * hp.batch_size,
                    batch_size=hp.batch_size, l0_ema=np.asarray(host["l0_ema"])[:, 0].tolist(),
                    **({"matryoshka": list(spec.matryoshka)} if spec.matryoshka else {}))
