"""Release and load: folding, the Gemma Scope and SAELens layouts, safety of load_suite.

The reference for every released SAE is the training module itself (saejax.sae.group.SAEGroup) on
normalized inputs x_raw * norm_scale: the released SAE on raw x must give C times its latents and
C times its reconstruction, C = 1 / norm_scale.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import saejax
from saejax import config as cfg
from saejax.evaluate import metrics
from saejax.release import ReleaseError, fold, gemmascope as gs, load_suite
from saejax.sae import io as sae_io
from saejax.sae.group import GroupSpec, SAEGroup, init_params

D, M = 16, 32


def make_group(arch, sites=("res.0",), sparsity=(0.01, 0.02), pre_encoder_bias=True, seed=0, scales=None):
    """A trained-looking group: Gemma Scope init, then random biases and thresholds."""
    spec = GroupSpec(arch=arch, sites=tuple(sites), d=D, width=M, sweep=tuple(sparsity),
                     pre_encoder_bias=pre_encoder_bias)
    params = jax.tree_util.tree_map(np.asarray, init_params(spec, jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    params["W_enc"] = params["W_enc"] + 0.3 * rng.standard_normal(params["W_enc"].shape).astype(np.float32)
    params["b_enc"] = 0.1 * rng.standard_normal(params["b_enc"].shape).astype(np.float32)
    params["b_dec"] = 0.2 * rng.standard_normal(params["b_dec"].shape).astype(np.float32)
    if "log_threshold" in params:
        params["log_threshold"] = np.log(rng.uniform(0.02, 0.2, params["log_threshold"].shape)).astype(np.float32)
    bt = np.full((spec.T, spec.K), 0.05, np.float32)
    scales = scales if scales is not None else [float(1 / (300 * (t + 1))) for t in range(spec.T)]
    meta = {"arch": arch, "sites": list(sites), "d": D, "width": M, "sparsity": list(sparsity),
            "k": [int(k) for k in sparsity] if arch in ("topk", "batchtopk") else [],
            "norm_scale": scales, "pre_encoder_bias": pre_encoder_bias, "frozen": [[False] * spec.K] * spec.T,
            "model": "fake", "steps": 20, "tokens": 20 * 64}
    return spec, params, bt, sae_io.export_params(arch, params, bt), meta


def raw_rows(n, t=0, seed=1):
    """Raw activations with norms in the hundreds (like a real residual stream)."""
    x = np.random.default_rng(seed + t).standard_normal((n, D)).astype(np.float32)
    return x * (300.0 * (t + 1) / np.sqrt(D))


def trained(spec, params, bt, x_norm):
    """Training module on normalized rows [T, N, d] -> (f, x_hat) [T, K, N, ...]."""
    _, f, x_hat = SAEGroup(spec).apply({"params": params}, jnp.asarray(x_norm), jnp.asarray(bt), train=False)
    return np.asarray(f), np.asarray(x_hat)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("arch,sparsity,peb", [("jumprelu", (0.01, 0.02), True), ("jumprelu", (0.01,), False),
                                               ("topk", (3, 7), True), ("batchtopk", (4,), True),
                                               ("relu", (0.1,), True)])
def test_fold_released_on_raw_equals_trained_on_normalized(arch, sparsity, peb):
    spec, params, bt, arrays, meta = make_group(arch, sparsity=sparsity, pre_encoder_bias=peb)
    x = raw_rows(256)
    s = meta["norm_scale"][0]
    assert 100 < np.median(np.linalg.norm(x, axis=1)) < 1000
    f_ref, xh_ref = trained(spec, params, bt, (x * s)[None])
    c = 1.0 / s
    for k in range(spec.K):
        released, rarch, top_k = fold.group_sae(arrays, meta, 0, k)
        sae = saejax.release.SAE(rarch, {n: jnp.asarray(a) for n, a in released.items()}, top_k, "res.0")
        f = np.asarray(sae.encode(x))
        assert (f != 0).sum() > 0.05 * f.size  # a real test: latents fire
        assert np.array_equal(f != 0, f_ref[0, k] != 0)
        assert rel(f, c * f_ref[0, k]) < 1e-5
        assert rel(sae(x), c * xh_ref[0, k]) < 1e-5


def test_width_names_follow_gemma_scope():
    assert [gs.width_name(w) for w in (16384, 65536, 131072, 2 ** 20, 1024, 128, 1500)] == \
        ["width_16k", "width_65k", "width_131k", "width_1m", "width_1k", "width_128", "width_1500"]
    for w in (16384, 65536, 131072, 262144, 524288, 2 ** 20, 1024, 128, 1500):
        assert gs.parse_width(gs.width_name(w)) == w
    assert gs.parse_path("layer_5/width_65k/canonical/params.npz", "mlp") == \
        {"kind": "mlp", "layer": 5, "width": 65536, "l0": None, "canonical": True}
    assert gs.parse_path("embedding/width_4k/average_l0_6/params.npz", "res") is None


def _results(groups, rows_of):
    """results.json entries as saejax evaluate writes them (reconstruction metrics measured)."""
    out = []
    for name, (_, _, _, arrays, meta) in groups.items():
        for t, site in enumerate(meta["sites"]):
            for k, m in enumerate(metrics.site_metrics(meta, arrays, t, rows_of(t))):
                out.append({"id": f"{site}__{name}__{k}", "group": name, "site": site, "kind": site.split(".")[0],
                            "layer": int(site.split(".")[1]), "t": t, "member": k, "arch": meta["arch"],
                            "d": D, "width": M, "sparsity": meta["sparsity"][k],
                            "k": meta["k"][k] if meta["k"] else None, "frozen": False, **m,
                            "delta_lm_loss": 0.01 * (k + 1), "ce_score": 0.9, "kl": 0.01, "card": None})
    return out


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A workdir with two trained groups and their evaluation, released."""
    work = str(tmp_path_factory.mktemp("run"))
    groups = {"jumprelu_d16_w32": make_group("jumprelu", sites=("res.0", "mlp.1")),
              "topk_d16_w32": make_group("topk", sites=("att.2",), sparsity=(2, 5), seed=3, scales=[0.004])}
    for name, g in groups.items():
        sae_io.save_group(os.path.join(work, "train", name, "final"), g[3], g[4])
    os.makedirs(os.path.join(work, "evaluate"))
    with open(os.path.join(work, "evaluate", "results.json"), "w") as fh:
        json.dump({"format": "saejax-eval/1", "model": "fake", "contexts": 4, "groups": list(groups),
                   "saes": _results(groups, lambda t: raw_rows(512, t))}, fh)
    c = cfg.defaults()
    c.workdir = work
    c.data.context_len = 64
    assert not saejax.release.is_complete(c)
    saejax.release.run(c)
    assert saejax.release.is_complete(c)
    with open(os.path.join(work, "evaluate", "results.json"), "a") as fh:
        fh.write(" ")  # new evaluation results: the release is stale
    assert not saejax.release.is_complete(c)
    saejax.release.run(c)
    assert saejax.release.is_complete(c)
    return work, groups


