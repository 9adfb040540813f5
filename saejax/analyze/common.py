"""What every analysis shares: running a released SAE over rows in batches, and labels."""
from __future__ import annotations

import numpy as np

BATCH = 4096  # rows per SAE call (the latents of a 131k-wide SAE: 2 GiB at this batch)


def reconstruct(sae, x: np.ndarray, batch: int = BATCH) -> np.ndarray:
    """x [n, d] raw -> x_hat [n, d] float32 (``sae``: a released SAE, saejax.release.SAE)."""
    return np.concatenate([np.asarray(sae(x[i:i + batch]), np.float32) for i in range(0, len(x), batch)]) \
        if len(x) else np.zeros_like(x, np.float32)


def frequency(sae, x: np.ndarray, batch: int = BATCH) -> np.ndarray:
    """The fraction of rows of x on which each latent fires, [M] float64."""
    fired = np.zeros(sae.width, np.int64)
    for i in range(0, len(x), batch):
        fired += np.asarray(sae.encode(x[i:i + batch]) != 0).sum(0)
    return fired / max(1, len(x))


def label(e) -> str:
    """A suite entry's short name: ``res.3 w2304 L0 31`` (``s1`` for seed 1)."""
    seed = (e.source or {}).get("seed") or 0
    return f"{e.site} w{e.width} L0 {'canonical' if e.l0 is None else f'{e.l0:.0f}'}" + (f" s{seed}" if seed else "")


def entry_info(e) -> dict:
    """The JSON fields naming a suite entry in every analysis file."""
    return {"site": e.site, "width": e.width, "l0": e.l0, "arch": e.arch, "path": e.path or e.saelens,
            "seed": (e.source or {}).get("seed") or 0, "label": label(e)}
