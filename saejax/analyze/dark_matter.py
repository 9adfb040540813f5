"""Dark matter (Engels, Riggs and Tegmark, "Decomposing The Dark Matter of Sparse Autoencoders", 2024).

For an SAE and its site's rows x, the error is e = x - x_hat. A linear map from the input,
e ~ x A + b, is fit by least squares (ridge ``ridge`` times the mean eigenvalue of the centred
inputs' covariance) on train rows and measured on held-out rows:

    linear_frac_variance   R^2 of the vector regression: the fraction of the error's variance that
                           x predicts linearly ("linearly predictable dark matter")
    nonlinear_frac_variance  1 - that: the nonlinear remainder
    norm_r2                R^2 of a linear regression of the error norm ||e|| on x (the paper finds
                           the norm far more predictable than the vector)
    fvu, fvu_linear, fvu_nonlinear   the SAE's FVU on these rows, split into the part the linear map
                           recovers and the remainder (fvu_nonlinear = ||e - x A - b||^2 / ||x - mean||^2)

``norm_correlation``: across the SAEs of one site (every width and L0), the Pearson correlation of
their per-token error norms on the same held-out rows: do wider SAEs fail on the same tokens?
"""
from __future__ import annotations

import numpy as np

from saejax.analyze.common import reconstruct


def linear_fit(x: np.ndarray, y: np.ndarray, ridge: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Least squares y ~ x @ W + b (float64, centred; ridge relative to the mean eigenvalue of the
    centred x's covariance). x [n, d], y [n, k] -> (W [d, k], b [k])."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mx, my = x.mean(0), y.mean(0)
    xc = x - mx
    g = xc.T @ xc
    lam = ridge * np.trace(g) / max(1, g.shape[0])
    w = np.linalg.solve(g + (lam + 1e-12 * max(np.trace(g), 1.0)) * np.eye(g.shape[0]), xc.T @ (y - my))
    return w, my - mx @ w


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    """1 - sum (y - pred)^2 / sum (y - mean y)^2 over every element (y [n] or [n, k])."""
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    den = float(((y - y.mean(0)) ** 2).sum())
    return float(1.0 - ((y - pred) ** 2).sum() / den) if den > 0 else float("nan")


def decompose(x_fit, e_fit, x_eval, e_eval, ridge: float = 1e-6) -> dict:
    """The linear / nonlinear split of errors ``e`` of inputs ``x`` (see the module docstring);
    fit on the ``_fit`` rows, measured on the ``_eval`` rows."""
    w, b = linear_fit(x_fit, e_fit, ridge)
    x_eval, e_eval = np.asarray(x_eval, np.float64), np.asarray(e_eval, np.float64)
    pred = x_eval @ w + b
    n_fit = np.linalg.norm(np.asarray(e_fit, np.float64), axis=1)
    wn, bn = linear_fit(x_fit, n_fit[:, None], ridge)
    norm = np.linalg.norm(e_eval, axis=1)
    var_x = float(((x_eval - x_eval.mean(0)) ** 2).sum())
    lin = r2(e_eval, pred)
    fvu = float((e_eval ** 2).sum()) / var_x
    fvu_nl = float(((e_eval - pred) ** 2).sum()) / var_x
    return {"linear_frac_variance": lin, "nonlinear_frac_variance": 1.0 - lin,
            "norm_r2": r2(norm, (x_eval @ wn + bn)[:, 0]),
            "fvu": fvu, "fvu_linear": fvu - fvu_nl, "fvu_nonlinear": fvu_nl,
            "n_fit": int(len(x_fit)), "n_eval": int(len(x_eval))}


def dark_matter(sae, x_fit: np.ndarray, x_eval: np.ndarray, ridge: float = 1e-6) -> tuple[dict, np.ndarray]:
    """One released SAE on raw rows of its site: (``decompose``'s numbers, the per-token error norms
    [n_eval] on ``x_eval``)."""
    e_fit = np.asarray(x_fit, np.float64) - reconstruct(sae, x_fit)
    e_eval = np.asarray(x_eval, np.float64) - reconstruct(sae, x_eval)
    return decompose(x_fit, e_fit, x_eval, e_eval, ridge), np.linalg.norm(e_eval, axis=1)


def norm_correlation(labels: list[str], widths: list[int], norms: list[np.ndarray]) -> dict:
    """Pearson correlation of per-token error norms between SAEs of one site: {"saes", "matrix",
    "cross_width": [{"a", "b", "r"}] for pairs of different widths}."""
    m = np.corrcoef(np.stack(norms)) if len(norms) > 1 else np.ones((1, 1))
    pairs = [{"a": labels[i], "b": labels[j], "r": float(m[i, j])}
             for i in range(len(norms)) for j in range(i + 1, len(norms)) if widths[i] != widths[j]]
    return {"saes": list(labels), "matrix": np.round(m, 6).tolist(), "cross_width": pairs}