def test_release_layout_and_roundtrip(released):
    work, groups = released
    root = os.path.join(work, "release")
    assert not [p for p in os.listdir(work) if ".tmp-" in p]
    for f in ("suite.json", "README.md", "l0_fvu.png", "delta_loss.png", "density.png"):
        assert os.path.getsize(os.path.join(root, f)) > 100, f
    suite_doc = json.load(open(os.path.join(root, "suite.json")))
    assert len(suite_doc["saes"]) == 6
    for e in suite_doc["saes"]:
        assert e["path"] == f"{e['kind']}/layer_{e['layer']}/width_32/average_l0_{round(e['l0'])}/params.npz"
        assert os.path.isfile(os.path.join(root, e["path"]))
    suite = saejax.load_suite(root)
    assert len(suite) == 6 and suite.sites() == ["att.2", "mlp.1", "res.0"]
    for name, (spec, params, bt, _, meta) in groups.items():
        xs = [raw_rows(128, t, seed=7) for t in range(spec.T)]
        f_ref, _ = trained(spec, params, bt, np.stack([x * s for x, s in zip(xs, meta["norm_scale"])]))
        for t, site in enumerate(meta["sites"]):
            x, s = xs[t], meta["norm_scale"][t]
            for k in range(spec.K):
                e, = [e for e in suite.select(site=site) if e.source == {**e.source, "group": name, "member": k}]
                sae = suite.load(e)
                assert sae.arch == ("topk" if meta["arch"] == "topk" else "jumprelu")
                assert rel(sae.encode(x), f_ref[t, k] / s) < 1e-5


