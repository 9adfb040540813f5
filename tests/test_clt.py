"""Cross-layer transcoders (saejax/sae/clt.py, saejax/train/clt_step.py): sparse decoding equals
dense below its cap, a planted cross-layer map is recovered, 1 device = 8 virtual devices, bitwise
resume."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import mesh as meshlib
from saejax.data.synthetic_clt import SyntheticCLT
from saejax.sae import clt, clt_io
from saejax.train import loop, optim
from saejax.train.clt_step import CLTTrainer

SPARS = {"jumprelu": 0.01, "topk": 4.0, "batchtopk": 4.0}


def _small(arch, cap):
    # block_bytes small enough for several row blocks: the blocked map and scan are exercised
    return clt.CLTSpec(arch=arch, layers=(0, 1, 2), d_in=8, d_out=6, width=32, sparsity=SPARS[arch], cap=cap,
                       block_bytes=2304, threshold_init=0.3, bandwidth=0.2)


def _inputs(spec):
    p = clt.init_params(spec, jax.random.key(0))
    p = dict(p, b_dec=jnp.linspace(-1, 1, 18).reshape(3, 6))
    return p, jax.random.normal(jax.random.key(1), (3, 16, 8)), jax.random.normal(jax.random.key(2), (3, 16, 6))


def _grads(spec, sparse):
    p, x, y = _inputs(spec)
    (loss, terms), g = jax.value_and_grad(lambda q: clt.loss_terms(spec, q, x, y, 0.1, sparse=sparse),
                                          has_aux=True)(p)
    return loss, terms, g


@pytest.mark.parametrize("arch", ["jumprelu", "topk", "batchtopk"])
def test_sparse_decoding_equals_dense_below_cap(arch):
    """Loss and every gradient (thresholds' pseudo-derivatives included) within 1e-5; above the cap
    the sparse loss differs and the overflow says so."""
    spec = _small(arch, 32 if arch == "jumprelu" else 16)  # jumprelu: cap = M, nothing over it
    assert clt.row_block(spec, 16) < 16
    ld, td, gd = _grads(spec, False)
    ls, ts, gs = _grads(spec, True)
    assert float(jnp.max(ts["overflow"])) == 0.0
    assert abs(float(ld - ls)) <= 1e-5 * abs(float(ld))
    for a, b in zip(jax.tree_util.tree_leaves(gd), jax.tree_util.tree_leaves(gs)):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(a))))
    assert float(jnp.max(jnp.abs(gd["W_dec"][0]))) > 0  # the gradients compared are not all zero
    if arch == "jumprelu":  # with a cap below the active count: rows over it, a different loss
        lc, tc, _ = _grads(_small(arch, 4), True)
        assert float(jnp.max(tc["overflow"])) > 0 and abs(float(lc - ld)) > 1e-3


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_sharded_sparse_decoding_per_shard_cap(arch):
    """On data 2 x latent 4 each latent shard decodes its own latents, at most ``shard_cap``: TopK's
    k (exact), JumpReLU's cap / 4. Below it, loss and gradients equal one device's dense ones (1e-5);
    JumpReLU with a cap some shard's rows exceed: the overflow says so and the loss differs."""
    mesh = meshlib.make_mesh(dict(data=2, stack=1, latent=4), jax.devices()[:8])

    def sharded(spec):
        p, x, y = _inputs(spec)
        return jax.jit(lambda p, x, y: clt.loss_and_grad(spec, p, x, y, 0.1, mesh, sparse=True))(p, x, y)

    spec = _small(arch, 32 if arch == "jumprelu" else 4)  # jumprelu: 8 per shard, all of its latents
    assert clt.shard_cap(spec, 4) == (8 if arch == "jumprelu" else 4)
    ld, td, gd = _grads(spec, False)
    (ls, ts), gs = sharded(spec)
    assert float(jnp.max(ts["overflow"])) == 0.0
    assert abs(float(ld - ls)) <= 1e-5 * abs(float(ld))
    np.testing.assert_allclose(ts["fvu"], td["fvu"], rtol=1e-5)
    np.testing.assert_array_equal(ts["fired"], td["fired"])
    for a, b in zip(jax.tree_util.tree_leaves(gd), jax.tree_util.tree_leaves(gs)):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(a))))
    if arch == "jumprelu":  # cap 8: 2 per shard, below some rows' active latents
        (lc, tc), _ = sharded(_small(arch, 8))
        assert float(jnp.max(tc["overflow"])) > 0 and abs(float(lc - ld)) > 1e-3


