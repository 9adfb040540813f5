"""The ``saejax`` command: harvest, train, evaluate, release, analyze, run.

    saejax <stage> --config experiments/<name>.py[:variant,...] [--config.a.b=value ...] [--dry_run]

Every stage reads and writes under ``config.workdir``; ``run`` chains the four stages (and analyze
when ``analyze.enabled``) and skips a stage whose output is complete.
"""
from __future__ import annotations

import argparse
import os
import sys

from saejax import config as cfg

STAGES = ("harvest", "train", "evaluate", "release", "analyze", "run")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "default.py")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saejax", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="stage", metavar="stage")
    for name in STAGES:
        s = sub.add_parser(name, help=f"the {name} stage" if name != "run" else "every stage in turn")
        s.add_argument("--config", default=None,
                       help="experiment file, optionally with :variants (default: experiments/default.py)")
        s.add_argument("--dry_run", action="store_true", help="print what the config implies; run nothing")
        s.add_argument("--max_tokens", type=int, default=None, help="harvest: bound on training tokens")
        s.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
        if name in ("release", "run"):
            s.add_argument("--push_to_hub", default=None, metavar="REPO",
                           help="release: upload the release to this Hugging Face Hub repo (owner/name)")
    return p


def _stage(name):
    if name == "train":
        from saejax.train import loop
        return loop.run
    if name == "harvest":
        from saejax.store import harvest
        return harvest.run
    if name == "evaluate":
        from saejax import evaluate
        return evaluate.run
    if name == "release":
        from saejax import release
        return release.run
    if name == "analyze":
        from saejax import analyze
        return analyze.run
    raise AssertionError(name)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    known, overrides = _parser().parse_known_args(argv)
    if known.stage is None:
        _parser().print_help()
        return 2
    bad = [o for o in overrides if not o.startswith("--config.")]
    if getattr(known, "push_to_hub", None) is not None:
        overrides.append(f"--config.release.push_to_hub={known.push_to_hub}")
    if bad:
        print(f"saejax: unknown argument {bad[0]!r} (overrides look like --config.train.lr=1e-4)", file=sys.stderr)
        return 2
    try:
        config = cfg.load(known.config or DEFAULT_CONFIG, overrides)
    except cfg.ConfigError as e:
        print(f"saejax: {e}", file=sys.stderr)
        return 2
    from saejax import log
    log.set_quiet(known.quiet)
    from saejax.mesh import init_distributed
    init_distributed()  # multi-process runs join here, before any device is touched
    stages = ("harvest", "train", "evaluate", "release") if known.stage == "run" else (known.stage,)
    if known.stage == "run" and config.analyze.enabled:
        stages += ("analyze",)
    if known.stage == "run" and config.train.source == "synthetic":
        stages = ("train",)  # no model, no store: there is nothing to harvest, splice or release
    planned = None
    for i, name in enumerate(stages):
        fn = _stage(name)
        if known.stage == "run" and not known.dry_run and _complete(name, config):
            print(f"saejax run: {name} is complete under {config.workdir}; skipped", file=sys.stderr)
            continue
        if known.stage == "run" and known.dry_run and name in ("evaluate", "release", "analyze") \
                and not _complete(stages[i - 1], config):
            print(f"saejax run: {name} dry run needs {stages[i - 1]}'s output; it runs after "
                  f"{stages[i - 1]}", file=sys.stderr)
            continue
        kwargs = {"dry_run": known.dry_run}
        if name == "harvest" and known.max_tokens is not None:
            kwargs["max_tokens"] = known.max_tokens
        if name == "train" and planned:
            kwargs["planned_widths"] = planned.get("widths")
        try:
            result = fn(config, **kwargs)
            if name == "harvest" and known.dry_run:
                planned = result
        except (cfg.ConfigError, *_input_errors()) as e:
            print(f"saejax {name}: {cfg.first_line(e)}", file=sys.stderr)
            return 2
    return 0


def _complete(name: str, config) -> bool:
    """Whether a stage's output under the workdir is already complete (``saejax run`` skips it)."""
    module = sys.modules[_stage(name).__module__]
    check = getattr(module, "is_complete", None)
    return bool(check and check(config))


def _input_errors() -> tuple:
    """The one-line input errors of every stage (bad store, mesh, model, release input)."""
    errors = []
    for mod, name in (("saejax.store", "StoreError"), ("saejax.mesh", "MeshError"),
                      ("saejax.models", "ModelError"), ("saejax.evaluate", "EvaluateError"),
                      ("saejax.release", "ReleaseError"), ("saejax.analyze", "AnalyzeError"),
                      ("saejax.train.checkpoint", "CheckpointError"), ("saejax.files", "DiskFull"),
                      ("saejax.workdir", "WorkdirError"), ("saejax.train.cost", "PlanError")):
        try:
            errors.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors) or (cfg.ConfigError,)


if __name__ == "__main__":
    sys.exit(main())