def test_saelens_export_loads_in_saelens(released):
    torch = pytest.importorskip("torch")
    sae_lens = pytest.importorskip("sae_lens")
    work, groups = released
    root = os.path.join(work, "release")
    suite = load_suite(root)
    for e in suite:
        ours = suite.load(e)
        theirs = sae_lens.SAE.load_from_disk(os.path.join(root, e.saelens))
        cfg_json = json.load(open(os.path.join(root, e.saelens, "cfg.json")))
        hook = {"res": "blocks.{}.hook_resid_post", "mlp": "blocks.{}.hook_mlp_out", "att": "blocks.{}.attn.hook_z"}
        assert cfg_json["metadata"]["hook_name"] == hook[e.kind].format(e.layer)
        x = raw_rows(64, seed=11)
        xt = torch.from_numpy(x)
        if e.kind == "att":  # SAELens reshapes hook_z inputs [..., n_heads, d_head] itself
            xt = xt.reshape(64, 4, D // 4)
        with torch.no_grad():
            f = theirs.encode(xt).numpy()
            xh = theirs.decode(theirs.encode(xt)).reshape(64, D).numpy()
        assert np.array_equal(f != 0, np.asarray(ours.encode(x)) != 0)
        assert rel(f, np.asarray(ours.encode(x))) < 1e-5
        assert rel(xh, np.asarray(ours(x))) < 1e-5


def test_gemma_scope_fixture_loads_and_encodes_by_the_tutorial_formula(tmp_path):
    rng = np.random.default_rng(0)
    d, m = 8, 16
    params = {"W_enc": rng.standard_normal((d, m)), "W_dec": rng.standard_normal((m, d)),
              "b_enc": rng.standard_normal(m), "b_dec": rng.standard_normal(d), "threshold": rng.uniform(0.5, 1.5, m)}
    params = {k: v.astype(np.float32) for k, v in params.items()}
    for root, rel_dir in ((tmp_path / "ours", "res/layer_20/width_16k/average_l0_71"),
                          (tmp_path / "gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71")):
        os.makedirs(root / rel_dir)
        np.savez(root / rel_dir / "params.npz", **params)
        suite = load_suite(str(root))
        e = suite.find("res.20")
        assert (e.kind, e.layer, e.width, e.l0) == ("res", 20, 16384, 71.0)
        sae = suite.get("res", 20, width="16k", l0=71)
        x = rng.standard_normal((32, d)).astype(np.float32) * 3
        pre = x @ params["W_enc"] + params["b_enc"]  # Gemma Scope's tutorial
        acts = (pre > params["threshold"]) * np.maximum(pre, 0)
        assert (acts != 0).any() and (acts == 0).any()
        np.testing.assert_allclose(np.asarray(sae.encode(x)), acts, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(sae.decode(acts)), acts @ params["W_dec"] + params["b_dec"],
                                   rtol=1e-5, atol=1e-4)
    other = tmp_path / "gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_140"  # a second L0 level
    os.makedirs(other)
    np.savez(other / "params.npz", **params)
    gemma = load_suite(str(tmp_path / "gemma-scope-2b-pt-res"))
    assert sorted(e.l0 for e in gemma.select(layer=20)) == [71.0, 140.0]
    assert gemma.find("res.20").l0 == 71.0  # canonical: L0 closest to 100
    assert gemma.find("res.20", l0=130).l0 == 140.0


class _Model:
    def site_width(self, site):
        return 12


def test_bad_archives_and_paths_are_refused_with_the_file_named(tmp_path):
    root = tmp_path / "rel"
    good = {k: np.zeros(s, np.float32) for k, s in
            (("W_enc", (4, 6)), ("W_dec", (6, 4)), ("b_enc", (6,)), ("b_dec", (4,)), ("threshold", (6,)))}
    cases = {
        "average_l0_1": dict(good, threshold=np.array([object()] * 6, dtype=object)),  # pickled object array
        "average_l0_2": {k: v for k, v in good.items() if k != "b_dec"},  # missing key
        "average_l0_3": dict(good, W_dec=np.zeros((6, 5), np.float32)),  # shape mismatch
        "average_l0_4": None,  # not an archive
        "average_l0_5": good,
    }
    for leaf, arrays in cases.items():
        p = root / "res" / "layer_0" / "width_6" / leaf
        os.makedirs(p)
        if arrays is None:
            (p / "params.npz").write_bytes(b"not a zip file")
        else:
            np.savez(p / "params.npz", **arrays)
    suite = load_suite(str(root))
    messages = {1: "not a valid npz", 2: "missing key 'b_dec'", 3: "W_dec has shape", 4: "not a valid npz"}
    for n, msg in messages.items():
        with pytest.raises(ReleaseError, match=msg) as err:
            suite.get("res.0", l0=n)
        assert f"average_l0_{n}/params.npz" in str(err.value)
    sae = suite.get("res.0", l0=5)
    with pytest.raises(ReleaseError, match=r"average_l0_5/params.npz: SAE input width 4 does not match res.0 width 12"):
        sae.check_width(_Model())
    # A manifest path leaving the folder is refused, before anything is read.
    evil = tmp_path / "evil"
    os.makedirs(evil)
    (evil / "suite.json").write_text(json.dumps({"saes": [{"kind": "res", "layer": 0, "width": 6, "l0": 5,
                                                           "path": "../rel/res/layer_0/width_6/average_l0_5/params.npz"}]}))
    with pytest.raises(ReleaseError, match="leaves the release folder"):
        load_suite(str(evil))
    os.symlink(root / "res", evil / "res")  # and a symlink out of it
    (evil / "suite.json").write_text(json.dumps({"saes": [{"kind": "res", "layer": 0, "width": 6, "l0": 5,
                                                           "path": "res/layer_0/width_6/average_l0_5/params.npz"}]}))
    with pytest.raises(ReleaseError, match="outside the release folder"):
        load_suite(str(evil)).get("res.0")
    with pytest.raises(ReleaseError, match="no such release folder"):
        load_suite(str(tmp_path / "missing"))


def test_release_without_evaluation_names_the_missing_file(tmp_path):
    c = cfg.defaults()
    c.workdir = str(tmp_path)
    with pytest.raises(ReleaseError, match=f"{tmp_path}/evaluate/results.json"):
        saejax.release.run(c)
    assert not os.path.exists(tmp_path / "release")


def test_hub_repo_is_indexed_from_the_listing_and_downloads_lazily(tmp_path, monkeypatch):
    """A Gemma Scope-style hub repo (served from a local folder): listing only, one download per SAE."""
    import huggingface_hub
    repo = tmp_path / "hub"
    rng = np.random.default_rng(0)
    arrays = {"W_enc": rng.standard_normal((4, 8)), "W_dec": rng.standard_normal((8, 4)), "b_enc": np.zeros(8),
              "b_dec": np.zeros(4), "threshold": np.full(8, 0.1)}
    files = []
    for layer in (3, 7):
        for l0 in (20, 90, 300):
            rel = f"layer_{layer}/width_16k/average_l0_{l0}/params.npz"
            os.makedirs(repo / os.path.dirname(rel))
            np.savez(repo / rel, **{k: v.astype(np.float32) for k, v in arrays.items()})
            files.append(rel)
    downloads = []
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda r, revision=None: files + ["README.md"])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda r, f, revision=None: downloads.append((r, f)) or str(repo / f))
    suite = load_suite("google/gemma-scope-2b-pt-mlp")
    assert len(suite) == 6 and suite.sites() == ["mlp.3", "mlp.7"] and downloads == []
    sae = suite.canonical("mlp", 7, width="16k")
    assert downloads == [("google/gemma-scope-2b-pt-mlp", "layer_7/width_16k/average_l0_90/params.npz")]
    assert sae.site == "mlp.7" and sae.width == 8
    suite.get("mlp.3", l0=250)
    assert downloads[-1][1] == "layer_3/width_16k/average_l0_300/params.npz" and len(downloads) == 2


