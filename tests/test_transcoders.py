"""Transcoders and skip-transcoders (docs/sae.md): read mlp_in.L, reconstruct mlp.L.

Planted-map recovery on synthetic pairs, W_skip recovery, stacked = separate, 1 device = 8 devices,
the release fold against the training module, and round trips through Gemma Scope's layouts, SAELens,
circuit-tracer and ``load_suite`` (a tiny Gemma 2 for Gemma Scope's pre-gain transcoders).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import config as cfg
from saejax import mesh as meshlib
from saejax.data.synthetic import SyntheticPairs
from saejax.release import ReleaseError, fold, load_suite
from saejax.release import gemmascope as gs
from saejax.sae import io as sae_io
from saejax.sae.group import GroupSpec, SAEGroup
from saejax.train import loop, optim
from saejax.train.trainer import Trainer, to_host

SYNTH = os.path.join(os.path.dirname(__file__), "..", "experiments", "synthetic.py")


def _one_device():
    return meshlib.make_mesh(dict(data=1, stack=1, latent=1), jax.devices()[:1])


def _spec(arch="topk", layers=(0,), skip=False, d=32, width=128, sweep=None):
    sweep = sweep or ((3.0,) if arch in ("topk", "batchtopk") else (0.003,))
    return GroupSpec(arch=arch, sites=tuple(f"mlp.{i}" for i in layers), reads=tuple(f"mlp_in.{i}" for i in layers),
                     d=d, d_out=d, skip=skip, width=width, sweep=sweep, auxk_k=32,
                     encoder_init_scale=d / width if arch == "jumprelu" else 1.0)


def _hp(steps, **kw):
    return optim.Hyper(total_steps=steps, batch_size=kw.pop("batch_size", 1024), lr=3e-3, lr_warmup=steps // 20,
                       sparsity_warmup=steps // 3, dead_steps=100, **kw)


def test_transcoder_recovers_a_planted_sparse_map():
    """y = c @ F_out for the code c of x = c @ F_in: the decoder rows find F_out's rows."""
    src = SyntheticPairs((0,), d=16, n_features=32, active=2, zipf=0.0, noise=0.0, seed=0)
    state = loop.train_group(_spec(d=16, width=64, sweep=(2.0,)), _hp(600, batch_size=512), src, _one_device(),
                             progress=False)
    w = np.array(state["params"]["W_dec"][0, 0])
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    best = (src.features("mlp.0") @ w.T).max(1)  # each planted output direction's best decoder row
    assert np.mean(best > 0.9) >= 0.9, np.sort(best)[:10]


def test_skip_transcoder_recovers_the_planted_linear_part():
    """x has a dense part z outside the features' span; y adds z @ A: W_skip's rows on z's dimensions
    are A (in raw units)."""
    dense = 4
    src = SyntheticPairs((0,), d=16, n_features=32, active=2, zipf=0.0, noise=0.0, seed=0, dense=dense)
    state = loop.train_group(_spec(skip=True, d=16, width=64, sweep=(2.0,)), _hp(1500, batch_size=512), src,
                             _one_device(), progress=False)
    w_skip = np.asarray(state["params"]["W_skip"][0, 0])[-dense:] * src.norm_scale("mlp_in.0") / src.norm_scale("mlp.0")
    a = src.linear_map(0)
    err = np.linalg.norm(w_skip - a) / np.linalg.norm(a)
    assert err < 0.05, err


def _pairs_batch(src, spec, step=0, batch=256):
    t = Trainer(spec, _hp(10, batch_size=batch), _one_device())
    return t, t.put_batch(t.local_batch(src, step, t.norm_scales(src)))


