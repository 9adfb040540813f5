"""Gemma Scope on Gemma 2 2B (arXiv 2408.05147): every layer x {res, att, mlp}, widths 16k and 65k.

What it reproduces: JumpReLU SAEs on all 26 layers' residual stream (block output), attention
output (per-head z before W_O, width 8 x 256 = 2,048) and MLP output (after the post-MLP RMSNorm),
widths 2^14 and 2^16, five L0 targets per site (Gemma Scope released several L0s per site; here each
is a calibrated target), on 1,024-token contexts that begin with <bos>, Gemma Scope's optimizer and
schedules, 4B tokens for 16k-wide and 8B for 65k-wide SAEs.

Hardware: sized for a Cloud TPU v5p slice of 64 chips (v5p-128, 95 GB HBM each). Each (input width,
latent width) is its own group with its own step count, trained one after another, each on the mesh
the dry run's planner proposes for it alone (mesh.plan = "auto", for the configured matmul precision),
with idle SAE slots where they pay (mesh.pad_sites = "auto": stack must divide a group's slots; the
26 att sites alone allow 2 stack shards on 64 chips, padded to 32 slots they take 32, the idle
slots' work counted; docs/training.md). The dry run (offline too: Gemma 2's shapes are built in)
prints per group the compiled step's cost projected on v5p and the job's memory:

    jumprelu_d2048_w16384  att, 26 sites + 6 idle slots       mesh data 1 x stack 32 x latent 2
    jumprelu_d2304_w16384  res+mlp, 52 sites + 4 idle slots   mesh data 1 x stack 8 x latent 8
    jumprelu_d2048_w65536  att, 26 sites                      mesh data 1 x stack 2 x latent 32
    jumprelu_d2304_w65536  res+mlp, 52 sites                  mesh data 1 x stack 4 x latent 16
    :width=16k       peak 3.10 GiB per device
    :width=65k       peak 10.32 GiB per device
    both widths      peak 10.32 GiB per device
    harvest          shuffle buffers ~158.6 GB per process (of a v5p host's 448 GB)

(tests/test_experiments.py keeps these equal to the dry run's figures.) So:

    python launch/launch.py tpu-vm --tpu my-v5p-128 --zone us-east5-a -- \
        harvest --config experiments/gemma2_2b.py
    python launch/launch.py tpu-vm --tpu my-v5p-128 --zone us-east5-a -- \
        train --config experiments/gemma2_2b.py:width=16k
    python launch/launch.py tpu-vm --tpu my-v5p-128 --zone us-east5-a -- \
        train --config experiments/gemma2_2b.py:width=65k
    saejax run --config experiments/gemma2_2b.py:width=65k --dry_run      # store size, steps, cost, memory

Storage: fp32 activations as Gemma Scope stored them: 8B tokens x (52 x 2,304 + 26 x 2,048) x 4 bytes,
about 5.5 PB for one full pass; pass harvest.dtype=bfloat16 or fewer layers (:layers=0-12) to shrink it.
Reading it needs over 1 GiB/s per SAE group per host (docs/store.md: buckets through gcsfuse).

Cross-layer transcoder (`:clt`): harvests mlp_in and mlp of every layer (52 sites of width 2,304,
joined into one aligned group) and trains one JumpReLU CLT of 16,384 latents per layer over all 26
layers (13.3 B decoder parameters), sparse decoding with a cap of 256 active latents per row and
layer. No SAEs; for comparison, 26 per-layer skip-transcoders of the chosen widths (sae.transcoders).
The circuit-tracer export needs every layer (the default). The planner gives the CLT its own data x
latent mesh of the 64 chips (stack 1: one dictionary; data only while a device keeps 1,024 of the
4,096 rows); from the dry run, its mesh and the job's peak (the CLT's: params 3,393.4 MiB, optimizer
3,393.4 MiB, activations ~11,908.3 MiB per device):

    :clt  clt_jumprelu_L26_d2304_w16384_0.0001  mesh data 4 x stack 1 x latent 16, peak 18.26 GiB per device

Tiny mode for CPU tests (a random 2-layer Gemma 2, a few thousand tokens, seconds):
    saejax run --config experiments/gemma2_2b.py:runlocal
"""
from saejax import config as cfg