def test_loaded_sae_splices_into_a_model_on_a_mesh(tmp_path):
    """A released identity SAE spliced into the tiny model leaves its logits unchanged; placed with
    latents split over a (data 4, latent 2) mesh it encodes the same."""
    from saejax import mesh as meshlib
    from saejax import models
    model = models.load("random:tiny-llama")
    w = model.site_width("res.1")
    eye = np.eye(w, dtype=np.float32)
    rel = "res/layer_1/width_" + str(2 * w) + "/average_l0_30"
    os.makedirs(tmp_path / rel)
    gs.write_params(str(tmp_path / rel / "params.npz"),
                    {"W_enc": np.concatenate([eye, -eye], 1), "W_dec": np.concatenate([eye, -eye], 0),
                     "b_enc": np.zeros(2 * w), "b_dec": np.zeros(w), "threshold": np.zeros(2 * w)})
    sae = load_suite(str(tmp_path)).canonical("res.1")
    sae.check_width(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, model.config.vocab_size, (2, 16)), jnp.int32)
    clean, acts = model.forward_fn(sites=("res.1",))(model.params, tokens)
    mask = jnp.arange(16)[None, :].repeat(2, 0) > 0
    spliced, _ = model.forward_fn(splice={"res.1": sae.splice(mask)})(model.params, tokens)
    np.testing.assert_allclose(np.asarray(spliced), np.asarray(clean), rtol=1e-4, atol=1e-4)
    zero = dataclasses_replace_decoder(sae)
    changed, _ = model.forward_fn(splice={"res.1": zero.splice(mask)})(model.params, tokens)
    assert np.abs(np.asarray(changed) - np.asarray(clean)).max() > 1e-3
    mesh = meshlib.make_mesh({"data": 4, "stack": 1, "latent": 2})
    placed = sae.put(mesh)
    assert placed.arrays["W_enc"].sharding.spec == jax.sharding.PartitionSpec(None, "latent")
    np.testing.assert_allclose(np.asarray(placed.encode(acts["res.1"])), np.asarray(sae.encode(acts["res.1"])),
                               rtol=1e-6, atol=1e-6)