@pytest.mark.parametrize("arch,skip", [("jumprelu", True), ("batchtopk", False)])
def test_stacked_equals_separate(arch, skip):
    """Two layers x two sweep members of transcoders in one group train as each alone, from the same
    initial values (10 steps, within 1e-5)."""
    from saejax.train.step import init_state
    src = SyntheticPairs((0, 1), d=16, n_features=32, active=3, seed=1, dense=4)
    hp = _hp(10, batch_size=256)
    sweep = (3.0, 6.0) if arch != "jumprelu" else (0.003, 0.01)
    spec = _spec(arch, (0, 1), skip, d=16, width=64, sweep=sweep)
    state = to_host(init_state(spec, hp, jax.random.key(3)))  # host copies: the step donates its state
    both = to_host(loop.train_group(spec, hp, src, _one_device(), progress=False,
                                    state=jax.tree_util.tree_map(jnp.asarray, state)))
    moved = 0.0
    for t, layer in enumerate((0, 1)):
        for k in range(2):
            one = _spec(arch, (layer,), skip, d=16, width=64, sweep=(sweep[k],))
            s1 = jax.tree_util.tree_map(lambda a: a[t:t + 1, k:k + 1] if a.ndim >= 2 and a.shape[:2] == (2, 2) else a,
                                        state)
            s1 = jax.tree_util.tree_map(jnp.asarray, s1)
            s1["opt_state"] = optim.optimizer(hp).init(s1["params"])
            got = to_host(loop.train_group(one, hp, src, _one_device(), progress=False, state=s1))
            for name, v in got["params"].items():
                np.testing.assert_allclose(both["params"][name][t, k], v[0, 0], rtol=1e-5, atol=1e-6,
                                           err_msg=f"{arch} {name} layer {layer} member {k}")
    if skip:
        assert np.abs(both["params"]["W_skip"]).max() > 1e-3  # the skip term trained


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_eight_devices_match_one(arch):
    """A skip-transcoder group on stack 2 x data 2 x latent 2 (W_skip replicated over latent) takes
    the single-device steps."""
    src = SyntheticPairs((0, 1, 2, 3), d=16, n_features=32, active=3, seed=2, dense=4)
    spec, hp = _spec(arch, (0, 1, 2, 3), True, d=16, width=64), _hp(5, batch_size=256)
    out = {}
    for name, sizes, n in (("one", dict(data=1, stack=1, latent=1), 1), ("eight", dict(data=2, stack=2, latent=2), 8)):
        mesh = meshlib.make_mesh(sizes, jax.devices()[:n])
        out[name] = to_host(loop.train_group(spec, hp, src, mesh, progress=False)["params"])
    for k in out["one"]:
        np.testing.assert_allclose(out["eight"][k], out["one"][k], rtol=1e-4, atol=hp.lr / 100, err_msg=k)
    assert np.abs(out["one"]["W_skip"]).max() > 0


def test_fold_matches_the_training_module():
    """The folded transcoder on raw rows gives the training module's reconstruction / s_out, with
    two different scales and a skip term."""
    spec = _spec("jumprelu", (0,), True, d=16, width=64)
    params = jax.tree_util.tree_map(np.asarray, SAEGroup(spec).init(jax.random.key(0), jnp.zeros((1, 1, 16)))["params"])
    r = np.random.default_rng(0)
    params = {k: (v + 0.1 * r.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()}
    params["log_threshold"] = np.log(np.full_like(params["log_threshold"], 0.05))
    s_in, s_out = 0.37, 2.9
    x_raw = r.standard_normal((200, 16)).astype(np.float32)
    _, f, y_hat = SAEGroup(spec).apply({"params": params}, jnp.asarray(x_raw * s_in)[None], None, False)
    arrays = sae_io.export_params("jumprelu", params, np.zeros((1, 1)))
    meta = {"arch": "jumprelu", "sites": ["mlp.0"], "reads": ["mlp_in.0"], "norm_scale": [s_out],
            "read_norm_scale": [s_in], "k": [], "pre_encoder_bias": False}
    folded, arch, _ = fold.group_sae(arrays, meta, 0, 0)
    from saejax.release.sae import SAE
    sae = SAE(arch=arch, arrays={k: jnp.asarray(v) for k, v in folded.items()}, site="mlp.0", reads="mlp_in.0")
    assert 0 < np.mean(np.asarray(f) > 0) < 0.9
    np.testing.assert_allclose(np.asarray(sae.encode(x_raw)), np.asarray(f)[0, 0] / s_in, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sae(x_raw)), np.asarray(y_hat)[0, 0] / s_out, rtol=1e-4, atol=1e-5)
    no_skip = fold.fold({k: v[0, 0] for k, v in arrays.items() if k != "W_skip"}, s_in, False, s_out)
    assert not np.allclose(np.asarray(SAE(arch=arch, arrays={k: jnp.asarray(v) for k, v in no_skip.items()})(x_raw)),
                           np.asarray(sae(x_raw)), atol=1e-3)  # the skip term matters


