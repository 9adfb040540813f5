"""What a long job needs around it (issue #23): TensorBoard / W&B metrics, progress lines, offline
hub sources, plots at 780 SAEs. The Hub upload's test is in test_release.py (it needs a release)."""
import json
import os
import socket
import sys
import types

import numpy as np
import pytest

from saejax import config as cfg
from saejax import log as loglib
from saejax import tracking
from saejax import workdir as wd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeWandb(types.ModuleType):
    """A recording stand-in for the wandb module: init returns a run that records log calls."""

    def __init__(self):
        super().__init__("wandb")
        self.runs = []

    def init(self, **kw):
        run = types.SimpleNamespace(kw=kw, logged=[], finished=False)
        run.log = lambda values, step=None: run.logged.append((step, dict(values)))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data


def test_train_metrics_reach_tensorboard_and_wandb(tmp_path, monkeypatch):
    """Every logging step of metrics.jsonl is in the group's event file, per SAE, and in its W&B run."""
    from saejax.train import loop
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    c = cfg.load(os.path.join(ROOT, "experiments", "synthetic.py:runlocal"),
                 [f"workdir={tmp_path}", "train.tokens=40960", "train.log_every=5", "sae.widths=(64,)",
                  "log.wandb=True", "log.wandb_mode=offline"])
    finals = loop.run(c)
    group = wd.group_of(finals[0])
    records = [json.loads(ln) for ln in open(wd.metrics_path(c, group))]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    tb = tracking.read_scalars(wd.tensorboard_run(c, f"train/{group}"))
    meta = json.load(open(os.path.join(finals[0], "group.json")))
    sites = meta["sites"]
    for name in ("loss", "l0", "fvu", "dead_frac", "heldout_fvu", "heldout_l0"):
        for t, site in enumerate(sites):
            for k in range(len(meta["sweep"])):
                tag = f"{name}/{tracking.sae_tag(group, site, k)}"
                want = [(r["step"], r[name][t][k]) for r in records]
                got = tb[tag]
                assert [s for s, _ in got] == [s for s, _ in want], tag
                np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6, err_msg=tag)
    assert [s for s, _ in tb["lr"]] == [5, 10, 15, 20]
    run, = fake.runs
    assert run.kw["name"] == f"train/{group}" and run.kw["mode"] == "offline" and run.finished
    assert run.kw["dir"] == wd.wandb_dir(c)
    assert [s for s, _ in run.logged] == [5, 10, 15, 20]
    assert run.logged[-1][1][f"fvu/{tracking.sae_tag(group, sites[1], 1)}"] == pytest.approx(records[-1]["fvu"][1][1])


def test_evaluation_results_reach_tensorboard(tmp_path):
    from saejax import evaluate
    c = cfg.defaults()
    c.workdir = str(tmp_path)
    results = [{"id": f"res.{i}__g__0", "site": f"res.{i}", "width": 8, "arch": "jumprelu", "sparsity": 1.0,
                "steps": 100, "l0": 3.0 + i, "fvu": 0.1 * i, "dead_frac": 0.0, "dense_10pct": 0.0,
                "delta_lm_loss": None if i else 0.5, "ce_score": 0.9, "kl": float("nan")} for i in range(3)]
    evaluate._track(c, results)
    tb = tracking.read_scalars(wd.tensorboard_run(c, "evaluate"))
    assert tb["l0/res.2__g__0"] == [(100, 5.0)] and tb["fvu/res.1__g__0"] == [(100, pytest.approx(0.1))]
    assert "delta_lm_loss/res.1__g__0" not in tb and "delta_lm_loss/res.0__g__0" in tb  # None: left out
    assert not any(t.startswith("kl/") for t in tb)  # non-finite: left out


def test_progress_lines_in_a_log_and_quiet(capsys, monkeypatch):
    """Off a terminal: one line per update (at most one per LINE_EVERY_S), with rate and ETA, then the
    last on close; --quiet: none, though notices still print."""
    p = loglib.Progress(10, "train g", unit="step", initial=2, every=0, tty=False)
    for i in range(3):
        p.update(2, L0=f"{i}")
    p.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4, lines
    assert lines[0].startswith("train g:  40% 4/10 [") and "<" in lines[0] and "step/s, L0=0]" in lines[0]
    assert lines[-1].startswith("train g:  80% 8/10 [")
    slow = loglib.Progress(10, "h", every=3600, tty=False)  # a long interval: only the closing line
    slow.update(5)
    slow.update(5)
    slow.close()
    only, = capsys.readouterr().err.splitlines()
    assert only.startswith("h: 100% 10/10 [")
    monkeypatch.setattr(loglib, "_quiet", True)
    q = loglib.Progress(10, "quiet", every=0, tty=False)
    q.update(5)
    q.write("a notice")
    q.close()
    assert q.n == 5 and capsys.readouterr().err == "a notice\n"


