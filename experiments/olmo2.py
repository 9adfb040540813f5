"""SAEs on every layer of OLMo 2 (1B, 7B, 13B): res, att and mlp.

OLMo 2 is the fully open family (weights, data, intermediate checkpoints) that interpretability work
on training dynamics uses. Its blocks put the RMSNorms after attention and after the MLP, before the
residual add, and none before them: `att.L` is z before o_proj, `mlp.L` the post-feedforward-normed
MLP output (the term added to the residual stream), and `mlp_in.L` (for transcoders, issue 21) the
residual stream between attention and MLP. JumpReLU SAEs, widths 16k and 65k, three L0 targets,
1,024-token contexts beginning with the tokenizer's BOS (<|endoftext|>).

Hardware: v5p slices, bf16 matmuls, each group on the mesh the dry run's planner proposes for it
(mesh.plan = "auto"); the dry run prints each group's mesh, projected step and the job's peak per
device. 65k is four times the params of 16k: fewer layers per job.

    saejax run --config experiments/olmo2.py:size=7b --dry_run       # offline: the three shapes are built in
    saejax run --config experiments/olmo2.py:size=1b,width=16k

Tiny mode for CPU tests: saejax run --config experiments/olmo2.py:runlocal
"""
from saejax import config as cfg

SIZES = {"1b": ("allenai/OLMo-2-0425-1B", 16, (4, 2, 2)), "7b": ("allenai/OLMo-2-1124-7B", 32, (8, 2, 4)),
         "13b": ("allenai/OLMo-2-1124-13B", 40, (8, 2, 4))}
WIDTHS = {"16k": 2 ** 14, "65k": 2 ** 16}
VARIANTS = {"runlocal": bool, "size": cfg.choice(*SIZES), "width": cfg.choices(*WIDTHS),
            "layers": cfg.layer_range, "corpus": str}


def get_config(arg: str = ""):
    v = cfg.parse_variants(arg, VARIANTS)
    size = v.get("size", "1b")
    hub, n_layers, mesh = SIZES[size]
    c = cfg.defaults()
    c.workdir = f"runs/olmo2_{size}"
    c.model.source = f"hf:{hub}"
    c.model.dtype = "bfloat16"
    c.data.corpus = v.get("corpus", "HuggingFaceFW/fineweb-edu")
    c.data.context_len = 1024
    c.data.heldout_contexts = 1024
    c.harvest.layers = v.get("layers", tuple(range(n_layers)))
    c.harvest.kinds = ("res", "att", "mlp")
    c.harvest.max_tokens = 2_000_000_000
    c.harvest.dtype = "bfloat16"
    c.harvest.batch_contexts = 128
    c.harvest.shard_bytes = 4 * 2 ** 30
    c.harvest.shuffle_bytes = 2 ** 30  # per site; the dry run prints the host memory per process
    c.sae.arch = "jumprelu"
    c.sae.widths = tuple(WIDTHS[w] for w in v.get("width", ("16k",)))
    c.sae.target_l0 = (20.0, 50.0, 120.0)
    c.train.tokens = 1_000_000_000
    c.train.tokens_wide = 2_000_000_000
    c.train.batch_size = 4096
    c.train.checkpoint_every = 2000
    c.train.matmul_dtype = "bfloat16"  # bf16 matmul inputs, fp32 accumulation and state (docs/training.md)
    # The slice's chips; each group trains on the mesh the dry run's planner proposes for it.
    c.mesh.data, c.mesh.stack, c.mesh.latent = mesh[0] * mesh[1] * mesh[2], 1, 1
    c.mesh.plan = "auto"
    c.evaluate.contexts = 1024
    c.release.name = f"saejax-olmo2-{size}"
    c.release.l0 = ()
    if v.get("runlocal"):
        cfg.runlocal(c, "random:tiny-olmo2")
    return c