def test_config_keys():
    base = [f"--config.workdir=/tmp/x", "--config.train.source=store"]
    with pytest.raises(cfg.ConfigError, match=r"sae.transcoders.*needs site 'mlp_in.12' harvested"):
        cfg.load(SYNTH, base + ["--config.sae.transcoders=(12,)"])
    with pytest.raises(cfg.ConfigError, match=r"sae.pre_encoder_bias.*transcoders take no pre-encoder bias"):
        cfg.load(SYNTH, ["--config.sae.transcoders=(0,)", "--config.sae.pre_encoder_bias=True"])
    with pytest.raises(cfg.ConfigError, match=r"sae.skip.*need sae.transcoders"):
        cfg.load(SYNTH, ["--config.sae.skip=True"])
    c = cfg.load(SYNTH, base + ["--config.sae.transcoders=(12,)", "--config.harvest.kinds=('res','mlp_in','mlp')"])
    assert cfg.pairs(c) == [("mlp_in.12", "mlp.12")]


def _synthetic_run(tmp_path, arch, skip, formats):
    """train -> evaluate -> release of transcoders on layers 0 and 1 of synthetic pairs."""
    from saejax import evaluate, release
    sweep = "(4.0,)" if arch != "jumprelu" else "(0.03,)"
    c = cfg.load(f"{SYNTH}:runlocal", [f"--config.workdir={tmp_path}", f"--config.sae.arch={arch}",
                                       "--config.sae.transcoders=(0, 1)", f"--config.sae.skip={skip}",
                                       "--config.sae.site_kinds=()", "--config.sae.widths=(64,)",
                                       f"--config.sae.sparsity={sweep}", "--config.synthetic.d=16",
                                       "--config.synthetic.n_features=32", "--config.synthetic.dense=4",
                                       "--config.sae.encoder_init_scale=0.25", "--config.train.tokens=51200",
                                       "--config.train.batch_size=512", f"--config.release.formats={formats}"])
    finals = loop.run(c)
    assert [os.path.basename(os.path.dirname(f)) for f in finals] == \
        [f"{'skip_' if skip else ''}transcoder_{arch}_d16_16_w64"]
    evaluate.run(c)
    return c, finals[0]


@pytest.fixture(scope="module", params=[("jumprelu", True), ("batchtopk", False)])
def released(request, tmp_path_factory):
    from saejax import release
    arch, skip = request.param
    tmp = tmp_path_factory.mktemp(f"tc_{arch}")
    c, final = _synthetic_run(tmp, arch, skip, "('gemmascope','saelens','circuit_tracer')")
    release.run(c)
    return c, final, skip


def _reference(c, final, layer, n=64):
    """Raw rows (x of mlp_in.L, the training module's y_hat of mlp.L in raw units)."""
    from saejax.sources import synthetic_source
    arrays, meta = sae_io.load_group(final)
    src = synthetic_source(c)
    t = meta["reads"].index(f"mlp_in.{layer}")
    x = src.batch([f"mlp_in.{layer}"], 10 ** 6, n)[0].astype(np.float32)
    s_in, s_out = meta["read_norm_scale"][t], meta["norm_scale"][t]
    spec = GroupSpec(arch=meta["arch"], sites=(meta["sites"][t],), reads=(meta["reads"][t],), d=16, d_out=16,
                     skip=meta["skip"], width=64, sweep=tuple(meta["sweep"]))
    from saejax.release.fold import group_sae
    folded, _, _ = group_sae(arrays, meta, t, 0)
    params = {k: jnp.asarray(v[t:t + 1]) for k, v in arrays.items()}
    if meta["arch"] == "jumprelu":
        params["threshold"] = params["threshold"]
    return x, folded, s_in, s_out, spec