def test_offline_hf_dry_run_makes_no_network_attempt(tmp_path, monkeypatch, capsys):
    """HF_HUB_OFFLINE: no socket at all, the built-in Gemma 2 config at once, and a line saying so.
    An unreachable Hub without it: one connection attempt, no retries."""
    from huggingface_hub import constants
    from saejax import models
    attempts = []

    def refuse(*args, **kw):
        attempts.append(args[:1])
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    m = models.load_shape("hf:google/gemma-2-2b")
    assert m.config.n_layers == 26 and m.config.d_model == 2304
    assert attempts == []
    assert "offline (HF_HUB_OFFLINE is set): using saejax's built-in copy" in capsys.readouterr().err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    m = models.load_shape("hf:google/gemma-2-9b")
    assert m.config.n_layers == 42 and len(attempts) == 1
    assert "is unreachable" in capsys.readouterr().err
    with pytest.raises(models.ModelError, match="offline .* not in the Hugging Face cache"):
        models.load_shape("hf:someone/unknown-model")
    assert len(attempts) == 2


def _suite_780():
    """suite.json entries of a Gemma 2 2B-sized suite: 26 layers x 3 kinds x 2 widths x 5 L0s."""
    rng = np.random.default_rng(0)
    saes = []
    bins = np.linspace(-6.0, 0.0, 25)
    for layer in range(26):
        for kind in ("res", "att", "mlp"):
            for width in (16384, 65536):
                for l0 in (10, 20, 40, 80, 160):
                    counts = np.histogram(rng.normal(-3 + layer / 26, 0.8, 500), bins)[0]
                    saes.append({"site": f"{kind}.{layer}", "kind": kind, "layer": layer, "width": width,
                                 "arch": "jumprelu", "k": None, "l0": l0 * 1.02,
                                 "metrics": {"l0": l0 * 1.02, "fvu": 0.3 / np.sqrt(l0) + 0.01 * layer,
                                             "delta_lm_loss": 0.5 / np.sqrt(l0) * (1 + layer / 10),
                                             "dead_frac": 0.01,
                                             "density_hist": {"log10_bins": bins.tolist(),
                                                              "counts": counts.tolist()}}})
    return saes


def test_plots_stay_readable_at_780_saes(tmp_path):
    """One panel per site kind, one line per (layer, width), no per-line legend: the figure's panels,
    lines and legend entries are bounded by kinds, layers and widths, not by the SAE count."""
    from huggingface_hub.repocard import metadata_load
    from saejax.release import card
    saes = _suite_780()
    assert len(saes) == 780
    for plot in (card.plot_l0_fvu, card.plot_delta_loss):
        fig = plot(saes, str(tmp_path / "p.png"))
        panels = [ax for ax in fig.axes if ax.get_title()]
        assert [ax.get_title() for ax in panels] == ["residual stream", "attention output", "MLP output"]
        assert len(fig.axes) == 4  # three panels and the layer colour bar
        assert all(len(ax.get_lines()) == 26 * 2 for ax in panels)
        legends = [ax.get_legend() for ax in panels if ax.get_legend()]
        assert len(legends) == 1 and len(legends[0].get_texts()) == 2  # the two widths
    fig = card.plot_density(saes, str(tmp_path / "d.png"))
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 3 and all(len(ax.get_images()) == 1 for ax in panels)
    assert panels[0].get_images()[0].get_array().shape == (24, 26)  # frequency bins x layers
    suite = {"name": "big", "model": "hf:google/gemma-2-2b", "base_model": "google/gemma-2-2b", "contexts": 8,
             "saes": [dict(s, path="x/params.npz", saelens=None, card=None) for s in saes]}
    os.makedirs(tmp_path / "rel")
    card.write_readme(str(tmp_path / "rel"), suite)
    meta = metadata_load(str(tmp_path / "rel" / "README.md"))
    assert meta["base_model"] == "google/gemma-2-2b" and "library_name" not in meta  # no SAELens export
    assert "sparse-autoencoder" in meta["tags"]