def _planted_cos(src, params, l):
    """Each planted feature of layer l: the best cosine of its concatenated decoder with a latent's."""
    P = src.dec[l].reshape(src.n, -1)
    P = P / np.linalg.norm(P, axis=1, keepdims=True)
    Q = np.asarray(params["W_dec"][l]).reshape(-1, P.shape[1])
    sim = P @ Q.T
    return sim.max(1), sim.argmax(1)


def test_planted_cross_layer_map_recovered():
    """Latents at layer l that write known directions into l and a later layer: the trained CLT's
    concatenated decoders match them (the init's do not), and the recovered latents write most
    into the planted later layer."""
    src = SyntheticCLT(layers=3, d=32, n_features=32, active=3, noise=0.01)
    spec = clt.CLTSpec(arch="topk", layers=(0, 1, 2), d_in=32, d_out=32, width=64, sparsity=3.0)
    hp = optim.Hyper(total_steps=400, batch_size=256, lr=3e-3, lr_warmup=10, sparsity_warmup=0, dead_steps=50)
    mesh = meshlib.make_mesh(dict(data=1, stack=1, latent=1), jax.devices()[:1])
    tr = CLTTrainer(spec, hp, mesh)
    init = tr.init_state()["params"]
    assert np.mean(_planted_cos(src, init, 0)[0] > 0.9) == 0
    st = loop.train_group(spec, hp, src, mesh, trainer=tr, progress=False)
    held = tr.heldout_metrics(st, tr.put_batch(tr.local_heldout(src)))
    assert np.all(np.asarray(held["heldout_fvu"]) < 0.2)
    for l in range(3):
        cos, best = _planted_cos(src, st["params"], l)
        assert np.mean(cos > 0.9) >= 0.65, (l, np.round(cos, 2))
        if l < 2:  # where a recovered cross-layer latent writes: its planted target beats the other later layer
            W = np.asarray(st["params"]["W_dec"][l])
            ok = cos > 0.9
            norms = np.linalg.norm(W[best[ok]], axis=-1)  # [n_ok, L - l]
            later = np.argmax(norms[:, 1:], -1) + l + 1
            assert np.mean(later == src.targets[l][ok]) >= 0.95


def _run(arch, sparse, mesh_sizes, n, steps=3):
    src = SyntheticCLT(layers=3, d=16, n_features=24, active=3)
    spec = clt.CLTSpec(arch=arch, layers=(0, 1, 2), d_in=16, d_out=16, width=32, sparsity=SPARS[arch],
                       cap=32 if arch == "jumprelu" else 8, decode="sparse" if sparse else "dense",
                       threshold_init=0.05)
    hp = optim.Hyper(total_steps=steps, batch_size=64, lr=1e-3, lr_warmup=1, sparsity_warmup=0, dead_steps=5)
    mesh = meshlib.make_mesh(mesh_sizes, jax.devices()[:n])
    tr = CLTTrainer(spec, hp, mesh)
    st = tr.init_state()
    for s in range(steps):
        st, m = tr.step(st, tr.put_batch(tr.local_batch(src, s)))
    return jax.tree_util.tree_map(np.asarray, jax.device_get(st["params"])), jax.device_get(m)


@pytest.mark.parametrize("arch,sparse", [("jumprelu", True), ("batchtopk", False), ("topk", True)])
def test_one_device_equals_eight(arch, sparse):
    """data 2 x latent 4 on 8 virtual CPU devices gives the single-device parameters and metrics."""
    p1, m1 = _run(arch, sparse, dict(data=1, stack=1, latent=1), 1)
    p8, m8 = _run(arch, sparse, dict(data=2, stack=1, latent=4), 8)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p8)):
        assert np.max(np.abs(a - b)) <= 1e-5 * max(1.0, np.max(np.abs(a)))
    np.testing.assert_allclose(m1["fvu"], m8["fvu"], rtol=1e-5)
    np.testing.assert_array_equal(m1["l0"], m8["l0"])


