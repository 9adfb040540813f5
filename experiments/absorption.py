"""Feature absorption on real activations: plain vs Matryoshka JumpReLU res SAEs on the default's
data (SmolLM2-135M-Instruct over Shakespeare, layers 3, 9, 15) at equal budget, measured by the
first-letter task of `saejax analyze` (docs/analysis.md, "Feature absorption").

    saejax run --config experiments/absorption.py               # Matryoshka (prefixes 1/16, 1/4, 1)
    saejax run --config experiments/absorption.py:plain         # plain JumpReLU, its own workdir

Both are the default recipe (widths 2,304, L0 targets 30 and 60, 400 steps of 512 rows, the same
lr and schedules) on res sites only; they differ only in sae.matryoshka. The harvest is the
default's restricted to res (deterministic: both workdirs hold the same rows). Each run ends with
analysis/absorption.json and the release's "Analyses" section; compare their rates.

Variants:
    :plain      plain JumpReLU SAEs (runs/absorption-plain)
    :runlocal   tiny mode for the tests (a random tiny Llama with the byte tokenizer, seconds)
"""
from saejax import config as cfg

VARIANTS = {"runlocal": bool, "plain": bool}


def get_config(arg: str = ""):
    import importlib.util
    import os
    v = cfg.parse_variants(arg, VARIANTS)
    spec = importlib.util.spec_from_file_location("_default", os.path.join(os.path.dirname(__file__), "default.py"))
    default = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(default)
    c = default.get_config("plain" + (",runlocal" if v.get("runlocal") else ""))  # res/att/mlp plain SAEs
    c.harvest.kinds = ("res",)
    c.workdir = "runs/absorption-plain" if v.get("plain") else "runs/absorption-matryoshka"
    if not v.get("plain"):
        c.sae.matryoshka = (0.0625, 0.25, 1.0)  # the default's prefixes: 144, 576 and 2,304 latents
    c.release.name = f"saejax-smollm2-absorption-{'plain' if v.get('plain') else 'matryoshka'}"
    c.analyze.enabled = True
    c.analyze.analyses = ("absorption",)
    return c
