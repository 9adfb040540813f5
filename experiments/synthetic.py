"""SAEs on synthetic activations with planted ground-truth features (no model, no corpus).

The check that training trains: 512 planted unit directions in 64 dimensions, each row a
non-negative mix of 4 of them with Zipf-like frequencies. A good SAE recovers the directions
(benchmarks/planted_features.py measures how many).

    saejax train --config experiments/synthetic.py            # ~1 min on 2 CPU cores
    saejax train --config experiments/synthetic.py:arch=topk
"""
from saejax import config as cfg
from saejax.sae import kinds

VARIANTS = {"runlocal": bool, "arch": str}  # validate checks the arch as sae.arch


def get_config(arg: str = ""):
    v = cfg.parse_variants(arg, VARIANTS)
    c = cfg.defaults()
    c.workdir = "runs/synthetic"
    c.train.source = "synthetic"
    c.synthetic.sites = 2
    c.sae.arch = v.get("arch", "jumprelu")
    c.sae.widths = (1024,)
    if kinds.get(c.sae.arch).sweep_name == "k":  # a sweep of k (topk, batchtopk), else of coefficients
        c.sae.sparsity = (4.0,)
    else:
        c.sae.sparsity = (0.01, 0.02)
    if c.sae.arch == "jumprelu":
        # Gemma Scope's init (W_enc = W_dec^T, theta = 0.001) starts with ~M/2 latents firing and
        # FVU ~66; Adam remembers those gradients for thousands of steps and a short run never moves
        # the dictionary. A d/M-scaled encoder fixes it (docs/sae.md); set again if widths change.
        c.sae.encoder_init_scale = c.synthetic.d / c.sae.widths[0]
    c.train.tokens = 2048 * 3000
    c.train.batch_size = 2048
    c.train.lr = 3e-3  # a 64-dim toy learns at a far larger lr than Gemma Scope's 7e-5
    c.train.lr_warmup = 0.05
    c.train.sparsity_warmup = 0.3
    c.train.dead_tokens = 2048 * 200
    c.train.log_every = 250
    if v.get("runlocal"):
        c.train.tokens = 2048 * 200
        c.train.log_every = 50
    return c
