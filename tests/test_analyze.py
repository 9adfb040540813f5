"""saejax analyze: each analysis on synthetic data where the answer is known, on SAEs loaded with
load_suite from a folder in Gemma Scope's layout; the stage end to end on the default's tiny mode."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from saejax.analyze import absorption, dark_matter as dm, layers, seeds
from saejax.release import load_suite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gemma_scope_folder(root, saes):
    """A local folder in Gemma Scope's layout (no suite.json): {"layer_L/width_W/average_l0_N": params}."""
    for rel, params in saes.items():
        os.makedirs(root / rel)
        np.savez(root / rel / "params.npz", **{k: np.asarray(v, np.float32) for k, v in params.items()})
    return load_suite(str(root))


def projection_sae(basis, threshold=0.0):
    """A JumpReLU SAE whose latents are +-(x . q) for the columns q of ``basis`` [d, r]: with
    threshold 0 it reconstructs the projection of x on span(basis) exactly."""
    w_enc = np.concatenate([basis, -basis], axis=1)
    m = w_enc.shape[1]
    return {"W_enc": w_enc, "W_dec": w_enc.T, "b_enc": np.zeros(m), "b_dec": np.zeros(basis.shape[0]),
            "threshold": np.full(m, threshold)}


def test_dark_matter_regression_recovers_a_planted_linear_share():
    rng = np.random.default_rng(0)
    n, d = 6000, 12
    x = rng.standard_normal((2 * n, d)) * rng.uniform(0.5, 2.0, d)
    lin = x @ rng.standard_normal((d, d)) * 0.3
    noise = rng.standard_normal((2 * n, d)) * 0.5  # independent of x: no linear map predicts it
    e = lin + noise
    want = ((lin[n:] - lin[n:].mean(0)) ** 2).sum() / ((e[n:] - e[n:].mean(0)) ** 2).sum()
    got = dm.decompose(x[:n], e[:n], x[n:], e[n:])
    assert 0.3 < want < 0.9
    assert abs(got["linear_frac_variance"] - want) < 0.02, (got, want)
    assert abs(got["fvu_linear"] + got["fvu_nonlinear"] - got["fvu"]) < 1e-9
    # The error norm: planted as a linear function of x (plus a little noise), found as such.
    norm_target = np.abs(x[:, 0]) * 0 + 2.0 + x[:, 1]
    e2 = rng.standard_normal((2 * n, d))
    e2 *= (norm_target / np.linalg.norm(e2, axis=1))[:, None]
    assert dm.decompose(x[:n], e2[:n], x[n:], e2[n:])["norm_r2"] > 0.95


def test_dark_matter_on_gemma_scope_layout_finds_the_linear_error_of_a_projection(tmp_path):
    rng = np.random.default_rng(1)
    d = 16
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    suite = gemma_scope_folder(tmp_path / "gemma-scope-2b-pt-res", {
        "layer_3/width_16/average_l0_8": projection_sae(q[:, :8]),            # error (I - P) x: all linear
        "layer_3/width_32/average_l0_12": projection_sae(q, 2.0)})    # misses |x . q| < 2: mostly nonlinear
    x = rng.standard_normal((8000, d)).astype(np.float32) * 2
    out = {}
    for e in suite.select(site="res.3"):
        out[e.width], norm = dm.dark_matter(suite.load(e), x[:4000], x[4000:])
        out[e.width]["norm"] = norm
    assert out[16]["linear_frac_variance"] > 0.999 and abs(out[16]["fvu"] - 0.5) < 0.05
    # e_i = z_i 1(|z_i| < 1 sd) for z = q^T x: a linear map predicts 0.2 of its variance (Gaussian z)
    assert abs(out[32]["linear_frac_variance"] - 0.2) < 0.03, out[32]
    corr = dm.norm_correlation(["a", "b"], [16, 32], [out[16]["norm"], out[32]["norm"]])
    assert corr["cross_width"][0]["r"] == pytest.approx(np.corrcoef(out[16]["norm"], out[32]["norm"])[0, 1])


