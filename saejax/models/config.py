"""ModelConfig: the hyper-parameters of a decoder-only transformer, and the families saejax runs.

``FAMILIES`` declares every supported family in one place: its transformers names and what differs
between families (norm gain, norm placement, activation, QK-norm, biases, embedding scale). One
dataclass covers all of them; fields only some families use have neutral defaults (no sliding window,
no soft-caps, one RoPE base). ``from_hf`` reads a transformers config dict (config.json),
``RANDOM_PRESETS`` are the tiny random-weight models used by tests and runlocal.
"""
from __future__ import annotations

import dataclasses
from typing import Any

SITE_KINDS = ("res", "att", "mlp_in", "mlp")


class ModelError(ValueError):
    """A bad model source, architecture, site or weight file; the message names it."""


@dataclasses.dataclass(frozen=True)
class Family:
    """What one model family computes differently.

    norms: "pre" (Llama, Qwen: RMSNorm before attention and MLP), "sandwich" (Gemma 2/3: also after
    each, before the residual add), "post" (OLMo 2: only after each, before the residual add).
    norm_offset: RMSNorm scales by (1 + w) (Gemma) instead of w. act: "silu" or "gelu_tanh" (GeGLU).
    qk_norm: None, "head" (RMSNorm over each head's hd dims: Gemma 3, Qwen 3) or "full" (over the
    whole q / k projection: OLMo 2). qkv_bias: q/k/v projections have biases (Qwen 2).
    embed_scale: embeddings are multiplied by sqrt(d_model) (Gemma).
    defaults: config.json values transformers assumes when a key is missing.
    """
    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    norms: str = "pre"
    norm_offset: bool = False
    act: str = "silu"
    qk_norm: str | None = None
    qkv_bias: bool = False
    embed_scale: bool = False
    defaults: tuple[tuple[str, Any], ...] = ()


_GEMMA = dict(norms="sandwich", norm_offset=True, act="gelu_tanh", embed_scale=True)
# Every supported family (the one place that lists them).
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", ("LlamaForCausalLM",), ("llama",)),
    Family("gemma2", ("Gemma2ForCausalLM",), ("gemma2",), **_GEMMA),
    # Gemma3TextConfig's defaults: the 4B/12B/27B checkpoints' nested text_config leaves them out
    Family("gemma3", ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"), ("gemma3_text", "gemma3"),
           qk_norm="head", **_GEMMA,
           defaults=(("vocab_size", 262208), ("hidden_size", 2304), ("intermediate_size", 9216),
                     ("num_hidden_layers", 26), ("num_attention_heads", 8), ("num_key_value_heads", 4),
                     ("head_dim", 256), ("rms_norm_eps", 1e-6), ("rope_theta", 1_000_000.0),
                     ("rope_local_base_freq", 10_000.0), ("query_pre_attn_scalar", 256),
                     ("sliding_window", 4096), ("sliding_window_pattern", 6), ("tie_word_embeddings", True))),
    Family("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), qkv_bias=True),
    Family("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), qk_norm="head"),
    Family("olmo2", ("Olmo2ForCausalLM",), ("olmo2",), norms="post", qk_norm="full",
           defaults=(("rms_norm_eps", 1e-5),)),
)}
ARCHS = tuple(FAMILIES)
HF_ARCHITECTURES = tuple(a for f in FAMILIES.values() for a in f.architectures)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of one model.

    arch: a key of FAMILIES ("llama", "gemma2", "gemma3", "qwen2", "qwen3", "olmo2"); what the
    family computes is ``self.family``.
    att width = n_heads * head_dim (may differ from d_model).
    rope_scaling: None, Llama 3's {"factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}, or {"rope_type": "linear", "factor"} (Gemma 3 4B+);
    with rope_local_theta set it applies to the non-sliding (global) layers only.
    rope_local_theta: the RoPE base of sliding-window layers (Gemma 3: 10k); None: rope_theta.
    sliding_layers: per layer, whether it uses the sliding window (Gemma 2: even layers; Gemma 3:
    five of every six).
    query_pre_attn_scalar: queries are scaled by query_pre_attn_scalar**-0.5 (None: head_dim).
    """
    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab_size: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_embeddings: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    query_pre_attn_scalar: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    rope_local_theta: float | None = None

    def __post_init__(self):
        if self.arch not in FAMILIES:
            raise ModelError(f"unsupported architecture {self.arch!r}; supported: {', '.join(ARCHS)}")
        if self.n_heads % self.n_kv_heads:
            raise ModelError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.sliding_layers and len(self.sliding_layers) != self.n_layers:
            raise ModelError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.n_layers} layers")

    @property
    def family(self) -> Family:
        return FAMILIES[self.arch]

    @property
    def att_width(self) -> int:
        return self.n_heads * self.head_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def family_of(d: dict[str, Any]) -> Family:
    """The family of a config.json dict: by ``architectures`` (else ``model_type``); a one-line
    ModelError naming an unsupported one and the supported ones."""
    archs = d.get("architectures") or []
    name = archs[0] if archs else d.get("model_type", "?")
    for f in FAMILIES.values():
        if name in (f.architectures if archs else f.model_types):
            return f
    raise ModelError(f"unsupported architecture {name!r}; supported: {', '.join(ARCHS)} "
                     f"({', '.join(HF_ARCHITECTURES)})")


_SCALING_KEYS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                 "linear": ("factor",)}


def _scaling(scaling: dict | None, where: str) -> dict | None:
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return None
    if kind not in _SCALING_KEYS:
        raise ModelError(f"unsupported rope scaling {kind!r}{where}; supported: default, {', '.join(_SCALING_KEYS)}")
    out = {k: float(scaling[k]) for k in _SCALING_KEYS[kind]}
    return out if kind == "llama3" else {"rope_type": kind, **out}


def _rope(d: dict) -> tuple[float, dict | None]:
    """(theta, scaling or None) from transformers 4 (rope_theta, rope_scaling) or 5
    (rope_parameters) config fields."""
    rp = d.get("rope_parameters") or {}
    rs = d.get("rope_scaling") or {}
    theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
    return theta, _scaling(rp if rp.get("rope_type") not in (None, "default") else rs, "")


def _gemma3_rope(d: dict) -> tuple[float, dict | None, float]:
    """Gemma 3's (global theta, global scaling, local theta): transformers 4's rope_theta,
    rope_scaling, rope_local_base_freq, or 5's rope_parameters per layer type."""
    rp = d.get("rope_parameters") or {}
    if "full_attention" in rp or "sliding_attention" in rp:
        full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
        if _scaling(local, " on sliding layers") is not None:
            raise ModelError("unsupported gemma3 config.json: rope scaling on sliding_attention layers")
        return (float(full.get("rope_theta", d["rope_theta"])), _scaling(full, ""),
                float(local.get("rope_theta", d["rope_local_base_freq"])))
    theta, scaling = _rope(d)
    return theta, scaling, float(d["rope_local_base_freq"])


