"""SAE kinds: a new kind is one module and one registration (docs/architecture.md, "Adding an SAE kind").

The kind here, a ReLU capped at a fixed value with an L1 penalty, exists only in this file: it is
registered from the test and trained on the synthetic config by the train stage, unchanged.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from saejax import config as cfg
from saejax.data.synthetic import SyntheticSource
from saejax.evaluate import metrics
from saejax.sae import io as sae_io
from saejax.sae import kinds
from saejax.sae.group import GroupSpec, init_params
from saejax.sae.kinds.base import Kind, recon_terms
from saejax.train import loop

SYNTH = os.path.join(os.path.dirname(__file__), "..", "experiments", "synthetic.py")
CAP = 1.0


class CappedReLU(Kind):
    """f = min(relu(pre), CAP); loss = ||x - x_hat||^2 + lam * sum_i f_i."""

    name = "capped_relu"
    sweep_name = "l1_coeff"
    release_name = "capped_relu"

    def activate(self, pre, threshold, ks):
        return jnp.minimum(jax.nn.relu(pre), CAP)

    def loss(self, spec, hp, params, state, x, y, lam):
        _, f, x_hat = self.train_forward(spec, params, x)
        return recon_terms(y, f, x_hat, sparsity=lam * jnp.mean(jnp.sum(f, -1), -1))


def test_registered_kind_trains_on_the_synthetic_config(tmp_path):
    kinds.register(CappedReLU())
    config = cfg.load(f"{SYNTH}:runlocal", [f"--config.workdir={tmp_path}", "--config.sae.arch=capped_relu",
                                            "--config.sae.widths=(256,)", "--config.train.tokens=307200"])
    final, = loop.run(config)  # plans, trains and exports the suite's one group
    arrays, meta = sae_io.load_group(final)
    assert os.path.basename(os.path.dirname(final)) == "capped_relu_d64_w256"
    assert meta["sweep"] == [0.01, 0.02] and meta["sweep_name"] == "l1_coeff" and meta["k"] == []
    assert sorted(arrays) == ["W_dec", "W_enc", "b_dec", "b_enc"]  # no threshold: the kind infers without one

    # FVU on rows training never drew, through the inference path of evaluation (the kind's
    # ``activate`` on exported arrays): the fresh init's and the trained group's.
    s = config.synthetic
    src = SyntheticSource(meta["sites"], d=s.d, n_features=s.n_features, active=s.active, zipf=s.zipf,
                          noise=s.noise, seed=config.seed)
    spec = GroupSpec(arch=meta["arch"], sites=tuple(meta["sites"]), d=meta["d"], width=meta["width"],
                     sweep=tuple(meta["sweep"]))
    fresh = sae_io.export_params(spec.arch, init_params(spec, jax.random.key(0)), np.zeros((spec.T, spec.K)))
    for t, site in enumerate(meta["sites"]):
        rows = src.batch([site], 2 ** 40, 4096)[0]
        before = [m["fvu"] for m in metrics.site_metrics(meta, fresh, t, rows)]
        after = [m["fvu"] for m in metrics.site_metrics(meta, arrays, t, rows)]
        assert all(a < 0.1 * b and a < 0.2 for a, b in zip(after, before)), (site, before, after)
    with open(os.path.join(os.path.dirname(final), "metrics.jsonl")) as fh:
        records = [json.loads(line) for line in fh]
    assert np.all(np.asarray(records[-1]["l0"]) > 0)  # latents fire; the capped activation trained
