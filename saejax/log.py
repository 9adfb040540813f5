"""Progress and notices of a stage: process 0 prints them to stderr, the other processes stay quiet.

``log(msg)`` prints a notice. ``progress(total, desc, ...)`` is a stage's progress with its rate and
ETA (tqdm's): a live bar when stderr is a terminal, and in a log (stderr not a terminal) one line
per update, at most one every ``LINE_EVERY_S`` seconds plus the last:

    train jumprelu_w2304: 40% 400/1000 [01:02<01:33, 6.42step/s, L0=30.1..61.2, FVU=0.11..0.35]

``set_quiet(True)`` (``saejax --quiet``) turns progress off; notices, warnings and errors still print.
"""
from __future__ import annotations

import sys
import time

LINE_EVERY_S = 20.0  # seconds between two progress lines in a log
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = bool(quiet)


def _main_process() -> bool:
    import jax  # here, not at the top: importing this module stays light
    return jax.process_index() == 0


def log(msg: str) -> None:
    if _main_process():
        print(msg, file=sys.stderr, flush=True)


class Progress:
    """One stage's progress (see the module doc); ``update(n, **postfix)`` advances it, ``write``
    prints a line without breaking the bar, ``close`` ends it (also as a context manager)."""

    def __init__(self, total, desc: str, unit: str = "it", unit_scale: bool = False, initial: int = 0,
                 every: float | None = None, tty: bool | None = None):
        from tqdm import tqdm
        self._tqdm = tqdm
        self.on = not _quiet and _main_process()
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.n = self.initial = int(initial)
        self.every = LINE_EVERY_S if every is None else every
        self.postfix = ""
        self.t0 = self.last = time.time()
        self.bar = None
        if self.on and self.tty:
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial,
                            file=sys.stderr, dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n  # counted even when nothing is shown: callers read ``n``
        if not self.on:
            return
        if postfix:
            self.postfix = ", ".join(f"{k}={v}" for k, v in postfix.items())
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix_str(self.postfix, refresh=False)
            self.bar.update(n)
        elif n and time.time() - self.last >= self.every:
            self._line()

    def line(self) -> str:
        """The progress as one line of text (what a log shows)."""
        total = self.total if self.total and self.total >= self.n else None
        return self._tqdm.format_meter(self.n, total, time.time() - self.t0, ncols=0, prefix=self.desc,
                                       unit=self.unit, unit_scale=self.unit_scale, postfix=self.postfix or None,
                                       initial=self.initial)

    def _line(self) -> None:
        self.last = time.time()
        print(self.line(), file=sys.stderr, flush=True)

    def write(self, msg: str) -> None:
        """A notice of process 0, printed above a live bar (``log`` otherwise); shown even when quiet."""
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            log(msg)

    def close(self) -> None:
        if not self.on:
            return
        self.on = False
        if self.bar is not None:
            self.bar.close()
        elif self.n > self.initial:
            self._line()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(total, desc: str, unit: str = "it", unit_scale: bool = False, initial: int = 0) -> Progress:
    """A stage's progress bar (terminal) or progress lines (log); see ``Progress``."""
    return Progress(total, desc, unit=unit, unit_scale=unit_scale, initial=initial)