def test_evaluate_reports_output_fvu(released):
    c, final, skip = released
    from saejax import workdir as wd
    doc = json.load(open(wd.results_path(c)))
    rows = {r["site"]: r for r in doc["saes"]}
    assert set(rows) == {"transcoder.0", "transcoder.1"}
    from saejax.evaluate import SYNTHETIC_ROWS, SYNTHETIC_STEP
    from saejax.sources import synthetic_source
    src = synthetic_source(c)
    for layer in (0, 1):
        r = rows[f"transcoder.{layer}"]
        assert (r["reads"], r["writes"], r["skip"]) == (f"mlp_in.{layer}", f"mlp.{layer}", skip)
        # FVU of the output site's held-out rows, by the released (folded) transcoder on raw rows
        _, folded, _, _, _ = _reference(c, final, layer)
        x, y = (src.batch([s], SYNTHETIC_STEP, SYNTHETIC_ROWS)[0].astype(np.float64) for s in (r["reads"], r["writes"]))
        pre = x @ folded["W_enc"] + folded["b_enc"]
        f = np.where(pre > folded["threshold"], pre, 0.0)
        y_hat = f @ folded["W_dec"] + folded["b_dec"] + (x @ folded["W_skip"] if skip else 0.0)
        fvu = np.sum((y - y_hat) ** 2) / np.sum((y - y.mean(0)) ** 2)
        assert abs(r["fvu"] - fvu) < 1e-3 * fvu and 0 < fvu < 0.6, (r["fvu"], fvu)
        assert abs(r["l0"] - np.mean(np.sum(f > 0, 1))) < 1e-3 * r["l0"]


def test_release_round_trips(released):
    """load_suite (ours), SAELens's transcoder classes and circuit-tracer's set loader give the same
    reconstructions of raw rows as the folded arrays; Gemma Scope 2's layout for skip-transcoders."""
    torch = pytest.importorskip("torch")
    sae_lens = pytest.importorskip("sae_lens")
    ct = pytest.importorskip("circuit_tracer.transcoder.single_layer_transcoder")
    c, final, skip = released
    from saejax import workdir as wd
    root = wd.release_dir(c)
    suite_doc = json.load(open(os.path.join(root, "suite.json")))
    suite = load_suite(root)
    assert {e.site for e in suite} == {"transcoder.0", "transcoder.1"}
    ct_set, = suite_doc["circuit_tracer"]
    paths = {i: os.path.join(root, ct_set["path"], f"layer_{i}.safetensors") for i in range(2)}
    tset = ct.load_transcoder_set(paths, scan="test", feature_input_hook="mlp.hook_in",
                                  feature_output_hook="hook_mlp_out", device=torch.device("cpu"),
                                  lazy_encoder=False, lazy_decoder=False)
    assert tset.skip_connection == skip
    for layer in (0, 1):
        x, folded, s_in, s_out, _ = _reference(c, final, layer)
        want = folded["threshold"], None
        f_ref = np.where(x @ folded["W_enc"] + folded["b_enc"] > folded["threshold"], x @ folded["W_enc"] + folded["b_enc"], 0)
        y_ref = f_ref @ folded["W_dec"] + folded["b_dec"] + (x @ folded["W_skip"] if skip else 0)
        assert 0 < np.mean(f_ref > 0) < 0.8  # latents fire, not all of them
        ours = suite.get(f"transcoder.{layer}")
        assert ours.site == f"mlp.{layer}" and ours.reads == f"mlp_in.{layer}"
        assert np.abs(np.asarray(ours(x)) - y_ref).max() < 1e-4 * np.abs(y_ref).max()
        e = suite.find(f"transcoder.{layer}")
        assert e.path.endswith("params.safetensors" if skip else "params.npz")
        if skip:  # Gemma Scope 2's key for the skip term, in its [d_in, d_out] orientation
            assert "affine_skip_connection" in gs.read_gs2.__globals__["GS2_KEYS"].values()
            cfg2 = json.load(open(os.path.join(root, os.path.dirname(e.path), "config.json")))
            assert cfg2["affine_connection"] is True and cfg2["architecture"] == "jump_relu"
        theirs = sae_lens.SAE.load_from_disk(os.path.join(root, e.saelens))
        assert type(theirs).__name__ == ("JumpReLUSkipTranscoder" if skip else "JumpReLUTranscoder")
        with torch.no_grad():
            y_sl = theirs(torch.from_numpy(x)).numpy()
            y_ct = tset[layer](torch.from_numpy(x)).numpy()
        for got in (y_sl, y_ct):
            assert np.abs(got - y_ref).max() < 1e-4 * np.abs(y_ref).max()


