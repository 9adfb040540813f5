"""train.matmul_dtype: bfloat16 matmul inputs, float32 accumulation, float32 state (docs/training.md)."""
import dataclasses
import re

import jax
import numpy as np
import pytest

from saejax import config as cfg
from saejax.data.synthetic import SyntheticSource
from saejax.sae.group import GroupSpec
from saejax.train import optim
from saejax.train.step import init_state, make_train_step

SITES = ("res.0", "res.1")


def _setup(arch, dtype):
    sweep = (8.0,) if arch == "topk" else (0.003,)
    spec = GroupSpec(arch=arch, sites=SITES, d=32, width=128, sweep=sweep, auxk_k=16, matmul_dtype=dtype)
    hp = optim.Hyper(total_steps=60, batch_size=256, lr=1e-3, lr_warmup=5, sparsity_warmup=20, dead_steps=20)
    return spec, hp


def _dots(text):
    """(lhs, rhs, result) element types of every dot_general in StableHLO text."""
    return re.findall(r"stablehlo\.dot_general.*: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\) -> tensor<[^>]*x(\w+)>",
                      text)


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_bf16_matmuls_accumulate_in_f32_and_state_stays_f32(arch):
    out = {}
    for dtype in ("float32", "bfloat16"):
        spec, hp = _setup(arch, dtype)
        src = SyntheticSource(SITES, d=32, n_features=128, active=4, seed=0)
        step = jax.jit(make_train_step(spec, hp))
        state = init_state(spec, hp, jax.random.key(0))
        dots = _dots(step.lower(state, src.batch(list(SITES), 0, 256)).as_text())
        assert dots, "no dot_general found"
        want = ("bf16", "bf16", "f32") if dtype == "bfloat16" else ("f32", "f32", "f32")
        assert set(dots) == {want}, set(dots)
        fvu = []
        for i in range(hp.total_steps):
            state, m = step(state, src.batch(list(SITES), i, 256))
            fvu.append(float(np.mean(m["fvu"])))
        assert {str(a.dtype) for a in jax.tree_util.tree_leaves((state["params"], state["opt_state"]))
                if a.ndim} == {"float32"}
        out[dtype] = fvu
    for fvu in out.values():
        assert fvu[-1] < 0.5 * fvu[0]  # it trains
    assert abs(out["bfloat16"][-1] / out["float32"][-1] - 1) < 0.05  # and lands where float32 does


def test_matmul_dtype_is_checked():
    with pytest.raises(cfg.ConfigError, match="train.matmul_dtype"):
        cfg.load("experiments/default.py", ["train.matmul_dtype=float16"])