def test_stack_axis_refused():
    mesh = meshlib.make_mesh(dict(data=1, stack=2, latent=1), jax.devices()[:2])
    spec = clt.CLTSpec(arch="topk", layers=(0, 1), d_in=8, d_out=8, width=16, sparsity=2.0)
    with pytest.raises(meshlib.MeshError, match="mesh.stack=2: a CLT is one dictionary"):
        CLTTrainer(spec, optim.Hyper(total_steps=1, batch_size=8), mesh)


def test_resume_bitwise(tmp_path):
    """6 steps straight = 3 steps, checkpoint, a new trainer resuming to 6: bitwise."""
    src = SyntheticCLT(layers=2, d=16, n_features=16, active=2)
    spec = clt.CLTSpec(arch="jumprelu", layers=(0, 1), d_in=16, d_out=16, width=32, sparsity=0.01,
                       threshold_init=0.05, cap=8)
    mesh = meshlib.make_mesh(dict(data=1, stack=1, latent=1), jax.devices()[:1])
    hp = optim.Hyper(total_steps=6, batch_size=32, lr=1e-3, lr_warmup=2, sparsity_warmup=3, dead_steps=5)
    straight = loop.train_group(spec, hp, src, mesh, progress=False, trainer=CLTTrainer(spec, hp, mesh))
    hp3 = optim.Hyper(**{**hp.__dict__, "total_steps": 3})
    d = str(tmp_path / "ck")
    # the same schedules (total_steps only bounds the loop here: no lr decay)
    loop.train_group(spec, hp3, src, mesh, progress=False, trainer=CLTTrainer(spec, hp3, mesh), ckpt_dir=d,
                     checkpoint_every=3)
    resumed = loop.train_group(spec, hp, src, mesh, progress=False, trainer=CLTTrainer(spec, hp, mesh), ckpt_dir=d,
                               checkpoint_every=3)
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(straight)), jax.tree_util.tree_leaves(jax.device_get(resumed))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("arch", ["jumprelu", "batchtopk", "topk"])
def test_circuit_tracer_round_trip(tmp_path, arch):
    """Our folder -> circuit-tracer's layout -> its own load_clt(folder): reconstructions of raw rows
    equal ours (the training module's, unfolded); TopK refused in one line."""
    src = SyntheticCLT(layers=3, d=16, n_features=24, active=3)
    spec = clt.CLTSpec(arch=arch, layers=(0, 1, 2), d_in=16, d_out=16, width=32, sparsity=SPARS[arch],
                       threshold_init=0.05)
    params = clt.init_params(spec, jax.random.key(3))
    params = dict(params, b_enc=params["b_enc"] + 0.05, b_dec=jnp.ones((3, 16)) * 0.1)
    s_in = [src.norm_scale(s) for s in spec.in_sites]
    s_out = [src.norm_scale(s) for s in spec.sites]
    bt = jnp.full((3,), 0.05)
    clt_io.save(str(tmp_path / "ours"), spec, params, bt, s_in, s_out)
    a, meta = clt_io.load(str(tmp_path / "ours"))
    x_raw = src.batch(list(spec.in_sites), 5, 32)
    y_mod = clt.forward(spec, params, jnp.asarray(x_raw) * jnp.asarray(s_in)[:, None, None], train=False,
                        bt_threshold=bt, sparse=False)["y_hat"] / jnp.asarray(s_out)[:, None, None]
    np.testing.assert_allclose(clt_io.reconstruct(a, meta, x_raw), np.asarray(y_mod), rtol=1e-4, atol=1e-5)
    if arch == "topk":
        with pytest.raises(clt_io.ExportError, match="TopK CLT has no circuit-tracer export"):
            clt_io.write_circuit_tracer(str(tmp_path / "ct"), a, meta, 3)
        return
    with pytest.raises(clt_io.ExportError, match="covers every layer 0..3"):
        clt_io.write_circuit_tracer(str(tmp_path / "ct"), a, meta, 4)
    clt_io.write_circuit_tracer(str(tmp_path / "ct"), a, meta, 3)
    torch = pytest.importorskip("torch")
    ct = pytest.importorskip("circuit_tracer.transcoder.cross_layer_transcoder")
    model = ct.load_clt(str(tmp_path / "ct"), device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        y_ct = model(torch.from_numpy(x_raw)).numpy()
    assert np.abs(np.asarray(y_mod)).max() > 0.1
    np.testing.assert_allclose(y_ct, np.asarray(y_mod), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("override,key", [
    ("clt.arch=relu", "clt.arch"), ("clt.sparsity=2.5", "clt.sparsity"), ("clt.layers=(3,1)", "clt.layers"),
    ("clt.decode=fast", "clt.decode"), ("clt.cap=2", "clt.cap"), ("clt.matryoshka=(16,8)", "clt.matryoshka"),
    ("clt.matryoshka=(0.5,0.9)", "clt.matryoshka")])
def test_config_errors_one_line(override, key):
    from saejax import config as cfg
    extra = ["clt.arch=topk", "clt.sparsity=4.0"] if key in ("clt.sparsity", "clt.cap") else []
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load("experiments/synthetic.py", ["clt.enabled=True", *extra, override])
    assert f"config key '{key}'" in str(e.value) and "\n" not in str(e.value)


def test_plan_clt_from_config():
    from saejax import config as cfg
    from saejax.train.clt_step import plan_clt
    c = cfg.load("experiments/synthetic.py", ["clt.enabled=True", "clt.width=64"])
    spec, hp = plan_clt(c, SyntheticCLT(layers=3, d=16))
    assert spec.layers == (0, 1, 2) and spec.d_in == 16 and spec.width == 64 and hp.batch_size == c.train.batch_size
    assert spec.matryoshka == ()
    c.clt.matryoshka = (0.25, 1.0)
    assert plan_clt(c, SyntheticCLT(layers=3, d=16))[0].matryoshka == (16, 64)
    c.clt.layers = (1, 3)
    with pytest.raises(cfg.ConfigError, match="site mlp_in.3 is not in the training source"):
        plan_clt(c, SyntheticCLT(layers=3, d=16))


def test_pipeline_evaluate_release_load(tmp_path):
    """smollm2_clt:runlocal end to end: evaluate's per-layer FVU equals one recomputed from the store's
    held-out rows; the transcoders' replacement model is reported beside the CLT's, on the same
    positions; the release holds the CLT (saejax and circuit-tracer layouts); load_suite's CLT
    reconstructs as the trained one and, spliced, replaces every MLP output from the same pass's inputs."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "saejax.cli", "run", "--config",
                          os.path.join(repo, "experiments", "smollm2_clt.py") + ":runlocal",
                          f"--config.workdir={tmp_path}"], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "replacement model (every MLP at once)" in out.stdout
    with open(tmp_path / "evaluate" / "results.json") as fh:
        doc = json.load(fh)
    c = doc["clts"][0]
    assert c["layers"] == [0, 1, 2, 3] and c["model_layers"] == 4
    card = (tmp_path / "evaluate" / c["per_layer"][1]["card"]).read_text()  # layer 1's latents write to 1..3
    assert "<td>mlp.1</td>" in card and "<td>mlp.3</td>" in card and "<td>mlp.0</td>" not in card
    r = c["replacement"]
    assert np.isfinite(r["delta_lm_loss"]) and r["kl"] > 0 and r["ce_ablate"] != r["ce_clean"]
    # evaluate.replacement (on in smollm2_clt): the skip-transcoder group's members replace every MLP at
    # once too, on the same contexts and positions as the CLT (its clean and all-ablated CEs)
    tc = [e for e in doc["saes"] if e["kind"] == "transcoder"]
    members = sorted({e["member"] for e in tc})
    assert [(t["group"], t["member"]) for t in doc["replacements"]] == [(tc[0]["group"], k) for k in members]
    for t in doc["replacements"]:
        assert t["layers"] == [0, 1, 2, 3] and t["skip"] and np.isfinite(t["delta_lm_loss"]) and t["kl"] > 0
        assert t["ce_positions"] == r["ce_positions"]
        assert t["ce_clean"] == pytest.approx(r["ce_clean"], abs=1e-5)
        assert t["ce_ablate"] == pytest.approx(r["ce_ablate"], abs=1e-5)
        assert t["l0_total"] == pytest.approx(sum(e["l0"] for e in tc if e["member"] == t["member"]))
        assert f"transcoders {t['group']} member {t['member']} (4 layers" in out.stdout

    from saejax import models, store as storelib
    st = storelib.open_store(str(tmp_path / "store"))
    x = np.stack([st.rows(f"mlp_in.{l}", "heldout")[0] for l in range(4)]).astype(np.float32)
    y = np.stack([st.rows(f"mlp.{l}", "heldout")[0] for l in range(4)]).astype(np.float64)
    a, meta = clt_io.load(str(tmp_path / "train" / c["id"] / "final"))
    y_hat = clt_io.reconstruct(a, meta, x)
    for j in range(4):
        fvu = np.sum((y[j] - y_hat[j]) ** 2) / np.sum((y[j] - y[j].mean(0)) ** 2)
        assert abs(fvu - c["per_layer"][j]["fvu"]) <= 1e-4 * fvu

    import saejax
    suite = saejax.load_suite(str(tmp_path / "release"))
    assert suite.clts() == [c["id"]]
    released = suite.clt()
    np.testing.assert_allclose(released.reconstruct(x[:, :64]), y_hat[:, :64], rtol=1e-4, atol=1e-5)
    model = models.load("random:tiny-llama", dtype="float32")
    toks = np.asarray(st.heldout_tokens())[:2]
    sites = tuple(f"{k}.{l}" for l in range(4) for k in ("mlp_in", "mlp"))
    _, clean = model.apply(model.params, jnp.asarray(toks), sites=sites, logits=False)
    _, spl = model.apply(model.params, jnp.asarray(toks), sites=sites, logits=False, splice=released.splice())
    want = released.reconstruct(np.stack([np.asarray(spl[f"mlp_in.{l}"]) for l in range(4)]))
    for l in range(4):
        np.testing.assert_allclose(np.asarray(spl[f"mlp.{l}"]), want[l], rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.asarray(spl["mlp_in.1"]), np.asarray(clean["mlp_in.1"]))  # layer 1 saw layer 0's replacement

    with open(tmp_path / "release" / "suite.json") as fh:
        suite_doc = json.load(fh)
    entry = suite_doc["clts"][0]
    # the released transcoder members' replacement models, as evaluate measured them, in suite.json and README
    held = {(s["source"]["group"], s["source"]["member"]) for s in suite_doc["saes"] if s["kind"] == "transcoder"}
    assert held and suite_doc["replacements"] == [t for t in doc["replacements"] if (t["group"], t["member"]) in held]
    readme = (tmp_path / "release" / "README.md").read_text()
    t = suite_doc["replacements"][0]
    assert "## Transcoders as a replacement model" in readme
    assert f"| {t['group']} | {t['member']} | 4 | {t['l0_total']:.1f} | {t['delta_lm_loss']:.4f} |" in readme
    torch = pytest.importorskip("torch")
    ct = pytest.importorskip("circuit_tracer.transcoder.cross_layer_transcoder")
    loaded = ct.load_clt(str(tmp_path / "release" / entry["circuit_tracer"]), device=torch.device("cpu"),
                         dtype=torch.float32)
    with torch.no_grad():
        y_ct = loaded(torch.from_numpy(x[:, :64])).numpy()
    np.testing.assert_allclose(y_ct, y_hat[:, :64], rtol=1e-4, atol=1e-4)


def test_gemma2_2b_clt_variant_planned_as_its_docstring_says(monkeypatch):
    """experiments/gemma2_2b.py:clt: 26 layers x 16k, sparse decoding; with mesh.plan = "auto" the
    CLT's mesh is the planner's (cost.plan_meshes, stack 1, never padded), and the docstring quotes that mesh, the
    job's per-device peak (cost.memory_plan, the dry run's figure) and the CLT's state on it."""
    import os
    import re

    from saejax import chips, config as cfg, models
    from saejax.sources import PlannedSource
    from saejax.train import clt_step, cost
    from saejax.train.plan import plan_groups
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "gemma2_2b.py")
    c = cfg.load(path + ":clt")
    assert c.mesh.plan == "auto"
    model = models.load_shape(c.model.source)
    src = PlannedSource({s: int(model.site_width(s)) for s in cfg.sites(c)})
    spec, hp = clt_step.plan_clt(c, src)
    assert spec.layers == tuple(range(26)) and spec.width == 16384 and spec.sparse
    plans = plan_groups(c, src) + [(spec, hp)]
    n = cost.math.prod(cost.sizes_of(c.mesh).values())
    plans, meshes = cost.plan_meshes(c, plans, n, n // chips.get(c.mesh.target_chip).chips_per_host)
    text = open(path).read()
    name, *sizes, peak = re.search(r"^\s+:clt\s+(\S+)\s+mesh data (\d+) x stack (\d+) x latent (\d+), "
                                   r"peak ([\d.,]+) GiB per device$", text, re.M).groups()
    assert name == spec.name and cost.key(meshes[-1]) == tuple(map(int, sizes)) and meshes[-1]["latent"] > 1
    m = cost.memory_plan(c, plans, meshes)
    assert f"{m['peak'] / 2 ** 30:,.2f}" == peak and m["peak_group"] == spec.name
    mem = m["groups"][spec.name]["mem"]
    mib = lambda k: f"{mem[k] / 2 ** 20:,.1f} MiB"  # noqa: E731
    assert (f"params {mib('params')}, optimizer\n{mib('optimizer')}, activations ~{mib('activations')} per device"
            in text)


def test_clt_latent_cards_show_top_contexts_and_the_layers_written(tmp_path):
    """A CLT layer's card: each latent's top held-out contexts are the rows where it fires most
    (a planted encoder: latent m reads coordinate m), and its per-layer decoder norms are those of
    the released (raw-space) decoder, zero-free from its own layer on."""
    import re
    import types

    from saejax import config as cfg
    from saejax.evaluate import _clt_cards, clt as clt_eval
    L, d, M, N = 2, 4, 3, 40
    rng = np.random.default_rng(0)
    W_enc = np.zeros((L, d, M), np.float32)
    W_enc[:, np.arange(M), np.arange(M)] = 1.0
    dec0 = np.zeros((M, 2, d), np.float32)
    dec0[:, 0, 0], dec0[:, 1, 1] = [0.6, 0.8, 0.0], [0.8, 0.6, 1.0]
    a = {"W_enc": W_enc, "b_enc": np.zeros((L, M), np.float32), "b_dec": np.zeros((L, d), np.float32),
         "threshold": np.full((L, M), 0.5, np.float32), "W_dec_0": dec0,
         "W_dec_1": np.ones((M, 1, d), np.float32) / 2}
    meta = {"layers": [0, 1], "arch": "jumprelu", "sparsity": 1e-3, "width": M,
            "norm_scale_in": [1.0, 1.0], "norm_scale_out": [1.0, 2.0]}
    x = (rng.random((N, d)) * 0.4).astype(np.float32)  # nothing fires...
    x[np.arange(N), np.arange(N) % M] = 1 + np.arange(N)  # ...but latent r % 3 on row r, at r + 1
    rmeta = np.stack([np.zeros(N), np.arange(N) // 8, np.arange(N) % 8], 1).astype(np.int64)
    data = types.SimpleNamespace(rows=lambda site: (x, rmeta), all_context_ids=np.arange(5),
                                 all_tokens=np.arange(5 * 8).reshape(5, 8) + 100)
    density, acts, idx = clt_eval.layer_top(a, meta, 0, x, np.array([0, 2]), 4, chunk=16)
    np.testing.assert_allclose(density, [14 / 40, 13 / 40, 13 / 40])
    np.testing.assert_array_equal(idx, [[39, 36, 33, 30], [38, 35, 32, 29]])
    np.testing.assert_allclose(acts, idx + 1.0)

    c = cfg.defaults()
    c.evaluate.latent_cards = 3
    res = {"id": "clt_x", "per_layer": [{"l0": 1.0, "fvu": 0.5}, {"l0": 1.0, "fvu": 0.4}]}
    (tmp_path / "cards").mkdir()
    paths = _clt_cards(res, a, meta, data, types.SimpleNamespace(tokenizer=None), c,
                       np.random.default_rng(0), str(tmp_path))
    assert paths == ["cards/clt.0__clt_x.html", "cards/clt.1__clt_x.html"]
    page = (tmp_path / paths[0]).read_text()
    writes = re.findall(r"<td>(mlp\.\d)</td><td class=act>([\d.e-]+)</td>", page)
    # latent m of layer 0 writes dec0[m, 0] to mlp.0 and dec0[m, 1] / 2 (mlp.1's scale) to mlp.1
    assert writes == [("mlp.0", "0.6"), ("mlp.1", "0.4"), ("mlp.0", "0.8"), ("mlp.1", "0.3"),
                      ("mlp.0", "0"), ("mlp.1", "0.5")]
    latent2 = page.split("<h2>latent 2</h2>")[1]
    assert latent2.index("<td class=act>39</td>") < latent2.index("<td class=act>36</td>")  # row 38: ctx 4 pos 6
    assert '<span class="hit">[138]</span>' in latent2 and "ctx 4 pos 6" in latent2
    page1 = (tmp_path / paths[1]).read_text()
    assert re.findall(r"<td>(mlp\.\d)</td><td class=act>([\d.e-]+)</td>", page1) == [("mlp.1", "0.5")] * 3  # norm 1 / scale 2


MAT = (5, 20, 32)  # on 4 latent shards of 8: boundaries inside shards


@pytest.mark.parametrize("arch", ["jumprelu", "topk", "batchtopk"])
def test_matryoshka_loss_is_the_prefixes_and_decodings_agree(arch):
    """The Matryoshka loss is the sum over prefixes of the loss with latents past m_i zeroed at every
    layer; sparse decoding (one device, and data 2 x latent 4 with prefix boundaries inside latent
    shards) and dense on the mesh give its loss and gradients within 1e-5; the logged mse is the
    full CLT's."""
    spec = dataclasses.replace(_small(arch, 32 if arch == "jumprelu" else 16), matryoshka=MAT)
    p, x, y = _inputs(spec)
    ld, td, gd = _grads(spec, False)
    out = clt.forward(spec, p, x, sparse=False)
    ref = 0.0
    for m in MAT:
        y_m = clt.decode_dense(spec, p["W_dec"], out["f"].at[..., m:].set(0.0)) + p["b_dec"][:, None]
        ref += float(jnp.sum(jnp.mean(jnp.sum(jnp.square(y_m - y), -1), -1)))
    ref += float(jnp.sum(td["sparsity_loss"]))
    assert abs(float(ld) - ref) <= 1e-5 * abs(ref)
    plain = dataclasses.replace(spec, matryoshka=())
    np.testing.assert_allclose(td["mse"], _grads(plain, False)[1]["mse"], rtol=1e-6)
    assert float(ld) > float(_grads(plain, False)[0]) + 1.0  # the prefixes' terms are there
    mesh = meshlib.make_mesh(dict(data=2, stack=1, latent=4), jax.devices()[:8])
    runs = [_grads(spec, True)[::2]]
    for sparse in (False, True):
        (ls, _), gs = jax.jit(lambda p, x, y: clt.loss_and_grad(spec, p, x, y, 0.1, mesh, sparse=sparse))(p, x, y)
        runs.append((ls, gs))
    for ls, gs in runs:
        assert abs(float(ld - ls)) <= 1e-5 * abs(float(ld))
        for a, b in zip(jax.tree_util.tree_leaves(gd), jax.tree_util.tree_leaves(gs)):
            assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(a))))