def dataclasses_replace_decoder(sae):
    import dataclasses
    return dataclasses.replace(sae, arrays=dict(sae.arrays, W_dec=jnp.zeros_like(sae.arrays["W_dec"])))


def test_interrupted_release_leaves_the_previous_one_and_no_partial_folder(released, monkeypatch):
    work, _ = released
    before = open(os.path.join(work, "release", "suite.json")).read()
    from saejax.release import card

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(card, "write_readme", crash)
    c = cfg.defaults()
    c.workdir = work
    c.release.l0 = (3.0,)  # a different selection, never completed
    with pytest.raises(KeyboardInterrupt):
        saejax.release.run(c)
    assert open(os.path.join(work, "release", "suite.json")).read() == before
    assert not [p for p in os.listdir(work) if ".tmp-" in p]


def test_saelens_only_release_loads_the_same(released, tmp_path):
    from saejax.release import suite as writer
    work, groups = released
    results = json.load(open(os.path.join(work, "evaluate", "results.json")))["saes"]
    picked, _ = writer.choose(results)
    loaded = {name: sae_io.load_group(os.path.join(work, "train", name, "final")) for name in groups}
    writer.write(str(tmp_path / "rel"), picked, loaded, name="x", model="fake", formats=("saelens",))
    assert not list((tmp_path / "rel").rglob("params.npz"))
    a, b = load_suite(str(tmp_path / "rel")), load_suite(os.path.join(work, "release"))
    x = raw_rows(32, seed=3)
    for ea, eb in zip(a, b):
        assert (ea.site, ea.l0) == (eb.site, eb.l0) and ea.path is None
        sa, sb = a.load(ea), b.load(eb)
        assert (sa.arch, sa.k) == (sb.arch, sb.k)
        np.testing.assert_array_equal(np.asarray(sa.encode(x)), np.asarray(sb.encode(x)))


