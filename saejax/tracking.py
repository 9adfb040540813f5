"""Run metrics to TensorBoard event files and, when enabled, Weights & Biases: the one seam.

Each stage opens one ``Tracker`` per run and logs scalars to it; nothing else in saejax calls
tensorboardX or wandb. Runs (``wd.tensorboard_run``):

    <workdir>/tensorboard/harvest/          harvest/tokens, harvest/tokens_per_s, harvest/bytes_written
    <workdir>/tensorboard/train/<group>/    <metric>/<sae> per SAE of the group (loss terms, l0, fvu,
                                            dead_frac, lam, heldout_*), and lr; step: the train step
    <workdir>/tensorboard/evaluate/         <metric>/<sae> per SAE at its training steps; the table as text

``<sae>`` is ``<site>__<group>__<member>`` (evaluate's SAE id). ``tensorboard --logdir
<workdir>/tensorboard`` shows them all. With ``log.wandb`` (and the optional ``wandb`` package) the
same scalars go to one W&B run per TensorBoard run, in project ``log.wandb_project``, grouped by the
workdir's name; ``log.wandb_mode = "offline"`` writes them under ``<workdir>/wandb`` without network
(``wandb sync`` uploads them later). Only process 0 writes; on the others a Tracker does nothing.
``metrics.jsonl`` (train) and ``results.json`` (evaluate) stay the plain record.
"""
from __future__ import annotations

import math
import os
import struct
import time

from saejax import workdir as wd


def sae_tag(group: str, site: str, member: int) -> str:
    """An SAE's name in tags: evaluate's SAE id."""
    return f"{site}__{group}__{member}"


class Tracker:
    """Scalars of one run (``wd.tensorboard_run(config, run)``) to TensorBoard and W&B (see module doc)."""

    def __init__(self, config, run: str):
        import jax
        self.tb = self.wb = None
        self._tb_dir = None
        if jax.process_index() != 0:
            return
        lg = config.log
        if lg.tensorboard:
            self._tb_dir = wd.tensorboard_run(config, run)
        if lg.wandb:
            try:
                import wandb
            except ImportError:
                from saejax.log import log
                log("saejax: log.wandb is set but wandb is not installed (pip install 'saejax[wandb]'); "
                    "logging to TensorBoard only")
                return
            os.makedirs(wd.wandb_dir(config), exist_ok=True)
            self.wb = wandb.init(project=lg.wandb_project, group=os.path.basename(os.path.abspath(config.workdir)),
                                 name=run, dir=wd.wandb_dir(config), mode=lg.wandb_mode,
                                 config=config.to_dict(), reinit="create_new")

    def begin(self, step: int) -> None:
        """The run starts (or resumes) at ``step``: TensorBoard hides what an earlier attempt logged
        from there on (the event file is opened here, or at the first ``scalars``)."""
        if self._tb_dir is not None and self.tb is None:
            self._tb(lambda: setattr(self, "tb", _EventFile(self._tb_dir, int(step) if step else None)))

    def _tb(self, fn) -> None:
        """Run a TensorBoard call; one that fails (a full disk) stops TensorBoard logging with one
        warning and never the run: the event files are a view, metrics.jsonl the record."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - OSError, and what tensorboardX's writer process raises after one
            from saejax.log import log
            log(f"saejax: warning: TensorBoard logging to {self._tb_dir} stopped ({type(e).__name__}: {e})"[:300])
            tb, self.tb, self._tb_dir = self.tb, None, None
            try:
                if tb is not None:
                    tb.close()
            except Exception:  # noqa: BLE001 - the same failure again
                pass

    def scalars(self, step: int, values: dict) -> None:
        """``values``: tag -> number; None and non-finite numbers (a frozen SAE) are left out."""
        values = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        self.begin(0)
        if self.tb is not None:
            self._tb(lambda: self.tb.scalars(int(step), values))
        if self.wb is not None and values:
            self.wb.log(values, step=int(step))

    def table(self, tag: str, columns: list[str], rows: list[list]) -> None:
        """A table: markdown text in TensorBoard, a wandb.Table in W&B."""
        self.begin(0)
        if self.tb is not None:
            lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
            lines += ["| " + " | ".join("-" if v is None else str(v) for v in r) + " |" for r in rows]
            self._tb(lambda: self.tb.text(tag, "\n".join(lines)))
        if self.wb is not None:
            import wandb
            self.wb.log({tag: wandb.Table(columns=columns, data=rows)})

    def flush(self) -> None:
        if self.tb is not None:
            self._tb(lambda: self.tb.flush())

    def close(self) -> None:
        if self.tb is not None:
            self._tb(lambda: self.tb.close())
        self.tb = self._tb_dir = None
        if self.wb is not None:
            self.wb.finish()
            self.wb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _EventFile:
    """One TensorBoard event file written synchronously with tensorboardX's record writer and
    summary protos (its SummaryWriter writes from a background thread and at exit, where a full disk
    becomes tracebacks that no caller can catch). ``purge_step``: as SummaryWriter's."""

    def __init__(self, logdir: str, purge_step: int | None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX import summary
        self.Event, self.summary = Event, summary
        os.makedirs(logdir, exist_ok=True)
        self.w = EventsWriter(os.path.join(logdir, "events"))
        if purge_step is not None:  # TensorBoard hides the steps >= purge_step of earlier files
            self.w.write_event(Event(step=purge_step, wall_time=time.time(),
                                     session_log=SessionLog(status=SessionLog.START)))
        self.w.flush()

    def scalars(self, step: int, values: dict) -> None:
        for tag, v in values.items():
            self.w.write_event(self.Event(step=step, wall_time=time.time(), summary=self.summary.scalar(tag, v)))
        self.w.flush()

    def text(self, tag: str, text: str) -> None:
        self.w.write_event(self.Event(step=0, wall_time=time.time(), summary=self.summary.text(tag, text)))
        self.w.flush()

    def flush(self) -> None:
        self.w.flush()

    def close(self) -> None:
        self.w.close()


def group_scalars(group: str, sites, metrics: dict) -> dict:
    """Train metrics of one logging step as tags: per-SAE arrays [T, K] -> ``<metric>/<sae>``;
    scalars (lr) -> ``<metric>``."""
    import numpy as np
    out = {}
    for name, v in metrics.items():
        a = np.asarray(v, np.float64)
        if a.ndim == 0:
            out[name] = float(a)
        elif a.ndim == 2 and a.shape[0] == len(sites):
            for t, site in enumerate(sites):
                for k in range(a.shape[1]):
                    out[f"{name}/{sae_tag(group, site, k)}"] = float(a[t, k])
    return out


def read_scalars(folder: str) -> dict:
    """Every scalar in the event files under ``folder``: tag -> [(step, value)], in file order. A
    plain reader of TensorBoard's record format (length, crc, Event proto, crc), for tests and checks."""
    from tensorboardX.proto import event_pb2
    out = {}
    for root, _, names in sorted(os.walk(folder)):
        for name in sorted(n for n in names if "tfevents" in n):
            with open(os.path.join(root, name), "rb") as fh:
                data = fh.read()
            i = 0
            while i + 12 <= len(data):
                (n,) = struct.unpack("<Q", data[i:i + 8])
                ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
                i += 12 + n + 4
                for v in ev.summary.value:
                    if v.HasField("simple_value"):
                        out.setdefault(v.tag, []).append((int(ev.step), float(v.simple_value)))
    return out
