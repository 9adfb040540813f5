"""Gemma Scope on Gemma 2 9B (arXiv 2408.05147): every layer x {res, att, mlp}, widths 16k and 131k.

42 layers; residual and MLP width 3,584, attention width 16 x 256 = 4,096. Five calibrated L0 targets
per site; 4B tokens for 16k-wide, 8B for 131k-wide SAEs; 1,024-token contexts. Sized for a Cloud TPU
v5p slice of 256 chips (v5p-512): mesh data 16 x stack 2 x latent 8 (Gemma Scope sharded wide SAEs
over latents, Megatron style). The dry run (offline too: Gemma 2's shapes are built in) gives per
device, params + Adam + activations: 16k, all 42 layers: 35 GB for the 84 res/mlp sites x 5 targets:
one job fits a v5p chip's 95 GB. 131k, all layers: 276 GB: split by layers, 4 per job (27 GB; 4
keeps the att group's 4 sites divisible by mesh.stack=2):

    python launch/launch.py tpu-vm --tpu my-v5p-512 --zone us-east5-a -- \
        train --config experiments/gemma2_9b.py:width=16k
    python launch/launch.py tpu-vm --tpu my-v5p-512 --zone us-east5-a -- \
        train --config experiments/gemma2_9b.py:width=131k,layers=0-3       # ... 40-41
    saejax run --config experiments/gemma2_9b.py:width=131k --dry_run     # store size, steps, memory

One 9B SAE group reads over 1 GiB/s from the store (Gemma Scope's figure); see docs/store.md.

Tiny mode for CPU tests:  saejax run --config experiments/gemma2_9b.py:runlocal
"""
from saejax import config as cfg

WIDTHS = {"16k": 2 ** 14, "131k": 2 ** 17}
VARIANTS = {"runlocal": bool, "width": cfg.choices(*WIDTHS), "layers": cfg.layer_range, "corpus": str}


def get_config(arg: str = ""):
    v = cfg.parse_variants(arg, VARIANTS)
    c = cfg.defaults()
    c.workdir = "runs/gemma2_9b"
    c.model.source = "hf:google/gemma-2-9b"
    c.data.corpus = v.get("corpus", "monology/pile-uncopyrighted")
    c.data.context_len = 1024
    c.data.heldout_contexts = 2048
    c.harvest.layers = v.get("layers", cfg.layer_range("0-41"))
    c.harvest.kinds = ("res", "att", "mlp")
    c.harvest.max_tokens = 8_000_000_000
    c.harvest.dtype = "float32"
    c.harvest.batch_contexts = 512
    c.harvest.shard_bytes = 16 * 2 ** 30
    c.harvest.shuffle_bytes = 32 * 2 ** 30
    c.sae.arch = "jumprelu"
    c.sae.widths = tuple(WIDTHS[w] for w in v.get("width", tuple(WIDTHS)))
    c.sae.target_l0 = (20.0, 40.0, 80.0, 160.0, 320.0)
    c.train.tokens = 4_000_000_000
    c.train.tokens_wide = 8_000_000_000
    c.train.batch_size = 4096
    c.train.checkpoint_every = 2000
    c.train.matmul_dtype = "bfloat16"  # bf16 matmul inputs, fp32 accumulation and state (docs/training.md)
    c.mesh.data, c.mesh.stack, c.mesh.latent = 16, 2, 8
    c.evaluate.contexts = 2048
    c.release.name = "saejax-gemma2-9b"
    if v.get("runlocal"):
        cfg.runlocal(c, "random:tiny-gemma2")
    return c
