"""saejax.train.hlo: collective bytes and dot FLOPs per device per step from compiled HLO text."""
import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from saejax.train import hlo


def _mesh():
    return jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])


def _put(x, mesh, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))


def _compiled(fn, mesh, in_specs, out_specs, *args):
    sm = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    args = [_put(a, mesh, s) for a, s in zip(args, in_specs)]
    return jax.jit(sm).lower(*args).compile().as_text()


def test_psum_in_scan_counts_trip_count_times():
    mesh = _mesh()

    def f(x, w, n):
        def body(c, xb):
            return c + lax.psum(xb @ w, "data").sum(), None
        return lax.scan(body, 0.0, x[:n])[0]

    w = jnp.ones((16, 32))
    x = jnp.ones((6, 64, 16))
    one = hlo.collectives(_compiled(lambda x, w: f(x, w, 1), mesh, (P(None, "data"), P()), P(), x, w))
    four = hlo.collectives(_compiled(lambda x, w: f(x, w, 4), mesh, (P(None, "data"), P()), P(), x, w))
    # each step all-reduces the local [8, 32] f32 block: 1 KiB
    assert one["all-reduce"] == 8 * 32 * 4
    assert four["all-reduce"] == 4 * 8 * 32 * 4
    assert four["all-gather"] == 0 and four["reduce-scatter"] == 0


def test_nested_loops_multiply_and_gather_counts_operand_or_result():
    mesh = _mesh()

    def f(x):
        def inner(c, _):
            return c + lax.all_gather(x * c, "data", tiled=True).sum(), None

        def outer(c, _):
            return lax.scan(inner, c, None, length=3)[0], None
        return lax.scan(outer, 0 * x[0, 0], None, length=2)[0]

    text = _compiled(lambda x: f(x) + 0 * x, mesh, (P("data"),), P("data"), jnp.ones((64, 8)))
    local = 8 * 8 * 4  # [64/8, 8] f32 per device
    assert hlo.collectives(text)["all-gather"] == 6 * local
    assert hlo.collectives(text, size="result")["all-gather"] == 6 * 8 * local


def test_dot_flops_with_trip_counts():
    def f(x, w):
        def body(c, xb):
            return c + (xb @ w).sum(), None
        return lax.scan(body, 0.0, x)[0]

    text = jax.jit(f).lower(jnp.ones((5, 8, 16)), jnp.ones((16, 32))).compile().as_text()
    assert hlo.flops(text) == 5 * 2 * 8 * 32 * 16
    assert hlo.collectives(text) == dict.fromkeys(hlo.KINDS, 0)


def test_conditional_takes_the_larger_branch():
    mesh = _mesh()

    def f(p, x):
        big = lambda x: lax.psum(x, "data")
        small = lambda x: lax.psum(x[:1], "data").repeat(x.shape[0], 0)
        return lax.cond(p[0] > 0, big, small, x)

    text = _compiled(f, mesh, (P(), P("data")), P("data"), jnp.ones((1,)), jnp.ones((64, 8)))
    assert hlo.collectives(text)["all-reduce"] == 8 * 8 * 4


def test_uncompiled_text_is_refused():
    with pytest.raises(ValueError, match="ENTRY"):
        hlo.collectives("module @jit_f { func.func public @main() }")