WIDTHS = {"16k": 2 ** 14, "65k": 2 ** 16}
VARIANTS = {"runlocal": bool, "width": cfg.choices(*WIDTHS), "layers": cfg.layer_range, "corpus": str, "clt": bool}


def get_config(arg: str = ""):
    v = cfg.parse_variants(arg, VARIANTS)
    c = cfg.defaults()
    c.workdir = "runs/gemma2_2b"
    c.model.source = "hf:google/gemma-2-2b"  # config.json + safetensors through huggingface_hub
    c.model.dtype = "float32"
    c.data.corpus = v.get("corpus", "monology/pile-uncopyrighted")  # streamed; any text dataset works
    c.data.context_len = 1024
    c.data.heldout_contexts = 2048
    c.harvest.layers = v.get("layers", cfg.layer_range("0-25"))
    c.harvest.kinds = ("res", "att", "mlp")
    c.harvest.max_tokens = 8_000_000_000  # the widest group's budget; narrower groups read a prefix
    c.harvest.dtype = "float32"  # Gemma Scope stored fp32
    c.harvest.batch_contexts = 256
    c.harvest.shard_bytes = 16 * 2 ** 30  # Gemma Scope: 10-20 GiB shards
    c.harvest.shuffle_bytes = 2 ** 30  # per site; the dry run prints the host memory per process
    c.sae.arch = "jumprelu"
    c.sae.widths = tuple(WIDTHS[w] for w in v.get("width", tuple(WIDTHS)))
    c.sae.target_l0 = (20.0, 40.0, 80.0, 160.0, 320.0)  # Gemma Scope's levels were about 22..445
    c.train.tokens = 4_000_000_000  # 16k-wide
    c.train.tokens_wide = 8_000_000_000  # wider
    c.train.batch_size = 4096
    c.train.checkpoint_every = 2000
    c.train.matmul_dtype = "bfloat16"  # bf16 matmul inputs, fp32 accumulation and state (docs/training.md)
    # The slice's 64 chips; each group trains on the mesh the dry run's planner proposes for it
    # (the docstring's table). The axes are also the harvest's mesh: the model replicated, batch split.
    c.mesh.data, c.mesh.stack, c.mesh.latent = 64, 1, 1
    c.mesh.plan = "auto"
    c.mesh.pad_sites = "auto"  # idle slots where they pay: stack need not divide the sites (docstring)
    c.evaluate.contexts = 2048
    c.release.name = "saejax-gemma2-2b"
    c.release.l0 = ()  # every calibrated level
    if v.get("clt"):
        from saejax.train.clt_step import clt_pairs
        c.workdir = "runs/gemma2_2b_clt"
        c.harvest.kinds = ("mlp_in", "mlp")
        c.harvest.pairs = tuple(clt_pairs(c.harvest.layers))
        c.sae.site_kinds = ()
        c.sae.transcoders = c.harvest.layers
        c.sae.skip = True
        c.clt.enabled = True
        c.clt.arch = "jumprelu"
        c.clt.width = 2 ** 14
        c.clt.sparsity = 1e-4  # lambda on the L0 summed over 26 layers
        c.clt.cap = 256  # = 16,384 / 64: sparse decoding; the CLT's mesh is the planner's (docstring)
        c.release.name = "saejax-gemma2-2b-clt"
    if v.get("runlocal"):
        cfg.runlocal(c, "random:tiny-gemma2")
        if v.get("clt"):
            c.harvest.pairs = tuple(clt_pairs(c.harvest.layers))
            c.sae.transcoders = c.harvest.layers
            c.clt.width, c.clt.cap = 64, 32
    return c

