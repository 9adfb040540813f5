"""The training source a config names (docs/architecture.md, "Training sources"): the activation
store, or synthetic data; and the stand-in for a store not yet harvested. The train stage reads
from it, and the evaluate stage draws its synthetic held-out rows from it."""
from __future__ import annotations

from saejax import config as cfg
from saejax import workdir as wd


def synthetic_source(config):
    """The planted-feature source of ``config.synthetic`` (sites ``res.0``, ``res.1``, ...)."""
    from saejax.data.synthetic import SyntheticSource
    s = config.synthetic
    sites = [f"res.{i}" for i in range(s.sites)]
    return SyntheticSource(sites, d=s.d, n_features=s.n_features, active=s.active, zipf=s.zipf,
                           noise=s.noise, seed=config.seed)


def make_source(config):
    """The training source named by the config: the activation store, or synthetic data."""
    if config.train.source == "synthetic":
        return synthetic_source(config)
    from saejax import store
    st = store.open_store(wd.store_dir(config))
    store.check_store(st, config)  # written from this config's model, every configured site present
    # a store may hold more sites than this run trains
    return st.reader(seed=config.seed, split="train", sites=cfg.sites(config))


class PlannedSource:
    """Sites and widths of a store not yet harvested (from the harvest plan): enough for a dry run."""

    def __init__(self, widths: dict):
        self.sites, self._widths, self.model = list(widths), dict(widths), ""

    def width(self, site: str) -> int:
        return self._widths[site]
