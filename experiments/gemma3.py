"""A Gemma-Scope-2-like suite on Gemma 3 (270M, 1B, 4B, 12B, 27B): every layer x {res, att, mlp}.

What it follows from Gemma Scope 2 (DeepMind, Dec 2025): JumpReLU SAEs on every layer's residual
stream (block output), attention output (per-head z before o_proj: width n_heads x head_dim, e.g.
27B: 32 x 128 = 4,096 against d_model 5,376) and MLP output (after the post-feedforward RMSNorm), at
the two widths its every-layer release has, 16k and 262k, and two L0 targets per site (Gemma Scope 2
names its levels "small" 10-20 and "big" 90-150 without exact values: here 15 and 120). Contexts of
1,024 tokens begin with <bos>; Gemma Scope's optimizer, schedules and token budgets (4B tokens for
16k-wide SAEs, 8B for wider). The 4B/12B/27B checkpoints are Gemma3ForConditionalGeneration: the
text tower is loaded alone (docs/models.md). As Gemma Scope 2, the SAEs train with Matryoshka
prefixes (1/16, 1/4 and all of the width; the sizes are chosen here) and every layer also gets a
skip-transcoder reading `mlp_in.L` and reconstructing `mlp.L` (harvested aligned).

Hardware: v5p slices of 16 chips (270m, 1b), 64 (4b) and 256 (12b, 27b), bf16 matmuls; each group
trains on the mesh the dry run's planner proposes for it (mesh.plan = "auto"). The dry run (offline:
the five sizes' shapes are built in) prints each group's mesh, its projected step and the job's peak
per device; 262k is 16 times the params of 16k: a few layers per job.

    saejax run --config experiments/gemma3.py:size=27b --dry_run           # store, steps, memory
    python launch/launch.py tpu-vm --tpu my-v5p-512 --zone us-east5-a -- \
        train --config experiments/gemma3.py:size=27b,width=16k
    python launch/launch.py tpu-vm --tpu my-v5p-512 --zone us-east5-a -- \
        train --config experiments/gemma3.py:size=27b,width=262k,layers=0-3      # 262k: a few layers per job

Storage: fp32 activations for every layer are petabytes at 27B (62 layers x (2 x 5,376 + 4,096) x 4
bytes x 8B tokens, about 29 PB): pass harvest.dtype=bfloat16 or fewer layers (:layers=).

Tiny mode for CPU tests (a random 6-layer Gemma 3 with the 5:1 pattern, a few thousand tokens):
    saejax run --config experiments/gemma3.py:runlocal
"""
from saejax import config as cfg

SIZES = {  # hub id, layers, mesh (data, stack, latent)
    "270m": ("google/gemma-3-270m", 18, (4, 2, 2)),
    "1b": ("google/gemma-3-1b-pt", 26, (4, 2, 2)),
    "4b": ("google/gemma-3-4b-pt", 34, (8, 2, 4)),
    "12b": ("google/gemma-3-12b-pt", 48, (16, 2, 8)),
    "27b": ("google/gemma-3-27b-pt", 62, (16, 2, 8)),
}
WIDTHS = {"16k": 2 ** 14, "262k": 2 ** 18}
VARIANTS = {"runlocal": bool, "size": cfg.choice(*SIZES), "width": cfg.choices(*WIDTHS),
            "layers": cfg.layer_range, "corpus": str}


def get_config(arg: str = ""):
    v = cfg.parse_variants(arg, VARIANTS)
    size = v.get("size", "1b")
    hub, n_layers, mesh = SIZES[size]
    c = cfg.defaults()
    c.workdir = f"runs/gemma3_{size}"
    c.model.source = f"hf:{hub}"
    c.model.dtype = "float32"
    c.data.corpus = v.get("corpus", "monology/pile-uncopyrighted")
    c.data.context_len = 1024
    c.data.heldout_contexts = 2048
    c.harvest.layers = v.get("layers", tuple(range(n_layers)))
    c.harvest.kinds = ("res", "att", "mlp_in", "mlp")  # mlp_in: the transcoders' input, aligned with mlp
    c.harvest.max_tokens = 8_000_000_000
    c.harvest.dtype = "float32"
    c.harvest.batch_contexts = 256
    c.harvest.shard_bytes = 16 * 2 ** 30
    c.harvest.shuffle_bytes = 3 * 2 ** 28  # per site: 2 chunks in flight x 248 sites (27B) = 399 GB, inside a v5p host
    c.sae.arch = "jumprelu"
    c.sae.widths = tuple(WIDTHS[w] for w in v.get("width", ("16k",)))
    c.sae.target_l0 = (15.0, 120.0)  # Gemma Scope 2's "small" and "big"
    c.sae.matryoshka = (0.0625, 0.25, 1.0)  # Matryoshka training, as Gemma Scope 2 (prefix sizes chosen here)
    c.sae.site_kinds = ("res", "att", "mlp")  # SAEs; mlp_in feeds the skip-transcoders
    c.sae.skip = True
    c.train.tokens = 4_000_000_000
    c.train.tokens_wide = 8_000_000_000
    c.train.batch_size = 4096
    c.train.checkpoint_every = 2000
    c.train.matmul_dtype = "bfloat16"  # bf16 matmul inputs, fp32 accumulation and state (docs/training.md)
    # The slice's chips; each group trains on the mesh the dry run's planner proposes for it.
    c.mesh.data, c.mesh.stack, c.mesh.latent = mesh[0] * mesh[1] * mesh[2], 1, 1
    c.mesh.plan = "auto"
    c.evaluate.contexts = 2048
    c.release.name = f"saejax-gemma3-{size}"
    c.release.l0 = ()
    if v.get("runlocal"):
        cfg.runlocal(c, "random:tiny-gemma3")
    c.sae.transcoders = c.harvest.layers  # a skip-transcoder per layer: mlp_in.L -> mlp.L
    return c
