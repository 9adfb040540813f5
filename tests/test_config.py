"""Bad configuration is a one-line error naming the key, raised before anything compiles."""
import glob
import importlib.util
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
    ("--config.evaluate.splice=1", "evaluate.splice"),
    ("--config.evaluate.splice=yes", "evaluate.splice"),
])
def test_bad_override_names_key(override, key):
    with pytest.raises(cfg.ConfigError, match=key.replace(".", r"\.")):
        cfg.load(SYNTH, [override])


def test_evaluate_splice_must_be_a_bool(tmp_path):
    f = tmp_path / "nosplice.py"
    f.write_text("from saejax import config as cfg\n"
                 "def get_config(arg):\n    c = cfg.defaults()\n    c.evaluate.splice = None\n    return c\n")
    with pytest.raises(cfg.ConfigError, match=r"^config key 'evaluate\.splice': must be True or False$"):
        cfg.load(str(f))
    assert cfg.load(SYNTH, ["--config.evaluate.splice=False"]).evaluate.splice is False


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


# ---------------------------------------------------------------------------------------------
# Variants: each experiment declares those it accepts; anything else is one line naming it.

EXPERIMENTS = sorted(glob.glob("experiments/*.py"))
# A value for every variant an experiment declares (a new variant needs one here).
SAMPLE_VALUES = {"width": "16k", "layers": "0-3", "corpus": "my/corpus", "tokens": "100_000", "arch": "topk",
                 "groups": "6"}


@pytest.mark.parametrize("path", EXPERIMENTS)
def test_every_experiment_loads_in_each_variant(path):
    module = _module(path)
    accepted = module.VARIANTS
    # size and width: the experiment's last choice (its default is often the first, which changes nothing)
    sample = dict(SAMPLE_VALUES, **{n: list(getattr(module, t))[-1] for n, t in (("size", "SIZES"), ("width", "WIDTHS"))
                                    if hasattr(module, t)})
    cfg.load(path)
    for name, parse in accepted.items():
        c = cfg.load(f"{path}:{name}" if parse is bool else f"{path}:{name}={sample[name]}")
        assert c != cfg.load(path), f"variant {name} changes nothing"
    given = [n if p is bool else f"{n}={sample[n]}" for n, p in accepted.items()]
    cfg.load(f"{path}:{','.join(given)}")


def _module(path):
    spec = importlib.util.spec_from_file_location("experiment_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("spec, named, accepted", [
    ("experiments/synthetic.py:runlocl", "'runlocl'", "runlocal"),
    ("experiments/gemma2_2b.py:width=32k", "width=32k", "16k, 65k"),
    ("experiments/gemma2_2b.py:layers=abc", "layers=abc", "0-25"),
    ("experiments/gemma2_2b.py:width=16k,layrs=0-11", "'layrs'", "layers=..."),
    ("experiments/gemma2_9b.py:width=65k", "width=65k", "16k, 131k"),
    ("experiments/smollm2_all.py:tokens=1e6", "tokens=1e6", "expected int"),
    ("experiments/default.py:runlocal=yes", "'runlocal'", "takes no value"),
])
def test_bad_variant_is_one_line_naming_it_and_the_accepted(spec, named, accepted):
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(spec)
    message = str(e.value)
    assert len(message.splitlines()) == 1 and named in message and accepted in message, message
    assert message.startswith(spec.partition(":")[0] + ":"), message


def test_parse_variants():
    accepted = {"runlocal": bool, "width": cfg.choices("16k", "65k"), "layers": cfg.layer_range, "steps": int}
    assert cfg.parse_variants("", accepted) == {}
    assert cfg.parse_variants("runlocal, width=65k+16k,layers=3+9-10,steps=40", accepted) == {
        "runlocal": True, "width": ("65k", "16k"), "layers": (3, 9, 10), "steps": 40}
    for bad, match in [("layers", "needs a value"), ("width=16k,width=65k", "given twice"),
                       ("layers=5-2", "layer range"), ("steps=", "expected int"), ("x=1", "unknown variant 'x'")]:
        with pytest.raises(cfg.ConfigError, match=match):
            cfg.parse_variants(bad, accepted)
    with pytest.raises(cfg.ConfigError, match=r"accepted: none"):
        cfg.parse_variants("runlocal", {})


def test_target_l0_with_a_sparsity_is_refused():
    with pytest.raises(cfg.ConfigError, match=r"'sae\.sparsity' and 'sae\.target_l0'"):
        cfg.load("experiments/default.py", ["--config.sae.sparsity=(0.01,)"])
    assert cfg.load("experiments/default.py").sae.target_l0  # targets with the default sparsity load


# ---------------------------------------------------------------------------------------------
# An experiment file that does not compile or raises: one line naming the file and line.

RAISES = ("from saejax import config as cfg\n"
          "def get_config(arg):\n"
          "    c = cfg.defaults()\n"
          "    c.train.lr = 1 / 0\n"
          "    return c\n")


@pytest.mark.parametrize("text, line, message", [
    (RAISES, 4, "ZeroDivisionError: division by zero"),
    ("from saejax import config as cfg\ndef get_config(arg):\n    return cfg.defaults(\n", 3, "SyntaxError"),
    ("import json\nLAYERS = json.loads('[1,')\n", 2, "JSONDecodeError"),  # raised at import, inside json
    ("from saejax import config as cfg\ndef get_config(arg):\n    return cfg.layer_range('x')\n", 3, "ValueError"),
])
def test_experiment_file_error_names_file_and_line(tmp_path, text, line, message):
    f = tmp_path / "bad.py"
    f.write_text(text)
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(str(f))
    assert str(e.value).startswith(f"{f}:{line}: {message}"), str(e.value)
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("text", [RAISES, "def get_config(arg):\n    return (\n"])
def test_cli_experiment_file_error_is_one_line(tmp_path, text):
    f = tmp_path / "bad.py"
    f.write_text(text)
    r = subprocess.run([sys.executable, "-m", "saejax.cli", "train", "--config", str(f)],
                       capture_output=True, text=True, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and f"{f}:" in lines[0], r.stderr
