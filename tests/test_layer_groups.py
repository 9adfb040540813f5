"""Layer groups (sae.layer_groups; Ghilardi et al. 2024): one SAE trained on the pooled res rows of
adjacent layers, evaluated and released on each of them."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from saejax import config as cfg
from saejax.store import StoreError, open_store, write_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH = os.path.join(REPO, "experiments", "synthetic.py")


def id_store(tmp_path, layers=3, n=1000, held=40, w=8):
    """Sites res.0.. whose column 0 is a row id (10000 * layer + row), scaled differently per layer."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, rows in (("train", n), ("heldout", held)):
        arrays[split] = {}
        for layer in range(layers):
            x = rng.standard_normal((rows, w)).astype(np.float32) * (layer + 1)
            x[:, 0] = np.arange(rows) + 10000 * layer
            meta = np.stack([np.arange(rows) % 7, np.arange(rows) // 15, 1 + np.arange(rows) % 15], 1)
            arrays[split][f"res.{layer}"] = (x, meta)
    path = str(tmp_path / "store")
    write_store(path, arrays, model="test-model", context_len=16, shard_rows=300)
    return path


def test_a_pooled_batch_is_the_documented_rows(tmp_path):
    st = open_store(id_store(tmp_path))
    pools = {"res.0-2": ("res.0", "res.1", "res.2")}
    r = st.reader(seed=3, sites=["res.0-2"], pools=pools, block_rows=128)
    plain = st.reader(seed=3, block_rows=128)
    B, m = 12, 4
    assert r.sites == ["res.0-2"] and r.width("res.0-2") == 8 and r.norm_scale("res.0-2") == 1.0
    for step in (0, 1, 7, 250):  # 250: past the end of an epoch of the members' streams (1000 / 4 steps)
        got = r.batch(["res.0-2"], step, B)[0]
        # member j's rows: its own stream read with batch m at the same step, times its norm scale
        want = np.concatenate([plain.batch([s], step, m)[0] * np.float32(st.norm_scale(s)) for s in pools["res.0-2"]])
        np.testing.assert_array_equal(got, want)
        assert [int(v) // 10000 for v in np.rint(got[:, 0] / [st.norm_scale(f"res.{i // m}") for i in range(B)])] \
            == [0] * m + [1] * m + [2] * m
        # processes take contiguous slices of the global pooled batch (here across member boundaries)
        parts = [r.batch(["res.0-2"], step, B, p, 3) for p in range(3)]
        np.testing.assert_array_equal(np.concatenate(parts, axis=1)[0], got)
        meta = r.batch_meta(["res.0-2"], step, B)[0]
        np.testing.assert_array_equal(meta, np.concatenate([plain.batch_meta([s], step, m)[0] for s in pools["res.0-2"]]))
    held = r.heldout_batch(["res.0-2"], B)[0]
    np.testing.assert_array_equal(held, np.concatenate([plain.heldout_batch([s], m)[0] * np.float32(st.norm_scale(s))
                                                        for s in pools["res.0-2"]]))
    with pytest.raises(StoreError, match="batch size 10 does not divide by the 3 sites of pooled site res.0-2"):
        r.batch(["res.0-2"], 0, 10)
    r.close(), plain.close()


def test_config_key_is_checked_in_one_line():
    base = ["--config.workdir=/tmp/x", "--config.train.source=store", "--config.harvest.kinds=('res','att')",
            "--config.harvest.layers=(0,1,2,3)", "--config.train.batch_size=12"]
    for value, msg in [("((0,2),(1,),(3,))", r"\(0, 2\) is not a run of adjacent layers"),
                       ("((0,1),(1,2),(3,))", "layer 1 is in two groups"),
                       ("((0,1,2,3,4),)", r"layer 4 of .* is not harvested"),
                       ("((0,1),)", r"harvested layers \[2, 3\] are in no group"),
                       ("('a',)", "'a' is not a tuple of layer indices")]:
        with pytest.raises(cfg.ConfigError, match=r"^config key 'sae.layer_groups': " + msg):
            cfg.load(SYNTH, base + [f"--config.sae.layer_groups={value}"])
    with pytest.raises(cfg.ConfigError, match=r"^config key 'train.batch_size': 12 does not divide by 5"):
        cfg.load(SYNTH, base[:-1] + ["--config.harvest.layers=(0,1,2,3,4)", "--config.sae.layer_groups=((0,1,2,3,4),)",
                                     "--config.train.batch_size=12"])
    with pytest.raises(cfg.ConfigError, match="train.source='store'"):
        cfg.load(SYNTH, ["--config.sae.layer_groups=((0,),)"])
    c = cfg.load(SYNTH, base + ["--config.sae.layer_groups=((0,1,2),(3,))"])
    assert cfg.layer_pools(c) == {"res.0-2": ("res.0", "res.1", "res.2")}  # a group of one is its own site
    assert cfg.pool_sites(cfg.sites(c), cfg.layer_pools(c)) == ["res.0-2", "att.0", "att.1", "att.2", "res.3", "att.3"]


def shared_store(tmp_path, n=8192, held=2048, d=16, n_feat=48, active=3):
    """res.0 and res.1 carry the same planted features (independent draws; res.1 three times louder)."""
    rng = np.random.default_rng(1)
    f = rng.standard_normal((n_feat, d))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    p = 1.0 / np.arange(1, n_feat + 1)
    arrays = {"train": {}, "heldout": {}}
    for split, rows in (("train", n), ("heldout", held)):
        for layer, gain in ((0, 1.0), (1, 3.0)):
            codes = np.zeros((rows, n_feat))
            for i in range(rows):
                codes[i, rng.choice(n_feat, active, replace=False, p=p / p.sum())] = rng.uniform(0.5, 1.5, active)
            x = (gain * (codes @ f + 0.01 * rng.standard_normal((rows, d)))).astype(np.float32)
            meta = np.stack([np.arange(rows) % 50, np.arange(rows) // 16, np.arange(rows) % 16], 1)
            arrays[split][f"res.{layer}"] = (x, meta)
    write_store(str(tmp_path / "store"), arrays, model="test-model", context_len=16, shard_rows=4096)
    return str(tmp_path / "store")


def _config(workdir, store, groups, steps=300, extra=()):
    return cfg.load(SYNTH, [f"--config.workdir={workdir}", f"--config.harvest.store_dir={store}",
                            "--config.train.source=store", "--config.harvest.kinds=('res',)",
                            "--config.harvest.layers=(0,1)", f"--config.sae.layer_groups={groups}",
                            "--config.sae.arch=topk", "--config.sae.sparsity=(3,)", "--config.sae.widths=(64,)",
                            "--config.train.batch_size=256", f"--config.train.tokens={256 * steps}",
                            "--config.train.lr=0.01", "--config.train.lr_warmup=0.05",
                            "--config.train.log_every=10", "--config.train.checkpoint_every=50", *extra])


def _heldout_fvu(final, store, layer_sites=("res.0", "res.1")):
    """FVU on each layer's held-out rows, recomputed here: normalized by the store's own scale of
    that layer, TopK encode, decode."""
    from saejax.sae import io as sae_io
    a, meta = sae_io.load_group(final)
    out = {}
    for site in layer_sites:
        t = next(t for t in range(len(meta["sites"])) if site in sae_io.layer_sites(meta, t))
        x = store.rows(site, "heldout")[0].astype(np.float64) * store.norm_scale(site)
        pre = x @ a["W_enc"][t, 0] + a["b_enc"][t, 0]
        k = int(meta["k"][0])
        f = np.where(pre >= np.sort(pre, axis=1)[:, -k:][:, :1], np.maximum(pre, 0), 0)
        x_hat = f @ a["W_dec"][t, 0] + a["b_dec"][t, 0]
        out[site] = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    return out, meta


def test_one_pooled_sae_reaches_per_layer_fvu_on_layers_sharing_features(tmp_path):
    from saejax.train import loop
    path = shared_store(tmp_path)
    store = open_store(path)
    res = {}
    for name, groups in (("per_layer", "()"), ("pooled", "((0,1),)")):
        c = _config(tmp_path / name, path, groups)
        finals = loop.run(c)
        fvu, meta = _heldout_fvu(finals[0], store)
        with open(os.path.join(os.path.dirname(finals[0]), "metrics.jsonl")) as fh:
            curve = [json.loads(line)["heldout_fvu"] for line in fh]
        res[name] = fvu, meta, curve
    (per, per_meta, per_curve), (pool, pool_meta, pool_curve) = res["per_layer"], res["pooled"]
    assert per_meta["sites"] == ["res.0", "res.1"] and pool_meta["sites"] == ["res.0-1"]  # half the SAEs
    assert pool_meta["layer_groups"]["res.0-1"]["norm_scale"] == pytest.approx(
        [store.norm_scale("res.0"), store.norm_scale("res.1")])
    assert np.max(pool_curve[-1]) < 0.6 * np.max(pool_curve[0])  # training trains (first log: step 10)
    for site in ("res.0", "res.1"):
        assert per[site] < 0.3, per
        assert pool[site] < per[site] * 1.05 + 0.005, (site, per, pool)


def test_resume_with_layer_groups_is_bitwise(tmp_path, monkeypatch, capfd):
    from saejax.store import reader
    from saejax.train import loop
    path = id_store(tmp_path, layers=2, n=2048, held=64, w=16)
    ref = loop.run(_config(tmp_path / "ref", path, "((0,1),)", steps=30, extra=["--config.train.checkpoint_every=10"]))

    real = reader.Reader.batch

    def crash(self, sites, step, *a, **k):
        if step == 15:
            raise KeyboardInterrupt("killed")
        return real(self, sites, step, *a, **k)
    c = _config(tmp_path / "cut", path, "((0,1),)", steps=30, extra=["--config.train.checkpoint_every=10"])
    monkeypatch.setattr(reader.Reader, "batch", crash)
    with pytest.raises(KeyboardInterrupt):
        loop.run(c)
    monkeypatch.setattr(reader.Reader, "batch", real)
    capfd.readouterr()
    again = loop.run(c)
    assert "resumed from the checkpoint at step 10" in capfd.readouterr().err
    a, b = load_file(os.path.join(ref[0], "params.safetensors")), load_file(os.path.join(again[0], "params.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_runlocal_evaluates_and_releases_a_pooled_sae_on_each_layer(tmp_path):
    import saejax
    from saejax.sae import io as sae_io
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    spec = os.path.join(REPO, "experiments", "layer_groups.py") + ":runlocal"
    out = subprocess.run([sys.executable, "-m", "saejax.cli", "run", "--config", spec], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    root = tmp_path / "runs" / "layer_groups_runlocal"
    store = open_store(str(root / "store"))
    work = root / "groups1"
    [final] = [str(p) for p in (work / "train").glob("*/final")]
    arrays, meta = sae_io.load_group(final)
    assert meta["sites"] == ["res.0-1"] and meta["norm_scale"] == [1.0]
    doc = json.loads((work / "evaluate" / "results.json").read_text())
    K = len(meta["sweep"])
    assert sorted((r["site"], r["member"]) for r in doc["saes"]) == [(s, k) for s in ("res.0", "res.1") for k in range(K)]
    suite = saejax.load_suite(str(work / "release"))
    for r in doc["saes"]:
        assert r["layer_group"] == "res.0-1" and r["group"] == os.path.basename(os.path.dirname(final))
        # FVU recomputed from the store's held-out rows of that layer, with that layer's norm scale
        x = store.rows(r["site"], "heldout")[0].astype(np.float64)
        xs = x * store.norm_scale(r["site"])
        pre = xs @ arrays["W_enc"][0, r["member"]] + arrays["b_enc"][0, r["member"]]
        f = np.where(pre > arrays["threshold"][0, r["member"]], pre, 0)
        x_hat = f @ arrays["W_dec"][0, r["member"]] + arrays["b_dec"][0, r["member"]]
        fvu = ((xs - x_hat) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum()
        assert r["fvu"] == pytest.approx(fvu, rel=1e-4, abs=1e-6)
        assert r["delta_lm_loss"] is not None and r["kl"] is not None  # spliced into this layer
        # released once per layer, normalization of that layer folded in: the raw-space FVU is the same
        e = [e for e in suite.entries if e.site == r["site"] and e.l0 == r["l0"]][0]
        assert e.layer_group == ("res.0", "res.1")
        sae = suite.get(r["site"], width=r["width"], l0=r["l0"])
        raw_fvu = ((x - np.asarray(sae(x.astype(np.float32)), np.float64)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        assert raw_fvu == pytest.approx(fvu, rel=1e-3)


def test_analysis_grouping_is_printed_as_the_config_value():
    from saejax.analyze import layers
    assert layers.config_value([[3, 4, 5], [0, 1, 2]]) == "((0, 1, 2), (3, 4, 5))"
    assert layers.config_value([[0, 2], [1]]) == "((0,), (1,), (2,))"  # not adjacent: cut into runs
    value = layers.config_value([[0, 1, 2, 3]])
    c = cfg.load(SYNTH, ["--config.train.source=store", "--config.harvest.kinds=('res',)",
                         "--config.harvest.layers=(0,1,2,3)", f"--config.sae.layer_groups={value}"])
    assert cfg.layer_pools(c) == {"res.0-3": ("res.0", "res.1", "res.2", "res.3")}
