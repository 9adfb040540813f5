"""Bad configuration is a one-line error naming the key, raised before anything compiles."""
import subprocess
import sys

import pytest

from saejax import config as cfg

SYNTH = "experiments/synthetic.py"


def test_overrides_are_typed():
    c = cfg.load(SYNTH, ["--config.train.lr=2e-4", "--config.sae.widths=(256,512)", "--config.sae.arch=topk",
                         "--config.sae.sparsity=8", "--config.train.batch_size=128"])
    assert c.train.lr == 2e-4 and c.sae.widths == (256, 512) and c.sae.arch == "topk"
    assert c.sae.sparsity == (8,)


@pytest.mark.parametrize("override, key", [
    ("--config.train.lrr=1", "train.lrr"),
    ("--config.trian.lr=1", "trian"),
    ("--config.train.lr=abc", "train.lr"),
    ("--config.sae.arch=gated", "sae.arch"),
    ("--config.train.batch_size=1.5", "train.batch_size"),
    ("--config.mesh.data=0", "mesh.data"),
])
def test_bad_override_names_key(override, key):
    with pytest.raises(cfg.ConfigError, match=key.replace(".", r"\.")):
        cfg.load(SYNTH, [override])


def test_unknown_key_in_experiment_file(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("from saejax import config as cfg\n"
                 "def get_config(arg):\n    c = cfg.defaults()\n    c.train.learning_rate = 1.0\n    return c\n")
    with pytest.raises(cfg.ConfigError, match="learning_rate"):
        cfg.load(str(f))


def test_cli_error_is_one_line_and_before_compilation():
    r = subprocess.run([sys.executable, "-m", "saejax.cli", "train", "--config", SYNTH, "--config.sae.arch=gated"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "sae.arch" in lines[0], r.stderr


def test_target_l0_with_a_sparsity_is_refused():
    with pytest.raises(cfg.ConfigError, match=r"'sae\.sparsity' and 'sae\.target_l0'"):
        cfg.load("experiments/default.py", ["--config.sae.sparsity=(0.01,)"])
    assert cfg.load("experiments/default.py").sae.target_l0  # targets with the default sparsity load
