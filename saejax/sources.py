"""The training source a config names (docs/architecture.md, "Training sources"): the activation
store, or synthetic data; and the stand-in for a store not yet harvested. The train stage reads
from it, and the evaluate stage draws its synthetic held-out rows from it."""
from __future__ import annotations

from saejax import config as cfg
from saejax import workdir as wd


def synthetic_source(config):
    """The planted-feature source of ``config.synthetic`` (sites ``res.0``, ``res.1``, ...); with
    ``sae.transcoders``, aligned pairs ``mlp_in.L``, ``mlp.L`` with a planted sparse map instead."""
    from saejax.data.synthetic import SyntheticPairs, SyntheticSource
    s = config.synthetic
    if config.sae.transcoders:
        return SyntheticPairs(config.sae.transcoders, d=s.d, n_features=s.n_features, active=s.active,
                              zipf=s.zipf, noise=s.noise, seed=config.seed, dense=s.dense)
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
    check_pairs(st, config)
    # a store may hold more sites than this run trains; sae.layer_groups pools res sites (docs/store.md)
    pools = cfg.layer_pools(config)
    return st.reader(seed=config.seed, split="train", sites=cfg.pool_sites(cfg.sites(config), pools), pools=pools)


def check_pairs(st, config) -> None:
    """Every transcoder's (mlp_in.L, mlp.L) is an aligned pair of the store (its manifest's ``pairs``):
    a one-line StoreError naming the pair and the store otherwise."""
    from saejax.store.manifest import align_keys
    from saejax.store.reader import StoreError
    keys = align_keys(st.sites, st.pairs)
    for read, write in cfg.transcoder_pairs(config):
        if keys.get(read) is None or keys.get(read) != keys.get(write):
            raise StoreError(f"sae.transcoders: sites ({read}, {write}) are not an aligned pair in the store "
                             f"{st.path} (its pairs: {[list(p) for p in st.pairs]}); harvest it with "
                             f"sae.transcoders set")


class PlannedSource:
    """Sites and widths of a store not yet harvested (from the harvest plan): enough for a dry run.
    ``pools`` (``config.layer_pools``): pooled sites stand in for their members, as the reader's do."""

    def __init__(self, widths: dict, pools: dict | None = None):
        pools = pools or {}
        self.sites, self.model = cfg.pool_sites(list(widths), pools), ""
        self._widths = {**widths, **{name: widths[m[0]] for name, m in pools.items()}}

    def width(self, site: str) -> int:
        return self._widths[site]