def test_push_to_hub_sends_the_release_and_a_card_the_hub_and_saelens_read(released, tmp_path, monkeypatch):
    """release.push_to_hub: create_repo then the large-folder upload of the whole release, recorded by
    fakes (no sockets); the card's metadata parsed offline; SAELens's model_name is the Hub id."""
    import shutil
    import socket
    import huggingface_hub
    from huggingface_hub.repocard import metadata_load
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = str(tmp_path / "run")
    shutil.copytree(released[0], work)
    doc = json.load(open(os.path.join(work, "evaluate", "results.json")))
    doc["model"] = "smollm2-135m-instruct-q4_1"  # what the default's store records
    json.dump(doc, open(os.path.join(work, "evaluate", "results.json"), "w"))
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_large_folder(self, repo_id, folder_path, **kw):
        files = sorted(os.path.relpath(os.path.join(d, f), folder_path) for d, _, fs in os.walk(folder_path) for f in fs)
        calls.append(("upload_large_folder", repo_id, dict(kw, folder_path=folder_path, files=files)))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_large_folder", upload_large_folder, raising=False)
    monkeypatch.setattr(socket, "socket", None)  # any connection attempt fails loudly
    c = cfg.load(os.path.join(repo_root, "experiments", "default.py"),
                 [f"workdir={work}", "data.context_len=64", "release.push_to_hub=me/smollm2-saes"])
    assert not saejax.release.is_complete(c)  # a push always runs the release
    saejax.release.run(c)
    assert [x[:2] for x in calls] == [("create_repo", "me/smollm2-saes"), ("upload_large_folder", "me/smollm2-saes")]
    assert calls[0][2]["exist_ok"] and calls[0][2]["repo_type"] == "model" and not calls[0][2]["private"]
    root = os.path.join(work, "release")
    up = calls[1][2]
    assert up["folder_path"] == root and up["repo_type"] == "model"
    suite_doc = json.load(open(os.path.join(root, "suite.json")))
    want = {"suite.json", "README.md", "l0_fvu.png", "delta_loss.png", "density.png"}
    for e in suite_doc["saes"]:
        want |= {e["path"], f"{e['saelens']}/cfg.json", f"{e['saelens']}/sae_weights.safetensors"}
        assert json.load(open(os.path.join(root, e["saelens"], "cfg.json")))["metadata"]["model_name"] \
            == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert want <= set(up["files"]), want - set(up["files"])
    meta = metadata_load(os.path.join(root, "README.md"))
    assert meta["library_name"] == "saelens" and meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"sparse-autoencoder", "saejax"} <= set(meta["tags"])
    text = open(os.path.join(root, "README.md")).read()
    assert "dequantized from its Q4_1 GGUF" in text
    assert f'SAE.from_pretrained("me/smollm2-saes", "{suite_doc["saes"][0]["saelens"]}")' in text
    assert text.count("| res.0 |") == sum(e["site"] == "res.0" for e in suite_doc["saes"])  # the metrics table


