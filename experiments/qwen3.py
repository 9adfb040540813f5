"""SAEs and MLP transcoders on every layer of Qwen 3 (dense: 0.6B, 1.7B, 4B, 8B): SAEs on res, att and mlp.

Qwen 3 is the family Llama Scope 2 (OpenMOSS) trains transcoders on. Sites: the residual stream
(block output, d_model), the attention output per head before o_proj (width n_heads x 128: 0.6B has
16 x 128 = 2,048 against d_model 1,024) and the MLP output. JumpReLU SAEs, widths 16k and 65k, three
L0 targets; 1,024-token contexts that begin with config.json's bos_token_id (<|endoftext|>, the
document separator: Qwen's tokenizer names no BOS). Every layer also gets an MLP transcoder (mlp_in.L ->
mlp.L), as Llama Scope 2 trains on Qwen 3.

Hardware: v5p slices, bf16 matmuls, each group on the mesh the dry run's planner proposes for it
(mesh.plan = "auto"); the dry run prints each group's mesh, projected step and the job's peak per
device. 65k is four times the params of 16k: fewer layers per job.

    saejax run --config experiments/qwen3.py:size=8b --dry_run       # offline: the four shapes are built in
    saejax run --config experiments/qwen3.py:size=0.6b,width=16k     # one GPU host or a v5p-16 slice

Tiny mode for CPU tests: saejax run --config experiments/qwen3.py:runlocal
"""
from saejax import config as cfg

SIZES = {"0.6b": ("Qwen/Qwen3-0.6B", 28, (4, 2, 2)), "1.7b": ("Qwen/Qwen3-1.7B", 28, (4, 2, 2)),
         "4b": ("Qwen/Qwen3-4B", 36, (8, 2, 4)), "8b": ("Qwen/Qwen3-8B", 36, (8, 2, 4))}
WIDTHS = {"16k": 2 ** 14, "65k": 2 ** 16}
VARIANTS = {"runlocal": bool, "size": cfg.choice(*SIZES), "width": cfg.choices(*WIDTHS),
            "layers": cfg.layer_range, "corpus": str}


def get_config(arg: str = ""):
    v = cfg.parse_variants(arg, VARIANTS)
    size = v.get("size", "0.6b")
    hub, n_layers, mesh = SIZES[size]
    c = cfg.defaults()
    c.workdir = f"runs/qwen3_{size}"
    c.model.source = f"hf:{hub}"
    c.model.dtype = "bfloat16"  # Qwen 3 is released in bf16
    c.data.corpus = v.get("corpus", "HuggingFaceFW/fineweb-edu")
    c.data.context_len = 1024
    c.data.heldout_contexts = 1024
    c.harvest.layers = v.get("layers", tuple(range(n_layers)))
    c.harvest.kinds = ("res", "att", "mlp_in", "mlp")  # mlp_in: the transcoders' input, aligned with mlp
    c.harvest.max_tokens = 2_000_000_000
    c.harvest.dtype = "bfloat16"
    c.harvest.batch_contexts = 128
    c.harvest.shard_bytes = 4 * 2 ** 30
    c.harvest.shuffle_bytes = 2 ** 30  # per site; the dry run prints the host memory per process
    c.sae.arch = "jumprelu"
    c.sae.widths = tuple(WIDTHS[w] for w in v.get("width", ("16k",)))
    c.sae.target_l0 = (20.0, 50.0, 120.0)
    c.sae.site_kinds = ("res", "att", "mlp")  # SAEs; mlp_in feeds the transcoders (as Llama Scope 2 trains)
    c.train.tokens = 1_000_000_000
    c.train.tokens_wide = 2_000_000_000
    c.train.batch_size = 4096
    c.train.checkpoint_every = 2000
    c.train.matmul_dtype = "bfloat16"  # bf16 matmul inputs, fp32 accumulation and state (docs/training.md)
    # The slice's chips; each group trains on the mesh the dry run's planner proposes for it.
    c.mesh.data, c.mesh.stack, c.mesh.latent = mesh[0] * mesh[1] * mesh[2], 1, 1
    c.mesh.plan = "auto"
    c.evaluate.contexts = 1024
    c.release.name = f"saejax-qwen3-{size}"
    c.release.l0 = ()
    if v.get("runlocal"):
        cfg.runlocal(c, "random:tiny-qwen3")
    c.sae.transcoders = c.harvest.layers  # a transcoder per layer: mlp_in.L -> mlp.L
    return c
