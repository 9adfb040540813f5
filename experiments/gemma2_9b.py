"""Gemma Scope on Gemma 2 9B (arXiv 2408.05147): every layer x {res, att, mlp}, widths 16k and 131k.

42 layers; residual and MLP width 3,584, attention width 16 x 256 = 4,096. Five calibrated L0 targets
per site; 4B tokens for 16k-wide, 8B for 131k-wide SAEs; 1,024-token contexts. Sized for a Cloud TPU
v5p slice of 256 chips (v5p-512); each group trains on the mesh the dry run's planner proposes for it
alone (mesh.plan = "auto", for the configured matmul precision; Gemma Scope sharded wide SAEs over
latents, Megatron style), with idle SAE slots where they pay (mesh.pad_sites = "auto": stack must
divide a group's slots; 84 res and mlp sites alone allow 4 stack shards, 42 att sites 2). The dry run
(offline too: Gemma 2's shapes are built in) prints per group the compiled step's cost projected on
v5p and the job's memory:

    jumprelu_d3584_w16384   res+mlp, 84 sites + 12 idle slots  mesh data 1 x stack 32 x latent 8
    jumprelu_d4096_w16384   att, 42 sites + 6 idle slots       mesh data 1 x stack 16 x latent 16
    jumprelu_d3584_w131072  res+mlp, 84 sites + 4 idle slots   mesh data 1 x stack 8 x latent 32
    jumprelu_d4096_w131072  att, 42 sites + 6 idle slots       mesh data 1 x stack 16 x latent 16
    :width=16k       peak 2.30 GiB per device
    :width=131k      peak 13.51 GiB per device
    both widths      peak 13.51 GiB per device
    harvest          shuffle buffers ~247.8 GB per process (of a v5p host's 448 GB)

(tests/test_experiments.py keeps these equal to the dry run's figures.) So:

    python launch/launch.py tpu-vm --tpu my-v5p-512 --zone us-east5-a -- \
        train --config experiments/gemma2_9b.py:width=16k
    python launch/launch.py tpu-vm --tpu my-v5p-512 --zone us-east5-a -- \
        train --config experiments/gemma2_9b.py:width=131k
    saejax run --config experiments/gemma2_9b.py:width=131k --dry_run     # store size, steps, cost, memory

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
    c.harvest.shuffle_bytes = 2 ** 30  # per site; the dry run prints the host memory per process
    c.sae.arch = "jumprelu"
    c.sae.widths = tuple(WIDTHS[w] for w in v.get("width", tuple(WIDTHS)))
    c.sae.target_l0 = (20.0, 40.0, 80.0, 160.0, 320.0)
    c.train.tokens = 4_000_000_000
    c.train.tokens_wide = 8_000_000_000
    c.train.batch_size = 4096
    c.train.checkpoint_every = 2000
    c.train.matmul_dtype = "bfloat16"  # bf16 matmul inputs, fp32 accumulation and state (docs/training.md)
    # The slice's 256 chips; each group trains on the mesh the dry run's planner proposes for it
    # (the docstring's table). The axes are also the harvest's mesh: the model replicated, batch split.
    c.mesh.data, c.mesh.stack, c.mesh.latent = 256, 1, 1
    c.mesh.plan = "auto"
    c.mesh.pad_sites = "auto"  # idle slots where they pay: stack need not divide the sites (docstring)
    c.evaluate.contexts = 2048
    c.release.name = "saejax-gemma2-9b"
    if v.get("runlocal"):
        cfg.runlocal(c, "random:tiny-gemma2")
    return c