@pytest.mark.parametrize("full_max", [1000, 8])  # the Hungarian matching, and the candidate-restricted one
def test_identical_seeds_match_all_latents_even_permuted(tmp_path, full_max):
    rng = np.random.default_rng(2)
    d, m = 32, 40
    params = {"W_enc": rng.standard_normal((d, m)), "W_dec": rng.standard_normal((m, d)),
              "b_enc": rng.standard_normal(m) * 0.1, "b_dec": np.zeros(d), "threshold": np.full(m, 0.2)}
    perm = rng.permutation(m)
    twin = {"W_enc": params["W_enc"][:, perm], "W_dec": params["W_dec"][perm], "b_enc": params["b_enc"][perm],
            "b_dec": params["b_dec"], "threshold": params["threshold"][perm]}
    other = {k: (rng.standard_normal(v.shape) if k.startswith("W") else v) for k, v in params.items()}
    suite = gemma_scope_folder(tmp_path / "gs-res", {"layer_0/width_40/average_l0_10": params,
                                                     "layer_0/width_40/average_l0_11": twin,
                                                     "layer_0/width_40/average_l0_12": other})
    a, b, c = (suite.get("res.0", l0=v) for v in (10, 11, 12))
    x = rng.standard_normal((500, d)).astype(np.float32)
    same = seeds.stability(a, b, x, 0.7, full_max, candidates=3)
    assert same["method"] == ("hungarian" if full_max > m else "candidates")
    assert same["shared_decoder"] == 1.0 and same["shared_encoder"] == 1.0
    assert same["mean_cos_decoder"] == pytest.approx(1.0, abs=1e-5)
    assert sum(same["by_frequency"]["count"]) == m
    diff = seeds.stability(a, c, x, 0.7, full_max, candidates=3)
    assert diff["shared_decoder"] < 0.1  # random directions in 32 dims rarely reach 0.7


def test_candidate_matching_with_every_candidate_is_the_hungarian_optimum():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((30, 6)), rng.standard_normal((30, 6))
    pa, ca, ma = seeds.match(a, b, full_max=100)
    pb, cb, mb = seeds.match(a, b, full_max=1, candidates=30)
    assert (ma, mb) == ("hungarian", "candidates")
    assert cb.sum() == pytest.approx(ca.sum(), abs=1e-4)
    assert (pb >= 0).all() and len(set(pb)) == 30


