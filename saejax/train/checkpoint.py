"""Checkpoints of a group's training state (orbax); preemption (saejax.preempt) saves one.

Layout: ``<workdir>/train/<group>/checkpoints/<step>/`` written by an orbax CheckpointManager:
async saves (the step loop continues while files are written), every ``train.checkpoint_every``
steps, the last ``train.keep_checkpoints`` kept. The state saved is the whole train state of
saejax.train.step (params, opt_state, step, lam, l0_ema, since_fired, bt_threshold, frozen); the
data-reader position is the step itself, since every source's batch is a pure function of
(seed, step), and the state holds no RNG (initialization is the only random draw, from the seed).

Restoring reads into the shardings of the *current* mesh, so a run may resume on another mesh
shape or process count. A latest checkpoint that cannot be read (its files corrupted) is skipped
with a warning for the newest one that can; none readable is an error naming the folder.

Preemption: on SIGTERM the loop saves at a step every process agrees on (saejax.preempt), waits
for the save and exits with ``EXIT_PREEMPTED`` (75); rerunning the same command resumes.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from saejax import files
from saejax.config import first_line
from saejax.log import log


class CheckpointError(RuntimeError):
    """No checkpoint of a group can be read; the message names the folder."""


class Checkpoints:
    """An orbax CheckpointManager for one group's train state."""

    def __init__(self, directory: str, every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=keep, enable_async_checkpointing=async_save,
            create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                             item_handlers=ocp.StandardCheckpointHandler())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def slots(self, step: int | None = None) -> int | None:
        """The slot count T (GroupSpec.T) of the state saved at ``step`` (default: the latest), from
        its metadata alone; None when there is none or it cannot be read."""
        step = self.latest_step() if step is None else step
        try:
            return int(self.manager.item_metadata(step)["frozen"].shape[0])
        except Exception:  # noqa: BLE001 - no or unreadable metadata: restore reports what is wrong
            return None

    def restore(self, abstract_state, shardings, step: int | None = None):
        """The state at ``step`` placed by ``shardings`` (the current mesh's). Without ``step``, the
        newest checkpoint that reads back: unreadable newer ones are reported and passed over."""
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
        if step is not None:
            return self.manager.restore(step, args=ocp.args.StandardRestore(target))
        steps = sorted(self.manager.all_steps(), reverse=True)
        for i, s in enumerate(steps):
            try:
                state = self.manager.restore(s, args=ocp.args.StandardRestore(target))
            except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types for bad files
                why = first_line(e)[:200]
                nxt = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint"
                log(f"saejax train: warning: the checkpoint at step {s} in {self.directory} cannot be read "
                    f"({why}); {nxt}")
                continue
            if i:  # the unreadable newer ones move aside (kept for a look), out of the manager's way
                self.manager.wait_until_finished()
                if jax.process_index() == 0:
                    aside = f"{self.directory}.unreadable"
                    os.makedirs(aside, exist_ok=True)
                    for bad in steps[:i]:
                        os.replace(os.path.join(self.directory, str(bad)), os.path.join(aside, f"{bad}-{os.getpid()}"))
                    log(f"saejax train: moved the unreadable checkpoints {steps[:i]} to {aside}")
                if jax.process_count() > 1:
                    from jax.experimental import multihost_utils
                    multihost_utils.sync_global_devices("saejax-checkpoint-fallback")
                self.manager.reload()
            return state
        raise CheckpointError(f"{self.directory}: no checkpoint can be read (steps {steps}); move the folder "
                              f"away to train this group from the start")

    def save(self, step: int, state, force: bool = False) -> bool:
        """Start an async save of ``state`` if ``step`` is a checkpoint step (or ``force``). A disk
        without room for it is a DiskFull before anything is written (an async save that runs out of
        space fails in orbax's threads with a traceback per file)."""
        if force or self.manager.should_save(step):
            need = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(state))
            files.ensure_free(self.directory, need, f"the checkpoint of step {step}")
        return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