def test_matryoshka_prefix_reconstructs_on_its_own(tmp_path):
    """Trained on the planted cross-layer map with Zipfian feature frequencies, a Matryoshka CLT's first quarter of each layer's
    latents reconstructs every layer far better than the same quarter of a plain CLT trained alike,
    while its whole dictionary still recovers the map; evaluate's fvu_prefix (raw rows, the saved
    folder) says so, its last prefix being the CLT's fvu."""
    from saejax.evaluate import clt as clt_eval
    src = SyntheticCLT(layers=3, d=32, n_features=32, active=3, noise=0.01, zipf=1.0)
    hp = optim.Hyper(total_steps=300, batch_size=256, lr=3e-3, lr_warmup=10, sparsity_warmup=0, dead_steps=50)
    mesh = meshlib.make_mesh(dict(data=1, stack=1, latent=1), jax.devices()[:1])
    rows_in = list(src.batch([f"mlp_in.{l}" for l in range(3)], 10_000, 2048))
    rows_out = list(src.batch([f"mlp.{l}" for l in range(3)], 10_000, 2048))
    fvus = {}
    for mat in ((), (16, 64)):
        spec = clt.CLTSpec(arch="topk", layers=(0, 1, 2), d_in=32, d_out=32, width=64, sparsity=3.0, matryoshka=mat)
        st = loop.train_group(spec, hp, src, mesh, trainer=CLTTrainer(spec, hp, mesh), progress=False)
        path = str(tmp_path / f"m{len(mat)}")
        clt_io.save(path, spec, st["params"], st["bt_threshold"], [src.norm_scale(s) for s in spec.in_sites],
                    [src.norm_scale(s) for s in spec.sites], **({"matryoshka": list(mat)} if mat else {}))
        a, meta = clt_io.load(path)
        per_layer = clt_eval.layer_metrics(a, dict(meta, matryoshka=[16, 64]), rows_in, rows_out)
        fvus[mat] = np.array([m["fvu_prefix"] for m in per_layer])  # [L, 2]
        if mat:
            assert [m["fvu"] for m in per_layer] == list(fvus[mat][:, 1])
            assert [m["fvu_prefix"] for m in clt_eval.layer_metrics(a, meta, rows_in, rows_out)] == fvus[mat].tolist()
    from saejax.evaluate import clt_table
    table = clt_table({"id": "m", "arch": "topk", "layers": [0, 1, 2], "width": 64, "l0_total": 9.0,
                       "matryoshka": [16, 64], "per_layer": [{"site": f"mlp.{l}", **m} for l, m in enumerate(per_layer)]})
    assert "Matryoshka prefixes [16, 64]" in table and f"{fvus[(16, 64)][2, 0]:.3f} {fvus[(16, 64)][2, 1]:.3f}" in table
    assert np.all(fvus[(16, 64)][:, 1] < 0.2) and np.all(fvus[()][:, 1] < 0.2)
    assert np.all(fvus[(16, 64)][:, 0] < 0.8 * fvus[()][:, 0])


def test_release_readme_shows_a_matryoshka_clts_prefixes():
    """A Matryoshka CLT's README section says what its prefixes are and gives each layer's FVU per prefix."""
    from saejax.release import card
    c = {"id": "clt_x", "path": "clt/clt_x", "arch": "topk", "layers": [0, 1], "width": 64, "l0_total": 6.0,
         "matryoshka": [16, 64], "per_layer": [{"site": "mlp.0", "l0": 3.0, "fvu": 0.1, "dead_frac": 0.0,
                                                 "fvu_prefix": [0.6543, 0.1], "card": None}]}
    text = "\n".join(card._clt_lines([c]))
    assert "each prefix of [16, 64] latents of every layer is a CLT on its own" in text
    assert "| mlp.0 | 3.0 | 0.100 | 0.0% | 0.654 / 0.100 | - |" in text
    assert "FVU of each prefix" not in "\n".join(card._clt_lines([dict(c, matryoshka=None)]))