def test_push_to_hub_failure_is_one_line_naming_the_repo(released, tmp_path, monkeypatch):
    import shutil
    import huggingface_hub
    work = str(tmp_path / "run")
    shutil.copytree(released[0], work)

    def create_repo(self, repo_id, **kw):
        raise OSError("Network is unreachable\nmore detail")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    c = cfg.defaults()
    c.workdir, c.data.context_len, c.release.push_to_hub = work, 64, "me/suite"
    with pytest.raises(saejax.release.ReleaseError, match=r"^release.push_to_hub='me/suite': upload failed "
                                                          r"\(OSError: Network is unreachable\); rerun to resume$"):
        saejax.release.run(c)
    assert os.path.isfile(os.path.join(work, "release", "suite.json"))  # the release itself is written


def test_matryoshka_prefix_sizes_in_suite_and_saelens_cfg(tmp_path):
    name = "topk_d16_w32"
    g = make_group("topk", sparsity=(2, 5))
    meta = dict(g[4], matryoshka=[8, 16, M])
    sae_io.save_group(str(tmp_path / "train" / name / "final"), g[3], meta)
    results = _results({name: g[:4] + (meta,)}, lambda t: raw_rows(256, t))
    assert set(results[0]["fvu_prefix"]) == {"8", "16", str(M)}
    os.makedirs(tmp_path / "evaluate")
    with open(tmp_path / "evaluate" / "results.json", "w") as fh:
        json.dump({"format": "saejax-eval/1", "model": "fake", "contexts": 4, "groups": [name], "saes": results}, fh)
    c = cfg.defaults()
    c.workdir = str(tmp_path)
    saejax.release.run(c)
    with open(tmp_path / "release" / "suite.json") as fh:
        suite = json.load(fh)
    for e in suite["saes"]:
        assert e["matryoshka"] == [8, 16, M] and set(e["metrics"]["fvu_prefix"]) == {"8", "16", str(M)}
        with open(tmp_path / "release" / e["saelens"] / "cfg.json") as fh:
            assert json.load(fh)["metadata"]["matryoshka_widths"] == [8, 16, M]


def test_release_copies_clt_latent_cards(tmp_path):
    """A CLT's per-layer latent cards (evaluate/cards/clt.<l>__<id>.html) are copied into the release's
    cards/, suite.json's CLT entry names each in per_layer[i]["card"] (None where evaluate wrote none)
    and the README's CLT section links them."""
    from saejax.sae import clt, clt_io
    work = str(tmp_path)
    g = make_group("jumprelu")
    sae_io.save_group(os.path.join(work, "train", "jumprelu_d16_w32", "final"), g[3], g[4])
    spec = clt.CLTSpec(arch="jumprelu", layers=(0, 1), d_in=D, d_out=D, width=M, sparsity=0.01)
    cid = spec.name
    clt_io.save(os.path.join(work, "train", cid, "final"), spec, clt.init_params(spec, jax.random.key(0)),
                np.zeros(2, np.float32), [1.0, 1.0], [1.0, 1.0])
    os.makedirs(os.path.join(work, "evaluate", "cards"))
    card0 = f"cards/clt.0__{cid}.html"
    with open(os.path.join(work, "evaluate", card0), "w") as fh:
        fh.write("<html>layer 0's latents</html>")
    per_layer = [{"site": f"mlp.{l}", "layer": l, "l0": 3.0, "fvu": 0.4, "dead_frac": 0.0,
                  "card": f"cards/clt.{l}__{cid}.html"} for l in (0, 1)]  # layer 1's card was not written
    with open(os.path.join(work, "evaluate", "results.json"), "w") as fh:
        json.dump({"format": "saejax-eval/1", "model": "fake", "contexts": 4, "groups": ["jumprelu_d16_w32"],
                   "saes": _results({"jumprelu_d16_w32": g}, lambda t: raw_rows(512, t)),
                   "clts": [{"id": cid, "arch": "jumprelu", "layers": [0, 1], "width": M, "l0_total": 6.0,
                             "per_layer": per_layer}]}, fh)
    c = cfg.defaults()
    c.workdir = work
    saejax.release.run(c)
    root = tmp_path / "release"
    entry, = json.loads((root / "suite.json").read_text())["clts"]
    assert [m["card"] for m in entry["per_layer"]] == [card0, None]
    assert (root / card0).read_text() == "<html>layer 0's latents</html>"
    readme = (root / "README.md").read_text()
    assert f"| mlp.0 | 3.0 | 0.400 | 0.0% | [card]({card0}) |" in readme and "| mlp.1 | 3.0 | 0.400 | 0.0% | - |" in readme