def test_topk_transcoder_saelens_export_refused(tmp_path):
    from saejax import release
    c, _ = _synthetic_run(tmp_path, "topk", False, "('gemmascope','saelens')")
    with pytest.raises(ReleaseError, match=r"SAELens has no topk transcoder class"):
        release.run(c)
    assert not os.path.exists(os.path.join(str(tmp_path), "release"))


def test_gemma_scope_transcoders_folder_with_a_tiny_gemma2(tmp_path):
    """A local folder in google/gemma-scope-2b-pt-transcoders' layout: W_enc reads rms(x) before the
    pre-MLP norm's gain; load_suite(model=...) divides it out, so the SAE reads mlp_in.L, and its
    cross-site splice is what Gemma Scope's formula gives on rms(x)."""
    from saejax import models
    model = models.load("random:tiny-gemma2")
    layer, d = 1, model.site_width("mlp_in.1")
    r = np.random.default_rng(0)
    arrays = {"W_enc": r.standard_normal((d, 48)).astype(np.float32), "W_dec": r.standard_normal((48, d)).astype(np.float32),
              "b_enc": np.zeros(48, np.float32), "b_dec": r.standard_normal(d).astype(np.float32),
              "threshold": np.full(48, 0.5, np.float32)}
    root = tmp_path / "gemma-scope-2b-pt-transcoders"
    folder = root / f"layer_{layer}" / "width_48" / "average_l0_12"
    folder.mkdir(parents=True)
    gs.write_params(str(folder / "params.npz"), arrays)
    suite = load_suite(str(root))
    e, = suite
    assert e.kind == "transcoder" and e.site == f"transcoder.{layer}"
    with pytest.raises(ReleaseError, match=r"pass model="):
        suite.get(f"transcoder.{layer}")
    sae = suite.get(f"transcoder.{layer}", model=model)
    tokens = jnp.asarray(r.integers(0, model.config.vocab_size, (2, 8)))
    _, acts = model.apply(model.params, tokens, sites=("mlp_in.1",), logits=False)
    mlp_in = np.asarray(acts["mlp_in.1"], np.float64)
    normed = mlp_in / np.asarray(model.mlp_in_gain(layer), np.float64)  # rms(x): what Gemma Scope reads
    pre = normed @ arrays["W_enc"] + arrays["b_enc"]
    want = np.where(pre > arrays["threshold"], pre, 0) @ arrays["W_dec"] + arrays["b_dec"]
    assert np.abs(np.asarray(sae(mlp_in)) - want).max() < 1e-3 * np.abs(want).max()
    logits, got = model.apply(model.params, tokens, sites=("mlp.1",), splice={sae.site: sae.splice()})
    np.testing.assert_allclose(np.asarray(got["mlp.1"]), want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_store_without_the_pair_is_refused_in_one_line():
    import types
    from saejax.sources import check_pairs
    from saejax.store.reader import StoreError
    c = cfg.load(SYNTH, ["--config.workdir=/tmp/x", "--config.train.source=store", "--config.sae.transcoders=(3,)",
                         "--config.harvest.layers=(3,)", "--config.harvest.kinds=('mlp_in','mlp')"])
    sites = ["mlp_in.3", "mlp.3"]
    check_pairs(types.SimpleNamespace(sites=sites, pairs=[("mlp_in.3", "mlp.3")], path="st"), c)
    with pytest.raises(StoreError, match=r"^sae.transcoders: sites \(mlp_in.3, mlp.3\) are not an aligned pair "
                                         r"in the store st \(its pairs: \[\]\); harvest it with sae.transcoders set$"):
        check_pairs(types.SimpleNamespace(sites=sites, pairs=[], path="st"), c)
