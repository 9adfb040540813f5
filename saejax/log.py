"""Progress and notices of a stage: process 0 prints them to stderr, the other processes stay quiet."""
from __future__ import annotations

import sys


def log(msg: str) -> None:
    import jax  # here, not at the top: importing this module stays light
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)