def test_clt_only_release(tmp_path, capsys):
    """A run that trained a CLT and no SAE (experiments/smollm2_clt.py with sae.transcoders=()) releases
    it: suite.json with no SAEs and the CLT, a README that says so, and load_suite reads it back."""
    from saejax.sae import clt, clt_io
    work = str(tmp_path)
    spec = clt.CLTSpec(arch="jumprelu", layers=(0, 1), d_in=D, d_out=D, width=M, sparsity=0.01)
    params = clt.init_params(spec, jax.random.key(0))
    clt_io.save(os.path.join(work, "train", spec.name, "final"), spec, params, np.zeros(2, np.float32),
                [1.0, 1.0], [1.0, 1.0])
    os.makedirs(os.path.join(work, "evaluate"))
    per_layer = [{"site": f"mlp.{l}", "layer": l, "l0": 3.0, "fvu": 0.4, "dead_frac": 0.0} for l in (0, 1)]
    with open(os.path.join(work, "evaluate", "results.json"), "w") as fh:
        json.dump({"format": "saejax-eval/1", "model": "fake", "contexts": 4, "groups": [], "saes": [],
                   "clts": [{"id": spec.name, "arch": "jumprelu", "layers": [0, 1], "width": M, "l0_total": 6.0,
                             "per_layer": per_layer}]}, fh)
    c = cfg.defaults()
    c.workdir = work
    saejax.release.run(c)
    assert f"saejax release: 1 CLT -> {work}/release " in capsys.readouterr().err
    root = tmp_path / "release"
    doc = json.loads((root / "suite.json").read_text())
    assert doc["saes"] == [] and [e["id"] for e in doc["clts"]] == [spec.name]
    readme = (root / "README.md").read_text()
    assert "\n\nCross-layer transcoders on " in readme and "clt = suite.clt()" in readme
    assert "cross-layer-transcoder" in readme.split("---")[1]  # the card's tags
    suite = saejax.load_suite(str(root))
    x = np.random.default_rng(0).standard_normal((2, 5, D)).astype(np.float32)
    a, meta = clt_io.load(os.path.join(work, "train", spec.name, "final"))
    np.testing.assert_allclose(suite.clt().reconstruct(x), clt_io.reconstruct(a, meta, x), rtol=1e-5, atol=1e-6)
    os.remove(os.path.join(work, "evaluate", "results.json"))  # neither SAE nor CLT: refused in one line
    with open(os.path.join(work, "evaluate", "results.json"), "w") as fh:
        json.dump({"format": "saejax-eval/1", "model": "fake", "contexts": 4, "groups": [], "saes": []}, fh)
    with pytest.raises(saejax.release.ReleaseError, match="no SAE or CLT to release"):
        saejax.release.run(c)
