"""The layout of a run's work directory (``config.workdir``): every stage asks here for its paths.

    <workdir>/store/                         the activation store (docs/store.md; harvest.store_dir)
    <workdir>/store/manifest.json            its commit record
    <workdir>/tokens/                        the tokenized corpus the harvest reuses (data.tokens_dir)
    <workdir>/train/<group>/                 one group's training (docs/training.md)
    <workdir>/train/<group>/checkpoints/     its orbax checkpoints
    <workdir>/train/<group>/metrics.jsonl    its logging steps
    <workdir>/train/<group>/final/           the trained group (docs/formats.md)
    <workdir>/evaluate/                      results.json and cards/<sae>.html (docs/evaluate.md)
    <workdir>/release/                       the released suite and its suite.json (docs/formats.md)
    <workdir>/analysis/                      research analyses of the released suite (docs/analysis.md)
    <workdir>/tensorboard/<run>/             TensorBoard event files: harvest, train/<group>, evaluate
    <workdir>/wandb/                         Weights & Biases' local files (log.wandb)

The layout inside the store and the release folders belongs to their own stages.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import sys

RESULTS = "results.json"  # in the evaluate folder
CARDS = "cards"  # in the evaluate folder
SUITE = "suite.json"  # in the release folder


def store_dir(config) -> str:
    """The activation store: ``harvest.store_dir``, by default ``<workdir>/store``."""
    return config.harvest.get("store_dir") or os.path.join(config.workdir, "store")


def manifest_path(config) -> str:
    return os.path.join(store_dir(config), "manifest.json")


def tokens_dir(config) -> str:
    """The tokenized corpus (saejax.data.tokens): ``data.tokens_dir``, by default ``<workdir>/tokens``."""
    return config.data.get("tokens_dir") or os.path.join(config.workdir, "tokens")


def train_dir(config) -> str:
    return os.path.join(config.workdir, "train")


def group_dir(config, group: str) -> str:
    return os.path.join(train_dir(config), group)


def checkpoint_dir(config, group: str) -> str:
    return os.path.join(group_dir(config, group), "checkpoints")


def metrics_path(config, group: str) -> str:
    return os.path.join(group_dir(config, group), "metrics.jsonl")


def final_dir(config, group: str) -> str:
    return os.path.join(group_dir(config, group), "final")


def final_dirs(config) -> list[str]:
    """The finished SAE groups' ``final/`` folders (those with a group.json), sorted."""
    return sorted(p for p in glob.glob(final_dir(config, "*")) if os.path.isfile(os.path.join(p, "group.json")))


def clt_final_dirs(config) -> list[str]:
    """The finished cross-layer transcoders' ``final/`` folders (those with a clt.json), sorted."""
    return sorted(p for p in glob.glob(final_dir(config, "*")) if os.path.isfile(os.path.join(p, "clt.json")))


def group_of(final: str) -> str:
    """The group name of a ``final/`` folder."""
    return os.path.basename(os.path.dirname(final))


def evaluate_dir(config) -> str:
    return os.path.join(config.workdir, "evaluate")


def results_path(config) -> str:
    return os.path.join(evaluate_dir(config), RESULTS)


def release_dir(config) -> str:
    return os.path.join(config.workdir, "release")


def suite_path(config) -> str:
    return os.path.join(release_dir(config), SUITE)


def analysis_dir(config) -> str:
    return os.path.join(config.workdir, "analysis")
def tensorboard_dir(config) -> str:
    return os.path.join(config.workdir, "tensorboard")


def tensorboard_run(config, run: str) -> str:
    """One run's event files (saejax.tracking): ``harvest``, ``train/<group>``, ``evaluate``."""
    return os.path.join(tensorboard_dir(config), run)


def wandb_dir(config) -> str:
    return os.path.join(config.workdir, "wandb")


def fingerprint_path(config, group: str) -> str:
    """What a group's training was started with (train/loop.py checks a resume against it)."""
    return os.path.join(group_dir(config, group), "fingerprint.json")


def lock_path(config, stage: str, process: int) -> str:
    return os.path.join(config.workdir, ".locks", f"{stage}.{process}.lock")


class WorkdirError(RuntimeError):
    """The work directory is in use by another run, or holds another run's state; one line."""


@contextlib.contextmanager
def locked(path: str, what: str):
    """Hold an exclusive flock on ``path`` (created) for the block (the kernel releases it even on
    kill -9). Another holder: WorkdirError naming ``what`` and the file. Advisory: on a filesystem
    without flock (gcsfuse) the block runs unlocked, with a warning, and two runs are not kept apart."""
    import fcntl
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirError(f"{path}: {what} (wait for it to finish, or use another workdir)") from None
            print(f"saejax: cannot lock {path} ({e}); make sure no other run writes here", file=sys.stderr)
        yield


@contextlib.contextmanager
def stage_lock(config, stage: str, output: str | None = None):
    """Hold this process's lock of one stage's output in this workdir (``locked``) for the block.
    ``output``: the folder the stage builds as ``<output>.tmp-<pid>`` and renames; the temporary
    folders a killed run left are removed once the lock is held."""
    import jax
    pi = jax.process_index()
    with locked(lock_path(config, stage, pi), f"another `saejax {stage}` (process {pi}) is writing this workdir"):
        for old in glob.glob(f"{output}.tmp-*") if output else ():
            shutil.rmtree(old, ignore_errors=True)
        yield