def test_layers_from_near_identical_activations_group_together():
    rng = np.random.default_rng(4)
    n, d = 600, 24
    base = [rng.standard_normal((n, d)) for _ in range(3)]
    plan = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2, 7: 2}  # layer -> the activations it nearly copies
    meta = np.stack([np.zeros(n), np.arange(n) // 50, np.arange(n) % 50], 1).astype(np.int32)
    rows = {}
    for layer, src in plan.items():
        order = rng.permutation(n)  # each site stores its rows in its own order
        x = base[src] + 0.05 * rng.standard_normal((n, d))
        rows[layer] = (x[order], meta[order])
    out = layers.layer_groups(rows, k=3)
    assert out["groups"] == [[0, 1, 2], [3, 4], [5, 6, 7]] and out["contiguous"]
    adj = {(p["a"], p["b"]): p["angular_distance"] for p in out["adjacent"]}
    assert adj[(0, 1)] < 0.05 and adj[(2, 3)] > 0.3 and out["n_tokens"] == n


def test_first_letter_absorption_finds_a_planted_absorbing_latent_and_none_without(tmp_path):
    """Rows x = 2 u_letter + 2 v_token + noise for letters a, b, c (8 word tokens each, 60 rows
    per token) and two non-word tokens. The plain SAE has a latent per letter and per token; the
    planted one's letter-a latent is switched off on one test-fold a-token t*, whose own latent's
    decoder carries u_a: the a-rate is t*'s share of a's test rows, b and c stay 0."""
    rng = np.random.default_rng(5)
    d, per = 48, 60
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    u, v = basis[:, :3].T, basis[:, 3:27].T  # letter and token directions
    ids = np.arange(100, 124)
    words = {int(t): " " + "abc"[i // 8] + "xyzwvuts"[i % 8] * 2 for i, t in enumerate(ids)}
    words.update({200: " 42", 201: ","})
    tok = np.repeat(np.r_[ids, 200, 201], per)
    x = np.zeros((len(tok), d))
    for i, t in enumerate(ids):
        x[tok == t] = 2 * u[i // 8] + 2 * v[i]
    x[tok >= 200] = 2 * basis[:, 30]
    x = (x + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
    test_ids = sorted(set(tok[absorption.token_split(tok)]) & set(ids[:8]))
    star = int(test_ids[0]) - 100
    enc = np.concatenate([u, v]).T  # [d, 27]
    plain = {"W_enc": enc, "W_dec": enc.T.copy(), "b_enc": np.zeros(27), "b_dec": np.zeros(d), "threshold": np.ones(27)}
    planted = {k: a.copy() for k, a in plain.items()}
    planted["W_enc"][:, 0] -= 2 * v[star]  # the parent latent goes silent on t*
    planted["W_dec"][3 + star] = (u[0] + v[star]) / np.sqrt(2)  # t*'s latent carries the letter
    suite = gemma_scope_folder(tmp_path / "gs-res", {"layer_0/width_27/average_l0_2": plain,
                                                     "layer_0/width_27/average_l0_3": planted})
    probes = absorption.first_letter_probes(x, tok, lambda i: words[int(i[0])])
    assert probes["letters"] == ["a", "b", "c"] and min(probes["probe_f1"]) > 0.95 and probes["n_tokens"] == 24
    assert len(probes["skipped_few"]) == 23
    none = absorption.first_letter(suite.get("res.0", l0=2), probes)
    got = absorption.first_letter(suite.get("res.0", l0=3), probes)
    assert max(none["rates"]) < 0.01 and min(none["recalls"]) > 0.99 and none["main_latent"] == [0, 1, 2]
    a_test = probes["correct"][:, 0]
    want = (probes["x"][a_test] @ v[star] > 1).mean()  # t*'s share of the a rows counted
    assert 0.1 < want < 0.5
    assert got["rates"][0] == pytest.approx(want, abs=0.01) and max(got["rates"][1:]) < 0.01, got["rates"]
    assert got["main_latent"][0] == 0 and got["rate_ci"][0] <= got["rate"] <= got["rate_ci"][1]
    # Without the probe-projection share test, a latent that fires beside the parent changes nothing.
    assert absorption.first_letter(suite.get("res.0", l0=3), probes, share_min=0.0)["rates"][0] == pytest.approx(want, abs=0.01)


def _saejax(*args, cwd):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "saejax.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=900)


def test_run_chains_analyze_with_seed_twins_and_annotates_the_release_once(tmp_path):
    spec = os.path.join(REPO, "experiments", "default.py") + ":runlocal,plain"
    args = ("--config", spec, f"--config.workdir={tmp_path}", "--config.sae.seeds=2",
            "--config.harvest.kinds=('res',)", "--config.analyze.enabled=True", "--config.evaluate.latent_cards=0")
    out = _saejax("run", *args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    suite = json.loads((tmp_path / "release" / "suite.json").read_text())
    assert sorted({s["source"]["seed"] for s in suite["saes"]}) == [0, 1]
    assert any(s["path"].split("/")[-2].endswith("_seed1") for s in suite["saes"])
    analysis = tmp_path / "analysis"
    dark = json.loads((analysis / "dark_matter.json").read_text())
    assert len(dark["saes"]) == len(suite["saes"])
    assert all(0 <= s["fvu_nonlinear"] <= s["fvu"] + 1e-9 for s in dark["saes"])
    pairs = json.loads((analysis / "seeds.json").read_text())["pairs"]
    assert len(pairs) == len(suite["saes"]) // 2 and all(p["method"] == "hungarian" for p in pairs)
    groups = json.loads((analysis / "layer_groups.json").read_text())
    assert groups["layers"] == [0, 1] and sorted(sum(groups["groups"], [])) == [0, 1]
    assert suite["analysis"]["suite_sha256"] == json.loads((analysis / "summary.json").read_text())["suite_sha256"]
    for png in ("dark_matter.png", "seeds.png", "layer_groups.png"):
        assert (tmp_path / "release" / "analysis" / png).is_file()
    readme = (tmp_path / "release" / "README.md").read_text()
    assert readme.count("<!-- saejax:analysis -->") == 1 and "### Seed stability" in readme
    # Complete: a second run skips it; analyzing again replaces the section, not appends one.
    again = _saejax("run", *args, cwd=tmp_path)
    assert again.returncode == 0 and "analyze is complete" in again.stderr, again.stderr[-3000:]
    third = _saejax("analyze", *args, cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    readme2 = (tmp_path / "release" / "README.md").read_text()
    assert readme2.count("<!-- saejax:analysis -->") == 1 and readme2 == readme
    assert load_suite(str(tmp_path / "release")).meta["analysis"]["seeds"]