def from_hf(d: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from a transformers config.json dict (any architecture of FAMILIES; a
    Gemma3ForConditionalGeneration's text tower from its nested text_config)."""
    fam = family_of(d)
    mt, arch = d.get("model_type") or fam.name, fam.name
    if isinstance(d.get("text_config"), dict):  # multimodal checkpoint: the text tower's config
        d = d["text_config"]
    d = {**dict(fam.defaults), **{k: v for k, v in d.items() if v is not None or k not in dict(fam.defaults)}}
    act = d.get("hidden_activation") or "gelu_pytorch_tanh" if fam.act == "gelu_tanh" else d.get("hidden_act")
    want = {"silu": ("silu",), "gelu_tanh": ("gelu_pytorch_tanh", "gelu_tanh")}[fam.act]
    checks = [("mlp_bias", bool(d.get("mlp_bias"))), ("hidden_act", (act or fam.act) not in want),
              ("partial_rotary_factor", float((d.get("rope_parameters") or {}).get(
                  "partial_rotary_factor", d.get("partial_rotary_factor", 1.0))) != 1.0),
              ("use_bidirectional_attention", bool(d.get("use_bidirectional_attention")))]
    if not fam.qkv_bias:  # Qwen 2 always has q/k/v biases; elsewhere biases would be dropped silently
        checks.append(("attention_bias", bool(d.get("attention_bias"))))
    for key, bad in checks:
        if bad:
            raise ModelError(f"unsupported {mt} config.json: {key}={d.get(key, act)!r}")
    n_layers, H = int(d["num_hidden_layers"]), int(d["num_attention_heads"])
    head_dim = int(d.get("head_dim") or d["hidden_size"] // H)
    theta, scaling = _rope(d) if arch != "gemma3" else (None, None)
    common = dict(arch=arch, n_layers=n_layers, d_model=int(d["hidden_size"]), n_heads=H,
                  n_kv_heads=int(d.get("num_key_value_heads") or H), head_dim=head_dim,
                  ffn=int(d["intermediate_size"]), vocab_size=int(d["vocab_size"]),
                  rms_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling)
    if arch in ("llama", "qwen2", "qwen3", "olmo2"):
        window, types = d.get("sliding_window") if d.get("use_sliding_window") else None, d.get("layer_types")
        if window and not types:  # Qwen 2/3: layers from max_window_layers on slide
            types = ["sliding_attention" if i >= int(d.get("max_window_layers", 0)) else "full_attention"
                     for i in range(n_layers)]
        sliding = tuple(t == "sliding_attention" for t in types) if window and types else ()
        return ModelConfig(**common, tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                           sliding_window=int(window) if sliding else None, sliding_layers=sliding)
    if arch == "gemma3":
        pattern = int(d.get("sliding_window_pattern") or 6)
        types = d.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                         for i in range(n_layers)]
        theta, scaling, local = _gemma3_rope(d)
        common.update(rope_theta=theta, rope_scaling=scaling)
        extra = dict(rope_local_theta=local, tie_embeddings=bool(d.get("tie_word_embeddings", True)))
    else:
        types = d.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                         for i in range(n_layers)]
        extra = dict(tie_embeddings=True)
    return ModelConfig(**common, **extra, sliding_window=d.get("sliding_window"),
                       sliding_layers=tuple(t == "sliding_attention" for t in types),
                       query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
                       attn_softcap=d.get("attn_logit_softcapping"),
                       final_softcap=d.get("final_logit_softcapping"))


def _num(x):
    """An integral float as int (transformers' strict configs want ints there)."""
    return int(x) if x is not None and float(x).is_integer() else x


def _rope_hf(theta: float, scaling: dict | None) -> dict:
    rope = {"rope_type": "default", "rope_theta": theta}
    if scaling:
        rope = {"rope_type": scaling.get("rope_type", "llama3"), "rope_theta": theta, **scaling}
        if "original_max_position_embeddings" in rope:
            rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
    return rope


def to_hf(c: ModelConfig) -> dict[str, Any]:
    """The transformers (5.x names) config dict of ``c`` (for tests building a reference model)."""
    d = dict(num_hidden_layers=c.n_layers, hidden_size=c.d_model, num_attention_heads=c.n_heads,
             num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, intermediate_size=c.ffn,
             vocab_size=c.vocab_size, rms_norm_eps=c.rms_eps, tie_word_embeddings=c.tie_embeddings,
             max_position_embeddings=4096, model_type=c.family.model_types[0],
             architectures=[c.family.architectures[0]], rope_parameters=_rope_hf(c.rope_theta, c.rope_scaling))
    types = ["sliding_attention" if s else "full_attention" for s in c.sliding_layers]
    if c.family.act == "gelu_tanh":
        d.update(sliding_window=c.sliding_window, layer_types=types,
                 query_pre_attn_scalar=_num(c.query_pre_attn_scalar), attn_logit_softcapping=c.attn_softcap,
                 final_logit_softcapping=c.final_softcap, hidden_activation="gelu_pytorch_tanh")
    else:
        d.update(hidden_act="silu")
        if c.sliding_layers and any(c.sliding_layers):
            d.update(use_sliding_window=True, sliding_window=c.sliding_window, layer_types=types)
    if c.arch == "gemma3":
        d["rope_parameters"] = {"full_attention": _rope_hf(c.rope_theta, c.rope_scaling),
                                "sliding_attention": _rope_hf(c.rope_local_theta, None)}
    return d


def _tiny(arch: str, **kw) -> ModelConfig:
    base = dict(arch=arch, n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn=128,
                vocab_size=512, rms_eps=1e-6)
    base.update(kw)
    return ModelConfig(**base)


# Tiny deterministic random-weight models with the byte tokenizer (ids 0..255 = bytes).
RANDOM_PRESETS: dict[str, ModelConfig] = {
    "tiny-llama": _tiny("llama", rope_theta=10000.0,
                        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64.0}),
    "tiny-llama-tied": _tiny("llama", tie_embeddings=True),
    # att width 4 * 24 = 96 != d_model 64; window 16 shorter than typical test contexts
    "tiny-gemma2": _tiny("gemma2", head_dim=24, tie_embeddings=True, sliding_window=16,
                         sliding_layers=(True, False, True, False), query_pre_attn_scalar=32.0,
                         attn_softcap=50.0, final_softcap=30.0),
    # Gemma 3's 5:1 local/global pattern (layer 5 global), window 16, bases 10k local / 1M global with
    # linear scaling 8 on the global layer, QK-norm, 4 heads on 1 kv head, att width 4 * 24 = 96
    "tiny-gemma3": _tiny("gemma3", n_layers=6, head_dim=24, n_kv_heads=1, tie_embeddings=True,
                         sliding_window=16, sliding_layers=(True,) * 5 + (False,),
                         query_pre_attn_scalar=24.0, rope_theta=1_000_000.0, rope_local_theta=10_000.0,
                         rope_scaling={"rope_type": "linear", "factor": 8.0}),
    # QK-norm per head, GQA, head_dim 32 so att width 128 != d_model 64 (as Qwen 3's 128-wide heads)
    "tiny-qwen3": _tiny("qwen3", head_dim=32, rope_theta=1_000_000.0, tie_embeddings=True),
    "tiny-qwen2": _tiny("qwen2", rope_theta=1_000_000.0, tie_embeddings=True),  # q/k/v biases
    "tiny-olmo2": _tiny("olmo2", rope_theta=500_000.0),  # post-norms, full-width QK-norm, untied
}
