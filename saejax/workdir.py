"""The layout of a run's work directory (``config.workdir``): every stage asks here for its paths.

    <workdir>/store/                         the activation store (docs/store.md)
    <workdir>/store/manifest.json            its commit record
    <workdir>/train/<group>/                 one group's training (docs/training.md)
    <workdir>/train/<group>/checkpoints/     its orbax checkpoints
    <workdir>/train/<group>/metrics.jsonl    its logging steps
    <workdir>/train/<group>/final/           the trained group (docs/formats.md)
    <workdir>/evaluate/                      results.json and cards/<sae>.html (docs/evaluate.md)
    <workdir>/release/                       the released suite and its suite.json (docs/formats.md)

The layout inside the store and the release folders belongs to their own stages.
"""
from __future__ import annotations

import errno
import glob
import os

RESULTS = "results.json"  # in the evaluate folder
CARDS = "cards"  # in the evaluate folder
SUITE = "suite.json"  # in the release folder


def store_dir(config) -> str:
    return os.path.join(config.workdir, "store")


def manifest_path(config) -> str:
    return os.path.join(store_dir(config), "manifest.json")


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
    """The finished groups' ``final/`` folders, sorted."""
    return sorted(glob.glob(final_dir(config, "*")))


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


def fingerprint_path(config, group: str) -> str:
    """What a group's training was started with (train/loop.py checks a resume against it)."""
    return os.path.join(group_dir(config, group), "fingerprint.json")


def lock_path(config, stage: str, process: int) -> str:
    return os.path.join(config.workdir, ".locks", f"{stage}.{process}.lock")


class WorkdirError(RuntimeError):
    """The work directory is in use by another run, or holds another run's state; one line."""


def lock(path: str, what: str):
    """Hold an exclusive flock on ``path`` (created) until the returned file is closed or the
    process ends (the kernel releases it even on kill -9). Another holder: WorkdirError naming
    ``what`` and the file. Advisory: on gcsfuse, which has no flock, two runs are not kept apart."""
    import fcntl
    os.makedirs(os.path.dirname(path), exist_ok=True)
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise WorkdirError(f"{path}: {what} (wait for it to finish, or use another workdir)") from None
        return None  # a filesystem without locks (see above)
    return f


def lock_stage(config, stage: str):
    """The lock of one stage's output in this workdir, for this process (``lock``)."""
    import jax
    pi = jax.process_index()
    return lock(lock_path(config, stage, pi), f"another `saejax {stage}` (process {pi}) is writing this workdir")
