"""The Trainer: one group's compiled train step on a mesh, its shardings, and the rows it feeds."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from saejax import mesh as meshlib
from saejax.sae import sharded
from saejax.sae.group import PARTITION_RULES, GroupSpec, SAEGroup
from saejax.train import optim
from saejax.train.plan import state_memory
from saejax.sae.forward import recon_metrics
from saejax.train.step import init_state, make_train_step, map_sites


class Trainer:
    """Trains one group on a mesh: the compiled step with shardings derived from partition rules.

    State shardings come from ``PARTITION_RULES`` (SAEs over ``stack``, latents over ``latent``);
    the batch x [T, B, d] is laid out ``P("stack", "data", None)``. The step is traced under
    ``sharded.use_mesh`` so that top-k thresholds are computed shard by shard.

    A batch is x for an SAE group, and the pair (x, y) for a transcoder group (x the rows of its
    ``reads``, y of its ``sites``, both laid out as x is); ``norm_scales`` likewise. The batch has
    a row block per slot (``spec.T``): the idle slots' (``spec.pad``) are zeros, their scales 1.
    """

    def __init__(self, spec: GroupSpec, hp: optim.Hyper, mesh, seed: int = 0):
        self.spec, self.hp, self.mesh, self.seed = spec, hp, mesh, seed
        self.abstract = jax.eval_shape(lambda k: init_state(spec, hp, k), jax.random.key(0))
        self.state_shardings = meshlib.tree_shardings(self.abstract, PARTITION_RULES, mesh)
        self.x_sharding = NamedSharding(mesh, P("stack", "data", None))
        self.x_shape = (spec.T, hp.batch_size, spec.d)
        self.y_shape = (spec.T, hp.batch_size, spec.dout)
        replicated = NamedSharding(mesh, P())
        step_fn = make_train_step(spec, hp)

        def traced_step(state, x):
            with sharded.use_mesh(mesh):
                return step_fn(state, *x) if spec.transcoder else step_fn(state, x)

        self.init = jax.jit(lambda k: init_state(spec, hp, k), out_shardings=self.state_shardings)
        self.step = jax.jit(traced_step, in_shardings=(self.state_shardings, self.x_sharding),
                            out_shardings=(self.state_shardings, replicated), donate_argnums=0)
        self.finite = jax.jit(_finite_per_sae, out_shardings=replicated)

        def heldout_metrics(state, x):
            """Per-SAE L0 and FVU on a fixed held-out batch, inference mode (BatchTopK: its threshold)."""
            def one(sub, p, bt, xs):
                xs, ys = xs if spec.transcoder else (xs, xs)
                _, f, x_hat = SAEGroup(sub).apply({"params": p}, xs, bt, False)
                _, fvu, l0 = recon_metrics(ys, f, x_hat)
                return {"heldout_fvu": fvu, "heldout_l0": l0}

            with sharded.use_mesh(mesh):
                return map_sites(one, spec, state["params"], state["bt_threshold"], x)

        self.heldout_metrics = jax.jit(heldout_metrics, in_shardings=(self.state_shardings, self.x_sharding),
                                       out_shardings=replicated)
        self.replicate = jax.jit(lambda a: a, out_shardings=replicated)
        self.site_range, self.rows = self._local_block()
        # XLA:CPU with several devices: one step at a time (docs/training.md, "Several processes").
        self.serialize = mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"

    def _local_block(self):
        """This process's block of the global batch: ((t0, t1) its sites, (part index, parts) of the rows)."""
        idx = self.x_sharding.addressable_devices_indices_map(self.x_shape).values()
        T, B, _ = self.x_shape
        t0, t1 = min(i[0].start or 0 for i in idx), max(i[0].stop or T for i in idx)
        b0, b1 = min(i[1].start or 0 for i in idx), max(i[1].stop or B for i in idx)
        n = b1 - b0
        assert B % n == 0 and b0 % n == 0, (b0, b1, B)
        return (t0, t1), (b0 // n, B // n)

    def init_state(self):
        return self.init(jax.random.key(self.seed))

    def norm_scales(self, source):
        """``norm_scales`` of the group's slots: [T, 1, 1] (an idle slot's: 1); a transcoder's
        (input, output) pair."""
        pad = lambda a: np.concatenate([a, np.ones((self.spec.pad, 1, 1), a.dtype)])  # noqa: E731
        if self.spec.transcoder:
            return pad(norm_scales(source, self.spec.reads)), pad(norm_scales(source, self.spec.sites))
        return pad(norm_scales(source, self.spec.sites))

    def _rows(self, fn, scales, *args):
        """fn(sites, *args) of this process's slots, normalized: the real sites' rows, then zero rows
        for its idle slots; (x, y) for a transcoder; None if fn gives None."""
        (t0, t1), (part, parts) = self.site_range, self.rows
        n = self.spec.n_sites
        pairs = zip((self.spec.reads, self.spec.sites), scales) if self.spec.transcoder else [(self.spec.sites, scales)]
        out = []
        for sites, s in pairs:
            # A block of idle slots only still asks for one real site: whether fn has rows, and their shape.
            x = fn(list(sites[t0:min(t1, n)] or sites[:1]), *args, self.hp.batch_size, part, parts)
            if x is None:
                return None
            x = x[:max(0, min(t1, n) - t0)]
            if t1 > max(t0, n):
                x = np.concatenate([x, np.zeros((t1 - max(t0, n),) + x.shape[1:], x.dtype)])
            out.append(x * s[t0:t1])
        return tuple(out) if self.spec.transcoder else out[0]

    def local_batch(self, source, step: int, scales):
        """This process's normalized rows of ``step``: [T_local, B_local, d] (a transcoder's: the
        aligned pair x [T_local, B_local, d], y [T_local, B_local, d_out])."""
        return self._rows(source.batch, scales, step)

    def local_heldout(self, source, scales):
        """This process's normalized held-out rows (one batch, fixed), or None without a held-out split."""
        fn = getattr(source, "heldout_batch", None)
        return None if fn is None else self._rows(fn, scales)

    def put_batch(self, x_local):
        """This process's rows [T_local, B_local, d] -> a global mesh-sharded array [T, B, d] (a pair
        of them for a transcoder)."""
        if self.spec.transcoder:
            return tuple(jax.make_array_from_process_local_data(self.x_sharding, a, shape)
                         for a, shape in zip(x_local, (self.x_shape, self.y_shape)))
        return jax.make_array_from_process_local_data(self.x_sharding, x_local, self.x_shape)

    def memory(self) -> dict:
        """``state_memory`` of this group and mesh, plus XLA's own temp-buffer figure for the
        compiled step when the backend reports it."""
        out = state_memory(self.spec, self.hp, self.mesh)
        try:
            a, sh = self.abstract, self.state_shardings
            x = jax.ShapeDtypeStruct(self.x_shape, np.float32, sharding=self.x_sharding)
            if self.spec.transcoder:
                x = (x, jax.ShapeDtypeStruct(self.y_shape, np.float32, sharding=self.x_sharding))
            st = jax.tree_util.tree_map(lambda v, h: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=h), a, sh)
            ma = self.step.lower(st, x).compile().memory_analysis()
            out["compiled_temp"] = int(ma.temp_size_in_bytes)
        except Exception:  # noqa: BLE001 - not every backend reports memory
            pass
        return out


def _finite_per_sae(params):
    """[T, K] bool: every parameter of SAE (t, k) is finite."""
    ok = None
    for leaf in jax.tree_util.tree_leaves(params):
        f = jnp.all(jnp.isfinite(leaf).reshape(leaf.shape[:2] + (-1,)), axis=-1)
        ok = f if ok is None else ok & f
    return ok


def to_host(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(jax.device_get(a)), tree)


def norm_scales(source, sites) -> np.ndarray:
    """[T, 1, 1] float32: the norm scale of each site (raw rows times it have E||x||^2 = 1)."""
    return np.asarray([source.norm_scale(s) for s in sites], np.float32)[:, None, None]


def gather(tree):
    """A pytree of (possibly multi-process) global arrays as host numpy arrays, on every process."""
    if jax.process_count() == 1:
        return to_host(tree)
    from jax.experimental import multihost_utils
    return to_host(multihost_utils.process_allgather(tree, tiled=True))
