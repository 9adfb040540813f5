"""ModelConfig: the hyper-parameters of a decoder-only transformer (Llama family or Gemma 2).

One dataclass covers both families; the fields that only one family uses have neutral defaults
(no sliding window, no soft-caps, no post-norms). ``from_hf`` reads a transformers config dict
(config.json), ``RANDOM_PRESETS`` are the tiny random-weight models used by tests and runlocal.
"""
from __future__ import annotations

import dataclasses
from typing import Any

ARCHS = ("llama", "gemma2")
SITE_KINDS = ("res", "att", "mlp_in", "mlp")


class ModelError(ValueError):
    """A bad model source, architecture, site or weight file; the message names it."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of one model.

    arch: "llama" (RMSNorm w*x, SwiGLU, RoPE, GQA) or "gemma2" (RMSNorm (1+w)*x, pre/post norms,
    GeGLU with tanh-GELU, sqrt(d) embedding scale, soft-caps, alternating sliding window).
    att width = n_heads * head_dim (may differ from d_model).
    rope_scaling: None or Llama 3's {"factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}.
    sliding_layers: per layer, whether it uses the sliding window (Gemma 2: even layers).
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

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ModelError(f"unsupported architecture {self.arch!r}; supported: {', '.join(ARCHS)}")
        if self.n_heads % self.n_kv_heads:
            raise ModelError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.sliding_layers and len(self.sliding_layers) != self.n_layers:
            raise ModelError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.n_layers} layers")

    @property
    def att_width(self) -> int:
        return self.n_heads * self.head_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# transformers model_type / architectures -> our arch
_HF_ARCH = {"llama": "llama", "gemma2": "gemma2", "LlamaForCausalLM": "llama", "Gemma2ForCausalLM": "gemma2"}


def _rope(d: dict) -> tuple[float, dict | None]:
    """(theta, Llama 3 scaling or None) from transformers 4 (rope_theta, rope_scaling) or 5
    (rope_parameters) config fields."""
    rp = d.get("rope_parameters") or {}
    rs = d.get("rope_scaling") or {}
    theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
    scaling = rp if rp.get("rope_type") not in (None, "default") else rs
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ModelError(f"unsupported rope scaling {kind!r}; supported: default, llama3")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {k: float(scaling[k]) for k in keys}


def from_hf(d: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from a transformers config.json dict (LlamaForCausalLM, Gemma2ForCausalLM)."""
    mt = d.get("model_type") or (d.get("architectures") or ["?"])[0]
    arch = _HF_ARCH.get(mt)
    if arch is None:
        raise ModelError(f"unsupported architecture {mt!r}; supported: {', '.join(ARCHS)}")
    act = d.get("hidden_act") if arch == "llama" else d.get("hidden_activation") or "gelu_pytorch_tanh"
    want = {"llama": ("silu",), "gemma2": ("gelu_pytorch_tanh", "gelu_tanh")}[arch]
    for key, bad in (("attention_bias", bool(d.get("attention_bias"))), ("mlp_bias", bool(d.get("mlp_bias"))),
                     ("hidden_act", (act or "silu") not in want),
                     ("partial_rotary_factor", float((d.get("rope_parameters") or {}).get(
                         "partial_rotary_factor", d.get("partial_rotary_factor", 1.0))) != 1.0)):
        if bad:
            raise ModelError(f"unsupported {mt} config.json: {key}={d.get(key, act)!r}")
    n_layers, H = int(d["num_hidden_layers"]), int(d["num_attention_heads"])
    head_dim = int(d.get("head_dim") or d["hidden_size"] // H)
    theta, scaling = _rope(d)
    common = dict(arch=arch, n_layers=n_layers, d_model=int(d["hidden_size"]), n_heads=H,
                  n_kv_heads=int(d.get("num_key_value_heads") or H), head_dim=head_dim,
                  ffn=int(d["intermediate_size"]), vocab_size=int(d["vocab_size"]),
                  rms_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling)
    if arch == "llama":
        return ModelConfig(**common, tie_embeddings=bool(d.get("tie_word_embeddings", False)))
    types = d.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                     for i in range(n_layers)]
    return ModelConfig(**common, tie_embeddings=True, sliding_window=d.get("sliding_window"),
                       sliding_layers=tuple(t == "sliding_attention" for t in types),
                       query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
                       attn_softcap=d.get("attn_logit_softcapping"),
                       final_softcap=d.get("final_logit_softcapping"))


def _num(x):
    """An integral float as int (transformers' strict configs want ints there)."""
    return int(x) if x is not None and float(x).is_integer() else x


def to_hf(c: ModelConfig) -> dict[str, Any]:
    """The transformers config dict of ``c`` (for tests building a reference model)."""
    d = dict(num_hidden_layers=c.n_layers, hidden_size=c.d_model, num_attention_heads=c.n_heads,
             num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, intermediate_size=c.ffn,
             vocab_size=c.vocab_size, rms_norm_eps=c.rms_eps, tie_word_embeddings=c.tie_embeddings,
             max_position_embeddings=4096)
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": c.rope_theta, **c.rope_scaling}
        rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
    d["rope_parameters"] = rope
    if c.arch == "gemma2":
        d.update(model_type="gemma2", sliding_window=c.sliding_window,
                 layer_types=["sliding_attention" if s else "full_attention" for s in c.sliding_layers],
                 query_pre_attn_scalar=_num(c.query_pre_attn_scalar), attn_logit_softcapping=c.attn_softcap,
                 final_logit_softcapping=c.final_softcap, hidden_activation="gelu_pytorch_tanh")
    else:
        d.update(model_type="llama", hidden_act="silu")
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
}
