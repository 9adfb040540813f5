"""Evaluation: reconstruction metrics, delta LM loss by splicing, latent cards, the evaluate stage.

A small stand-in language model (below) follows the saejax model contract, including the N*B
splice (N variants of one site in one pass, prefix shared), so these tests do not depend on the
model zoo; the numbers they check are exact properties (identity SAE: delta 0, CE score 1, KL 0;
zero SAE: CE score 0; chunked passes equal one pass).
"""
import json
import os
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

import saejax
import saejax.evaluate
import saejax.release
from saejax import config as cfg
from saejax.evaluate import metrics, splice
from saejax.sae import io as sae_io

D, V, L = 6, 13, 12
SPECIAL = (0, 1)  # 1 starts every context, 0 is a pad-like special token


class FakeLM:
    """tokens -> embeddings -> causal running mean h -> site res.0: a = 50 tanh(h W) -> logits (h + a/50) U."""

    name = "fake-lm"

    def __init__(self, seed=0):
        r = np.random.default_rng(seed)
        self.params = {"E": jnp.asarray(r.standard_normal((V, D)), jnp.float32),
                       "W": jnp.asarray(r.standard_normal((D, D)), jnp.float32),
                       "U": jnp.asarray(2 * r.standard_normal((D, V)), jnp.float32)}
        self.config = types.SimpleNamespace(vocab_size=V, d_model=D)
        self.tokenizer = types.SimpleNamespace(decode=lambda ids: "".join(chr(97 + i) for i in ids))
        self.context_start_id, self.special_ids = 1, SPECIAL

    def site_width(self, site):
        return D

    def apply(self, params, tokens, sites=(), logits=True, splice=None):
        B, n_pos = tokens.shape
        h = jnp.cumsum(params["E"][tokens], 1) / jnp.arange(1, n_pos + 1)[None, :, None]
        a = 50 * jnp.tanh(h @ params["W"])
        if splice and "res.0" in splice:
            a = splice["res.0"](a)
            h = jnp.tile(h, (a.shape[0] // B, 1, 1))  # N variants share the prefix
        return ((h + a / 50) @ params["U"]) if logits else None, ({"res.0": a} if "res.0" in sites else {})


def tokens_fixture(n=5, seed=0):
    r = np.random.default_rng(seed)
    t = r.integers(2, V, (n, L)).astype(np.int32)
    t[:, 0] = 1
    t[0, 5] = 0  # a special token mid-context
    t[1, -1] = 0  # a special target
    return t


def probe_group(norm_scale=0.037):
    """relu SAEs of one site: identity (latents [x, -x]), zero (no decoder), noisy, a dead latent."""
    eye = np.eye(D, dtype=np.float32)
    w_enc = np.concatenate([eye, -eye], 1)
    w_dec = np.concatenate([eye, -eye], 0)
    r = np.random.default_rng(5)
    arrays = {"W_enc": np.stack([w_enc, w_enc, w_enc]), "W_dec": np.stack([w_dec, 0 * w_dec, w_dec + 0.3 * r.standard_normal(w_dec.shape)]),
              "b_enc": np.zeros((3, 2 * D)), "b_dec": np.zeros((3, D))}
    arrays["b_enc"][2, 0] = -1e6  # member 2: latent 0 is dead
    arrays = {k: v[None].astype(np.float32) for k, v in arrays.items()}
    meta = {"arch": "relu", "sites": ["res.0"], "d": D, "width": 2 * D, "sparsity": [1.0, 2.0, 3.0], "k": [],
            "norm_scale": [norm_scale], "pre_encoder_bias": True, "frozen": [[False] * 3], "model": "fake-lm",
            "steps": 1, "tokens": 1}
    return arrays, meta


def test_identity_zero_and_noisy_sae_losses():
    model, tokens = FakeLM(), tokens_fixture()
    arrays, meta = probe_group()
    policy = splice.Policy(SPECIAL, skip_first=1)
    one = splice.site_losses(model, model.params, "res.0", meta, arrays, 0, tokens, policy, batch=8)
    ident, zero, noisy = one
    assert ident["ce_clean"] > 0 and abs(ident["ce_ablate"] - ident["ce_clean"]) > 0.1
    assert abs(ident["delta_lm_loss"]) < 1e-5 and abs(ident["ce_score"] - 1) < 1e-4 and abs(ident["kl"]) < 1e-6
    assert abs(zero["ce_score"]) < 1e-6 and abs(zero["kl"] - zero["kl_ablate"]) < 1e-6 and zero["kl"] > 0.01
    assert noisy["delta_lm_loss"] > 1e-3 and noisy["kl"] > 1e-4
    # CE positions: inputs p > skip_first, not special; targets not special; counted by hand.
    want = sum(1 for b in range(len(tokens)) for p in range(L - 1)
               if p > 1 and tokens[b, p] not in SPECIAL and tokens[b, p + 1] not in SPECIAL)
    assert ident["ce_positions"] == want
    # One SAE per pass and padded context batches give the same numbers as all in one pass.
    per = splice.variant_bytes(L, V, 2 * D, D)
    assert splice.plan(3, 8, L, V, 2 * D, D, 12 * per) == (2, 3)  # all 5 variants, as many contexts as fit
    budget = 3 * per  # room for clean, zero and one SAE of one context
    assert splice.plan(3, 2, L, V, 2 * D, D, budget) == (1, 1)
    chunked = splice.site_losses(model, model.params, "res.0", meta, arrays, 0, tokens, policy, batch=2,
                                 budget=budget)
    for a, b in zip(one, chunked):
        for key in ("ce_sae", "ce_clean", "ce_ablate", "kl"):
            assert abs(a[key] - b[key]) < 1e-5, key


def test_splice_only_at_kept_positions():
    model, tokens = FakeLM(), tokens_fixture()
    arrays, meta = probe_group()
    folded = {k: jnp.asarray(v[0:1, 1:2]) for k, v in arrays.items()}  # the zero SAE
    act = model.apply(model.params, jnp.asarray(tokens), sites=("res.0",), logits=False)[1]["res.0"]
    policy = splice.Policy(SPECIAL, skip_first=2, max_norm=float(np.median(np.linalg.norm(act, axis=-1))))
    keep = splice.token_keep(jnp.asarray(tokens), policy) & (jnp.linalg.norm(act, axis=-1) <= policy.max_norm)
    out = np.asarray(splice.variants("relu", None, folded, 0.037, act, keep)).reshape(3, *act.shape)
    np.testing.assert_array_equal(out[0], act)  # clean
    keep = np.asarray(keep)
    assert keep.sum() > 5 and (~keep).sum() > 5 and not keep[:, :3].any() and not keep[0, 5]
    for v in (1, 2):  # zero ablation and the zero SAE: zero where kept, clean elsewhere
        np.testing.assert_array_equal(out[v][~keep], np.asarray(act)[~keep])
        assert np.all(out[v][keep] == 0)


def test_site_metrics_and_top_activations_against_numpy():
    arrays, meta = probe_group(norm_scale=0.5)
    x = np.random.default_rng(1).standard_normal((300, D)).astype(np.float32) * 2
    out, density = metrics.site_metrics(meta, arrays, 0, x, chunk=128, return_density=True)
    xn = x * 0.5
    var = np.sum((xn - xn.mean(0)) ** 2)
    assert out[0]["fvu"] < 1e-10 and abs(out[0]["l0"] - D) < 1e-9 and out[0]["dead_frac"] == 0
    assert abs(out[1]["fvu"] - np.sum(xn ** 2) / var) < 1e-5
    assert abs(out[2]["dead_frac"] - 1 / (2 * D)) < 1e-12 and density[2, 0] == 0
    assert abs(out[0]["dense_10pct"] - 1.0) < 1e-12  # every latent of [x, -x] fires on ~half the rows
    assert sum(out[0]["density_hist"]["counts"]) == 2 * D
    lat = np.array([[0, 3], [1, 7], [0, 2]])
    vals, idx = metrics.top_activations(meta, arrays, 0, x, lat, n_top=5, chunk=64)
    f = np.maximum(np.concatenate([xn, -xn], 1), 0)
    for k in range(3):
        for s in range(2):
            col = f[:, lat[k, s]] if not (k == 2 and lat[k, s] == 0) else np.zeros(len(x))
            np.testing.assert_allclose(vals[k, s], np.sort(col)[::-1][:5], rtol=1e-6)
            if col.max() > 0:
                assert set(idx[k, s]) == set(np.argsort(-col)[:5])


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A store harvested from FakeLM (held-out split only matters here) and one trained group."""
    from saejax.store import write_store
    model = FakeLM()
    fake = types.ModuleType("saejax.models")
    fake.load = lambda source, dtype="float32": model
    monkeypatch.setitem(sys.modules, "saejax.models", fake)
    monkeypatch.setattr(saejax, "models", fake, raising=False)
    tokens = tokens_fixture(6)
    act = np.asarray(model.apply(model.params, jnp.asarray(tokens), sites=("res.0",), logits=False)[1]["res.0"])
    keep = np.asarray(splice.token_keep(jnp.asarray(tokens), splice.Policy(SPECIAL, 0)))
    b, p = np.nonzero(keep)
    ctx = np.arange(100, 106)
    meta_rows = np.stack([tokens[b, p], ctx[b], p], 1).astype(np.int32)
    write_store(str(tmp_path / "store"), {"train": {"res.0": (act[b, p], meta_rows)},
                                          "heldout": {"res.0": (act[b, p], meta_rows)}},
                model=model.name, context_len=L, context_start_id=1, special_ids=SPECIAL,
                heldout_tokens=tokens, heldout_contexts=ctx)
    arrays, meta = probe_group()
    sae_io.save_group(str(tmp_path / "train" / "relu_d6_w12" / "final"), arrays, meta)
    c = cfg.defaults()
    c.workdir = str(tmp_path)
    c.model.source = "random:fake"
    c.evaluate.contexts = 5
    c.evaluate.batch_contexts = 4
    c.evaluate.latent_cards = 3
    return c


def test_evaluate_then_release_end_to_end(workdir, capsys):
    c = workdir
    assert not saejax.evaluate.is_complete(c)
    doc = saejax.evaluate.run(c)
    assert saejax.evaluate.is_complete(c)
    assert "CEscore" in capsys.readouterr().out
    with open(os.path.join(c.workdir, "evaluate", "results.json")) as fh:
        saved = json.load(fh)
    assert saved["contexts"] == 5 and len(saved["saes"]) == 3 and saved == json.loads(json.dumps(doc))
    ident, zero, _ = saved["saes"]
    assert ident["fvu"] < 1e-10 and abs(ident["ce_score"] - 1) < 1e-4 and abs(zero["ce_score"]) < 1e-6
    html = open(os.path.join(c.workdir, "evaluate", ident["card"])).read()
    assert html.count("<h2>latent") == 3 and '<span class="hit">' in html
    suite = saejax.release.run(c)
    assert "res.0__relu_d6_w12__1 not released" in capsys.readouterr().err  # zero SAE: same L0, worse FVU
    assert len(suite["saes"]) in (1, 2) and all(os.path.isfile(os.path.join(c.workdir, "release", e["card"]))
                                           for e in suite["saes"])
    sae = saejax.load_suite(os.path.join(c.workdir, "release")).get("res.0", l0=ident["l0"])
    x = np.random.default_rng(0).standard_normal((10, D)).astype(np.float32) * 40
    np.testing.assert_allclose(np.asarray(sae(x)), x, rtol=1e-5, atol=1e-4)  # the identity, on raw x


def test_missing_inputs_are_named(tmp_path):
    c = cfg.defaults()
    c.workdir = str(tmp_path)
    with pytest.raises(saejax.evaluate.EvaluateError, match=f"{tmp_path}/train"):
        saejax.evaluate.run(c)
    arrays, meta = probe_group()
    sae_io.save_group(str(tmp_path / "train" / "g" / "final"), arrays, meta)
    with pytest.raises(saejax.evaluate.EvaluateError, match=f"no activation store at {tmp_path}/store"):
        saejax.evaluate.run(c)
    assert not os.path.exists(tmp_path / "evaluate")


@pytest.mark.parametrize("site", ["att.1", "res.0"])
def test_identity_sae_in_a_real_tiny_model(site):
    """The same exact properties through saejax.models' transformer (its N*B splice, its sites)."""
    from saejax import models
    model = models.load("random:tiny-llama")
    w = model.site_width(site)
    eye = np.eye(w, dtype=np.float32)
    arrays = {"W_enc": np.stack([np.concatenate([eye, -eye], 1)] * 2)[None],
              "W_dec": np.stack([np.concatenate([eye, -eye], 0), np.zeros((2 * w, w), np.float32)])[None],
              "b_enc": np.zeros((1, 2, 2 * w), np.float32), "b_dec": np.zeros((1, 2, w), np.float32)}
    meta = {"arch": "relu", "sites": [site], "d": w, "width": 2 * w, "sparsity": [1.0, 2.0], "k": [],
            "norm_scale": [0.2], "pre_encoder_bias": False}
    tokens = np.random.default_rng(0).integers(3, model.config.vocab_size, (3, 16)).astype(np.int32)
    tokens[:, 0] = model.context_start_id
    policy = splice.Policy(tuple(model.special_ids), skip_first=0)
    ident, zero = splice.site_losses(model, model.params, site, meta, arrays, 0, tokens, policy, batch=2)
    assert abs(ident["ce_ablate"] - ident["ce_clean"]) > 1e-3
    assert abs(ident["delta_lm_loss"]) < 1e-5 and abs(ident["ce_score"] - 1) < 1e-3 and ident["kl"] < 1e-6
    assert abs(zero["ce_score"]) < 1e-6


def test_cross_site_sae_losses_in_a_real_tiny_model():
    """read=: the SAEs encode mlp_in.1 of the same pass and write mlp.1. An identity SAE then writes
    mlp_in.1 * 0.05 / 0.3 (at kept positions) over mlp.1: its CE equals that of the model spliced directly so; a
    zero decoder equals zero ablation; a position the read site's norm policy drops keeps mlp.1.
    Scales: the SAE sees mlp_in.1 * 0.05, its output is divided by mlp.1's 0.3."""
    from saejax import models
    model = models.load("random:tiny-llama")
    d = model.config.d_model
    eye = np.eye(d, dtype=np.float32)
    arrays = {"W_enc": np.stack([np.concatenate([eye, -eye], 1)] * 2)[None],
              "W_dec": np.stack([np.concatenate([eye, -eye], 0), np.zeros((2 * d, d), np.float32)])[None],
              "b_enc": np.zeros((1, 2, 2 * d), np.float32), "b_dec": np.zeros((1, 2, d), np.float32)}
    meta = {"arch": "relu", "sites": ["mlp.1"], "d": d, "width": 2 * d, "sparsity": [1.0, 2.0], "k": [],
            "norm_scale": [0.3], "pre_encoder_bias": False}
    tokens = np.random.default_rng(0).integers(3, model.config.vocab_size, (3, 16)).astype(np.int32)
    tokens[:, 0] = model.context_start_id
    _, acts = model.forward_fn(("mlp_in.1",), False)(model.params, jnp.asarray(tokens))
    norms = np.linalg.norm(np.asarray(acts["mlp_in.1"]), axis=-1)
    for read_max in (0.0, float(np.median(norms[:, 1:]))):
        policy = splice.Policy(tuple(model.special_ids), skip_first=0, read_max_norm=read_max)
        ident, zero = splice.site_losses(model, model.params, "mlp.1", meta, arrays, 0, tokens, policy,
                                         batch=2, read="mlp_in.1", read_scale=0.05)
        keep = np.asarray(splice.token_keep(jnp.asarray(tokens), policy)) & ((norms <= read_max) | (read_max == 0))
        write = model.forward_fn((), True, {"mlp.1": (lambda a, r, k=jnp.asarray(keep): jnp.where(
            k[:, :, None], r["mlp_in.1"] * (0.05 / 0.3), a), ("mlp_in.1",))})  # D(E(r s_r)) / s
        lg = np.asarray(write(model.params, jnp.asarray(tokens))[0], np.float64)[:, :-1]
        logp = lg - lg.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        cm = np.asarray(splice.ce_mask(jnp.asarray(tokens), policy))
        assert ident["ce_sae"] == pytest.approx(float(nll[cm].mean()), abs=1e-5)
        assert abs(ident["delta_lm_loss"]) > 1e-2  # mlp_in is not mlp: the read site is what got encoded
        assert zero["ce_sae"] == pytest.approx(zero["ce_ablate"], abs=1e-6)
    assert 0 < (~keep[:, 1:]).sum() < keep[:, 1:].size  # the read policy bit in the last round


def _transcoders(d, layers, zero_member=False, seed=0):
    """A random topk skip-transcoder group on ``layers`` (mlp_in.L -> mlp.L), members k = 4 and 8;
    with ``zero_member`` member 1's W_dec, b_dec and W_skip are zeros."""
    r = np.random.default_rng(seed)
    T, K, M = len(layers), 2, 32
    arrays = {"W_enc": r.standard_normal((T, K, d, M)) / np.sqrt(d), "b_enc": 0.1 * r.standard_normal((T, K, M)),
              "W_dec": r.standard_normal((T, K, M, d)) / np.sqrt(M), "b_dec": 0.1 * r.standard_normal((T, K, d)),
              "W_skip": 0.3 * r.standard_normal((T, K, d, d)) / np.sqrt(d)}
    if zero_member:
        for k in ("W_dec", "b_dec", "W_skip"):
            arrays[k][:, 1] = 0.0
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    meta = {"arch": "topk", "sites": [f"mlp.{l}" for l in layers], "reads": [f"mlp_in.{l}" for l in layers],
            "d": d, "d_out": d, "skip": True, "width": M, "sweep": [4.0, 8.0], "k": [4, 8],
            "norm_scale": [0.3 + 0.1 * l for l in layers], "read_norm_scale": [0.05 * (l + 1) for l in layers],
            "pre_encoder_bias": False}
    return arrays, meta


def _tiny_tokens(model, n=3, length=16):
    tokens = np.random.default_rng(0).integers(3, model.config.vocab_size, (n, length)).astype(np.int32)
    tokens[:, 0] = model.context_start_id
    return tokens


def test_transcoder_replacement_of_one_layer_equals_its_splice():
    """A one-layer group's all-at-once replacement is site_losses' splice of that transcoder (two
    code paths: same member, same positions, skip term and norm scales): delta LM loss and KL to 1e-5."""
    from saejax import models
    model = models.load("random:tiny-llama")
    arrays, meta = _transcoders(model.config.d_model, (1,))
    tokens = _tiny_tokens(model)
    policy = splice.Policy(tuple(model.special_ids), skip_first=1)
    per = splice.site_losses(model, model.params, "mlp.1", meta, arrays, 0, tokens, policy, batch=2,
                             read="mlp_in.1", read_scale=meta["read_norm_scale"][0])
    for k in range(2):
        rep = splice.transcoder_replacement_losses(model, model.params, meta, arrays, tokens, policy, k, batch=2)
        assert abs(per[k]["delta_lm_loss"]) > 1e-3 and rep["ce_positions"] == per[k]["ce_positions"]
        for key in ("delta_lm_loss", "kl", "ce_clean", "ce_ablate"):
            assert rep[key] == pytest.approx(per[k][key], abs=1e-5), key
    assert per[0]["delta_lm_loss"] != pytest.approx(per[1]["delta_lm_loss"], abs=1e-4)  # the members differ


def test_transcoder_replacement_of_two_layers_compounds():
    """A two-layer group: every MLP replaced at once differs from either single splice (layer 1 reads
    the mlp_in that layer 0's replacement produced) and is finite; a member with zero decoder, bias and
    skip gives exactly the zero-ablation CE (CE score 0)."""
    from saejax import models
    model = models.load("random:tiny-llama")
    arrays, meta = _transcoders(model.config.d_model, (0, 1), zero_member=True)
    tokens = _tiny_tokens(model)
    policy = splice.Policy(tuple(model.special_ids), skip_first=0)
    rep, zero = (splice.transcoder_replacement_losses(model, model.params, meta, arrays, tokens, policy, k, batch=2)
                 for k in (0, 1))
    assert np.isfinite([rep["delta_lm_loss"], rep["kl"], rep["ce_score"]]).all() and rep["kl"] > 0
    for t, site in enumerate(meta["sites"]):
        one = splice.site_losses(model, model.params, site, meta, arrays, t, tokens, policy, batch=2,
                                 read=meta["reads"][t], read_scale=meta["read_norm_scale"][t])[0]
        assert abs(rep["delta_lm_loss"] - one["delta_lm_loss"]) > 1e-3 and abs(rep["kl"] - one["kl"]) > 1e-4
    assert zero["ce_replacement"] == zero["ce_ablate"] and zero["ce_score"] == 0.0
    assert zero["ce_clean"] == rep["ce_clean"] and zero["ce_ablate"] != zero["ce_clean"]


def test_store_from_another_model_is_refused(workdir):
    sys.modules["saejax.models"].load = lambda source, dtype="float32": types.SimpleNamespace(name="other-model")
    with pytest.raises(saejax.evaluate.EvaluateError, match="harvested from model 'fake-lm'.*'other-model'"):
        saejax.evaluate.run(workdir)
    assert not os.path.exists(os.path.join(workdir.workdir, "evaluate"))


def test_synthetic_runs_get_reconstruction_metrics_only(tmp_path):
    c = cfg.defaults()
    c.workdir = str(tmp_path)
    c.train.source = "synthetic"
    c.synthetic.sites, c.synthetic.d = 1, D
    arrays, meta = probe_group()
    sae_io.save_group(str(tmp_path / "train" / "relu_d6_w12" / "final"), arrays, meta)
    doc = saejax.evaluate.run(c)
    ident, zero, _ = doc["saes"]
    assert ident["fvu"] < 1e-10 and zero["fvu"] > 0.5 and ident.get("delta_lm_loss") is None
    assert doc["synthetic"] and saejax.evaluate.is_complete(c)


def test_matryoshka_groups_report_fvu_per_prefix():
    """Each prefix's FVU: its first m latents alone, against numpy."""
    arrays, meta = probe_group(norm_scale=0.5)
    meta = dict(meta, matryoshka=[3, D, 2 * D])
    x = np.random.default_rng(2).standard_normal((200, D)).astype(np.float32)
    out = metrics.site_metrics(meta, arrays, 0, x, chunk=64)
    xn = x * 0.5
    var = np.sum((xn - xn.mean(0)) ** 2)
    for k in range(3):
        w_enc, w_dec = arrays["W_enc"][0, k], arrays["W_dec"][0, k]
        b_enc = arrays["b_enc"][0, k] - arrays["b_dec"][0, k] @ w_enc  # pre-encoder bias
        f = np.maximum(xn @ w_enc + b_enc, 0)
        for m in meta["matryoshka"]:
            want = np.sum((f[:, :m] @ w_dec[:m] + arrays["b_dec"][0, k] - xn) ** 2) / var
            assert abs(out[k]["fvu_prefix"][str(m)] - want) < 1e-5 * max(1, want), (k, m)
        assert out[k]["fvu_prefix"][str(2 * D)] == pytest.approx(out[k]["fvu"], rel=1e-5)
    assert out[0]["fvu_prefix"][str(D)] > 0.3 > out[0]["fvu"]  # the identity needs both halves


SPLICE_KEYS = {"ce_clean", "ce_sae", "ce_ablate", "delta_lm_loss", "ce_score", "kl", "kl_ablate", "ce_positions"}


def _counting_splices(monkeypatch):
    """The sites splice.site_losses is called for (evaluate calls it through the module)."""
    calls = []
    real = splice.site_losses
    monkeypatch.setattr(splice, "site_losses", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    return calls


def test_splice_off_skips_only_the_splice_pass_and_release_omits_its_metrics(workdir, monkeypatch, capsys):
    """evaluate.splice = False: the per-site splice is never called; every other number of results.json
    and every card are those of the spliced run, exactly; the splice keys are absent; a spliced run is
    then not complete for a config that wants them; the table and the release's README leave the
    splice columns and plot out, suite.json's splice metrics are null, the weights are the same."""
    c = workdir
    calls = _counting_splices(monkeypatch)
    saejax.evaluate.run(c)
    assert calls == ["res.0"]
    ev = os.path.join(c.workdir, "evaluate")
    on = json.load(open(os.path.join(ev, "results.json")))
    on_cards = {e["card"]: open(os.path.join(ev, e["card"])).read() for e in on["saes"]}
    on_suite = saejax.release.run(c)
    on_npz = {e["path"]: open(os.path.join(c.workdir, "release", e["path"]), "rb").read() for e in on_suite["saes"]}
    capsys.readouterr()
    c.evaluate.splice = False
    assert saejax.evaluate.is_complete(c)  # a spliced result has everything an unspliced run wants
    saejax.evaluate.run(c)
    assert calls == ["res.0"]  # not called again
    out = capsys.readouterr().out
    assert "FVU" in out and "dLM" not in out and "CEscore" not in out
    off = json.load(open(os.path.join(ev, "results.json")))
    assert off["splice"] is False and "splice" not in on
    assert {k: v for k, v in off.items() if k not in ("saes", "splice")} == \
        {k: v for k, v in on.items() if k != "saes"}
    assert len(off["saes"]) == len(on["saes"]) == 3
    for a, b in zip(off["saes"], on["saes"]):
        assert SPLICE_KEYS <= set(b) and not SPLICE_KEYS & set(a)
        assert a == {k: v for k, v in b.items() if k not in SPLICE_KEYS}
        assert open(os.path.join(ev, a["card"])).read() == on_cards[a["card"]]
    assert saejax.evaluate.is_complete(c)
    c.evaluate.splice = True
    assert not saejax.evaluate.is_complete(c)  # saejax run would evaluate again, spliced
    c.evaluate.splice = False
    suite = saejax.release.run(c)
    rel = os.path.join(c.workdir, "release")
    assert [e["path"] for e in suite["saes"]] == list(on_npz)
    for e, e_on in zip(suite["saes"], on_suite["saes"]):
        assert open(os.path.join(rel, e["path"]), "rb").read() == on_npz[e["path"]]
        assert all(e["metrics"][k] is None for k in SPLICE_KEYS - {"ce_positions"})
        assert e["metrics"]["delta_lm_loss"] is None and e_on["metrics"]["delta_lm_loss"] is not None
        assert {k: v for k, v in e["metrics"].items() if v is not None} == \
            {k: v for k, v in e_on["metrics"].items() if k not in SPLICE_KEYS}
    assert not os.path.exists(os.path.join(rel, "delta_loss.png")) and os.path.isfile(os.path.join(rel, "l0_fvu.png"))
    readme = open(os.path.join(rel, "README.md")).read()
    assert "delta_loss.png" not in readme and "| delta LM loss |" not in readme and "no delta LM loss" in readme
    row = next(line for line in readme.splitlines() if line.startswith("| res.0 "))
    assert row.count("|") == readme.splitlines()[readme.splitlines().index(row) - 1].count("|") == 9


def test_splice_off_still_measures_transcoders_and_their_replacement_model(workdir, monkeypatch):
    """A transcoder group with evaluate.splice = False and evaluate.replacement = True: its held-out
    metrics and the replacement models (one per member) are computed, no per-site splice is."""
    from saejax.store import write_store
    c = workdir
    c.evaluate.splice, c.evaluate.replacement = False, True
    model = sys.modules["saejax.models"].load("")
    tokens = tokens_fixture(6)
    act = np.asarray(model.apply(model.params, jnp.asarray(tokens), sites=("res.0",), logits=False)[1]["res.0"])
    b, p = np.nonzero(np.asarray(splice.token_keep(jnp.asarray(tokens), splice.Policy(SPECIAL, 0))))
    rows = np.stack([tokens[b, p], 100 + b, p], 1).astype(np.int32)
    x, y = act[b, p], np.tanh(act[b, p] / 50)
    split = {"mlp_in.0": (x, rows), "mlp.0": (y, rows)}
    store = os.path.join(c.workdir, "tc_store")
    write_store(store, {"train": split, "heldout": split}, model=model.name, context_len=L, context_start_id=1,
                special_ids=SPECIAL, heldout_tokens=tokens, heldout_contexts=np.arange(100, 106),
                pairs=[("mlp_in.0", "mlp.0")])
    c.harvest.store_dir = store
    arrays, meta = _transcoders(D, (0,))
    import shutil
    shutil.rmtree(os.path.join(c.workdir, "train"))
    sae_io.save_group(os.path.join(c.workdir, "train", "topk_tc", "final"), arrays, meta)
    spliced = _counting_splices(monkeypatch)
    replaced = []
    monkeypatch.setattr(splice, "transcoder_replacement_losses", lambda *a, **kw: replaced.append(a[-1])
                        or {"delta_lm_loss": 0.5 + a[-1], "ce_score": 0.9, "kl": 0.1})
    doc = saejax.evaluate.run(c)
    assert spliced == [] and replaced == [0, 1]
    tc = doc["saes"]
    assert [e["site"] for e in tc] == ["transcoder.0"] * 2 and all(e["fvu"] > 0 and e["l0"] > 0 for e in tc)
    assert not SPLICE_KEYS & set(tc[0]) and doc["splice"] is False
    assert [(r["member"], r["delta_lm_loss"], r["l0_total"]) for r in doc["replacements"]] == \
        [(k, 0.5 + k, tc[k]["l0"]) for k in range(2)]
    assert saejax.evaluate.is_complete(c)
    c.evaluate.replacement = False
    saejax.evaluate.run(c)
    assert saejax.evaluate.is_complete(c)
    c.evaluate.replacement = True  # saejax run would evaluate again, with the replacement models
    assert not saejax.evaluate.is_complete(c)
