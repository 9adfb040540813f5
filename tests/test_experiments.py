"""Every experiment config runs end to end in its tiny mode (`:runlocal`), so no config rots; the
default's run ends in a release that loads back and encodes like the trained SAE it came from."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "experiments", "*.py")))


def _saejax(*args, cwd):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "saejax.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=900)


@pytest.mark.parametrize("name", [c for c in CONFIGS if c != "default"])
def test_config_runs_in_tiny_mode(name, tmp_path):
    spec = os.path.join(REPO, "experiments", f"{name}.py") + ":runlocal"
    stage = "train" if name == "synthetic" else "run"  # the synthetic source has no model to harvest
    out = _saejax(stage, "--config", spec, f"--config.workdir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    assert glob.glob(str(tmp_path / "train" / "*" / "final" / "params.safetensors"))
    if stage == "run":
        assert (tmp_path / "release" / "suite.json").is_file()


def test_default_pipeline_end_to_end_and_release_loads(tmp_path):
    spec = os.path.join(REPO, "experiments", "default.py") + ":runlocal"
    # The dry run prints the plan and writes nothing.
    dry = _saejax("run", "--config", spec, f"--config.workdir={tmp_path}", "--dry_run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert not (tmp_path / "store" / "manifest.json").exists()

    out = _saejax("run", "--config", spec, f"--config.workdir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    suite_doc = json.loads((tmp_path / "release" / "suite.json").read_text())
    assert suite_doc["saes"], "an empty release"
    for stage in ("store", "train", "evaluate", "release"):
        assert (tmp_path / stage).is_dir()

    # A second run finds every stage complete and redoes nothing.
    again = _saejax("run", "--config", spec, f"--config.workdir={tmp_path}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("is complete") == 4, again.stderr[-3000:]

    # The released SAE (normalization folded in) on raw activations gives the trained SAE's
    # latents scaled by C = 1 / norm_scale.
    import saejax
    from saejax.sae import io as sae_io
    from saejax.store import open_store
    suite = saejax.load_suite(str(tmp_path / "release"))
    entry = suite.index()[0]
    sae = suite.get(entry["site"], width=entry["width"], l0=entry["l0"])
    store = open_store(str(tmp_path / "store"))
    x, _ = store.rows(entry["site"], "heldout")
    x = x[:64]
    z = np.asarray(sae.encode(x))
    assert z.shape == (64, entry["width"])
    assert (z > 0).sum(1).mean() > 0, "the released SAE never fires on held-out rows"
    rec = np.asarray(sae.decode(z))
    fvu = ((rec - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert fvu < 1.0, fvu


def test_gemma_dry_run_plans_the_slice_offline(tmp_path, monkeypatch):
    """No network, two devices here: the Gemma 2 2B dry run still prints the store, the steps and
    the per-device memory of each group's v5p mesh (built-in Gemma 2 shapes, the meshes from the
    slice's shape alone)."""
    spec = os.path.join(REPO, "experiments", "gemma2_2b.py") + ":width=16k"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = _saejax("run", "--config", spec, f"--config.workdir={tmp_path}", "--dry_run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "res.25: width 2304" in text and "att.25: width 2048" in text  # Gemma 2 2B's site widths
    assert "needs 64 devices" in text
    line = next(ln for ln in text.splitlines() if "[jumprelu_d2304_w16384] dry run:" in ln)
    # (52 sites + 4 idle slots) x 5 targets x (2 x 2304 x 16384 + 16384 + 16384 + 2304) fp32, over
    # stack 8 x latent 8: mesh.plan = "auto" and mesh.pad_sites = "auto" give each group its own
    # padding and mesh (the 26 att sites alone allow only stack 2; padded to 32 slots, 32)
    assert "per device: params 1,260.9 MiB" in line, line
    assert "mesh {'data': 1, 'stack': 8, 'latent': 8}" in next(
        ln for ln in text.splitlines() if ln.startswith("[jumprelu_d2304_w16384] 52 sites + 4 idle slots x 5"))
    assert "mesh {'data': 1, 'stack': 32, 'latent': 2}" in next(  # bf16 matmuls: the planner's choice
        ln for ln in text.splitlines() if ln.startswith("[jumprelu_d2048_w16384] 26 sites + 6 idle slots x 5"))
    assert "(50.9% of bf16 peak in useful work)" in text
    # the step compiled on 64 virtual devices, projected on v5p, and the planner's proposal
    assert "[jumprelu_d2304_w16384] step cost per device, compiled program" in text
    assert "[jumprelu_d2304_w16384] projected on v5p" in text and "mesh planner (64 v5p chips)" in text
    assert not any(tmp_path.iterdir())


def _docstring_memory(name):
    """(group, mesh) rows, (variant, peak GiB text) rows and the harvest line's GB text from a
    config's docstring."""
    import re
    path = os.path.join(REPO, "experiments", f"{name}.py")
    text = open(path).read()
    meshes = re.findall(r"^\s+(jumprelu_\S+)\s.*?(\d+) sites(?: \+ (\d+) idle slots)?\s+mesh data (\d+) x stack (\d+) "
                        r"x latent (\d+)$", text, re.M)
    peaks = re.findall(r"^\s+(:width=\S+|both widths)\s+peak ([\d.,]+) GiB per device$", text, re.M)
    harvest = re.search(r"^\s+harvest\s+shuffle buffers ~([\d.,]+ [GT]B) per process", text, re.M)
    return path, meshes, peaks, harvest.group(1) if harvest else None


@pytest.mark.parametrize("name", ["gemma2_2b", "gemma2_9b"])
def test_docstring_memory_equals_the_dry_run(name, monkeypatch):
    """The meshes and memory figures a Gemma config's docstring quotes are what the dry run computes:
    each group's idle slots and mesh (mesh.plan = "auto": the planner's per group, cost.plan_meshes, for the slice
    the config names and one process per host), the job's per-device peak for each width set
    (cost.memory_plan, what the dry run prints) and the harvest's shuffle buffers per process."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from saejax import chips, config as cfg, models
    from saejax.sources import PlannedSource
    from saejax.store import harvest
    from saejax.store.plan import Plan, fmt_bytes
    from saejax.train import cost
    from saejax.train.plan import plan_groups
    path, meshes, peaks, buffers = _docstring_memory(name)
    assert len(meshes) == 4 and len(peaks) == 3 and buffers, "the docstring's memory block is missing"
    quoted = {g: (int(n), int(pad or 0), tuple(map(int, m))) for g, n, pad, *m in meshes}
    seen = {}
    for variant, peak in peaks:
        config = cfg.load(path + (variant if variant.startswith(":") else ""))
        assert config.mesh.plan == "auto"
        n = cost.math.prod(cost.sizes_of(config.mesh).values())
        model = models.load_shape(config.model.source)
        plans = plan_groups(config, PlannedSource({s: int(model.site_width(s)) for s in cfg.sites(config)}))
        plans, got = cost.plan_meshes(config, plans, n, n // chips.get(config.mesh.target_chip).chips_per_host)
        for (spec, _), sizes in zip(plans, got):  # sites, idle slots (mesh.pad_sites) and mesh
            assert quoted[spec.name] == (spec.n_sites, spec.pad, cost.key(sizes)), (variant, spec.name, sizes)
            seen[spec.name] = sizes
        gib = cost.memory_plan(config, plans, got)["peak"] / 2 ** 30
        assert f"{gib:,.2f}" == peak, (variant, gib, peak)
    assert set(seen) == set(quoted)
    pc = harvest._target_processes(config, 1, 1)
    assert fmt_bytes(Plan(config, model, None, pc).buffer_bytes) == buffers


@pytest.mark.parametrize("spec,widths", [("gemma3.py:size=27b", ("res.61: width 5376", "att.61: width 4096")),
                                         ("qwen3.py:size=8b", ("res.35: width 4096", "att.35: width 4096")),
                                         ("olmo2.py:size=13b", ("res.39: width 5120", "att.39: width 5120"))])
def test_new_family_dry_runs_plan_offline(spec, widths, tmp_path, monkeypatch):
    """No network: Gemma 3 27B, Qwen 3 8B and OLMo 2 13B dry runs print their sites, store and
    per-device memory from the built-in shapes, and write nothing."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = _saejax("run", "--config", os.path.join(REPO, "experiments", spec), f"--config.workdir={tmp_path}",
                  "--dry_run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    for w in widths:
        assert w in text
    assert "dry run:" in text and "per device: params" in text
    assert not any(tmp_path.iterdir())
