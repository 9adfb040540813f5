"""Feature absorption (Chanin et al. 2024, "A is for Absorption"): a latent that tracks a feature
stops firing where a more specific feature is present, because another latent whose decoder
carries the feature's direction fires instead.

For labelled rows (``labels`` [N, F]: which rows hold feature i) and each feature's direction
(``directions`` [F, d]: the planted one, or a linear probe's; by default the difference of the
mean row with and without the feature), with latents f [N, M] and decoder W_dec [M, d]:

    main latent of i   the latent whose firing (f > 0) best predicts the label (F1)
    recall             fraction of the feature's rows where its main latent fires
    absorbed           the feature's rows where its main latent does not fire but another latent
                       whose decoder row has cosine >= ``cos_min`` with the direction fires
    rate               absorbed rows / the feature's rows; ``rate`` of the SAE: the mean over features

Optionally (``counted``, ``share_min``) only some of a feature's rows count (the first-letter task:
those its probe classifies correctly), and an absorbing latent must also carry at least ``share_min``
of the SAE's positive projection on the direction (sum over latents of max(0, f_j W_dec[j] . u)).

Reusable: ``measure`` takes any SAE with ``encode`` and ``arrays["W_dec"]`` (saejax.release.SAE,
so also Gemma Scope's) and raw rows; ``absorption`` takes the latents themselves; ``first_letter``
is the first-letter task (Chanin et al.; SAEBench's metric) on rows with their token ids.
"""
from __future__ import annotations

import numpy as np

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def mean_difference_directions(rows, labels) -> np.ndarray:
    """[F, d]: the mean of the rows holding each feature minus the mean of those that do not, unit norm."""
    rows, labels = np.asarray(rows, np.float64), np.asarray(labels, bool)
    with_ = labels.T @ rows / np.maximum(labels.sum(0), 1)[:, None]
    without = (~labels).T @ rows / np.maximum((~labels).sum(0), 1)[:, None]
    diff = with_ - without
    return diff / np.maximum(np.linalg.norm(diff, axis=1, keepdims=True), 1e-12)


def absorption(latents, w_dec, labels, directions, cos_min: float = 0.3, counted=None,
               share_min: float = 0.0) -> dict:
    """The measure of the module docstring from latents [N, M], W_dec [M, d], labels [N, F] and
    directions [F, d]; ``counted`` [N, F] (default ``labels``): the rows whose rate is measured.
    Returns {"rate", "recall"} (means over features) and per feature lists "rates", "recalls",
    "main_latent", "f1", "absorbers" (how many latents qualify as absorbing), "counted"."""
    f_val = np.asarray(latents, np.float64)
    fires = f_val > 0
    labels = np.asarray(labels, bool)
    if fires.shape[0] != labels.shape[0]:
        raise ValueError(f"absorption: {fires.shape[0]} rows of latents but {labels.shape[0]} rows of labels")
    w = np.asarray(w_dec, np.float64)
    cos = (w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)) @ np.asarray(directions, np.float64).T
    counted = labels if counted is None else np.asarray(counted, bool) & labels
    f32 = fires.astype(np.float64)
    out = {"rates": [], "recalls": [], "main_latent": [], "f1": [], "absorbers": [], "counted": []}
    for i in range(labels.shape[1]):
        y = labels[:, i]
        n = int(y.sum())
        if n == 0:
            raise ValueError(f"absorption: feature {i} has no labelled rows")
        tp = f32[y].sum(0)
        f1 = 2 * tp / (n + f32.sum(0))
        main = int(np.argmax(f1))
        others = cos[:, i] >= cos_min
        others[main] = False
        c = counted[:, i]
        nc = int(c.sum())
        missed = c & ~fires[:, main]
        absorbed = missed & fires[:, others].any(1)
        if share_min > 0:
            proj = f_val[missed] * cos[:, i]  # each latent's contribution along the direction (unit decoders)
            proj *= np.linalg.norm(w, axis=1)
            total = np.maximum(proj, 0).sum(1)
            carried = np.maximum(proj[:, others], 0).sum(1)
            absorbed[missed] &= carried >= share_min * np.maximum(total, 1e-12)
        out["rates"].append(float(absorbed.sum() / nc) if nc else float("nan"))
        out["recalls"].append(float(fires[c, main].mean()) if nc else float("nan"))
        out["counted"].append(nc)
        out["main_latent"].append(main)
        out["f1"].append(float(f1[main]))
        out["absorbers"].append(int(others.sum()))
    out["rate"] = float(np.nanmean(out["rates"])) if np.isfinite(out["rates"]).any() else float("nan")
    out["recall"] = float(np.nanmean(out["recalls"])) if np.isfinite(out["recalls"]).any() else float("nan")
    return out


def measure(sae, rows, labels, directions=None, cos_min: float = 0.3, chunk: int = 8192) -> dict:
    """``absorption`` of a released SAE (``encode(x)``, ``arrays["W_dec"]``; saejax.release.SAE) on raw
    rows [N, d] with labels [N, F]; ``directions`` default to ``mean_difference_directions``."""
    rows = np.asarray(rows, np.float32)
    f = _encode(sae, rows, chunk)
    if directions is None:
        directions = mean_difference_directions(rows, labels)
    return absorption(f, sae.arrays["W_dec"], labels, directions, cos_min)


def _encode(sae, rows, chunk: int = 8192) -> np.ndarray:
    return np.concatenate([np.asarray(sae.encode(rows[s:s + chunk]), np.float32) for s in range(0, len(rows), chunk)])


def token_letters(decode, token_ids) -> dict[int, int]:
    """{token id: letter index 0..25} for the ids whose decoded text is letters only (ASCII), after
    optional leading whitespace; the letter is the first one, lowercased. Other ids are left out."""
    out = {}
    for t in np.unique(np.asarray(token_ids)):
        try:
            text = decode([int(t)])
        except Exception:  # noqa: BLE001 - an id the tokenizer cannot decode has no known letter
            continue
        word = text.lstrip()
        if word and word.isascii() and word.isalpha():
            out[int(t)] = LETTERS.index(word[0].lower())
    return out


def token_split(token_ids, test_frac: float = 0.5, seed: int = 0) -> np.ndarray:
    """bool [N]: the rows whose token id is in the test fold (a random ``test_frac`` of the distinct ids)."""
    ids = np.unique(np.asarray(token_ids))
    test = np.random.default_rng(seed).random(len(ids)) < test_frac
    return np.isin(np.asarray(token_ids), ids[test])


def fit_probe(x, y, n_classes: int, l2: float = 1e-3, maxiter: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression (scipy L-BFGS) of class y [n] on rows x [n, d]; L2 penalty
    ``l2`` on the weights of centred rows scaled to unit mean norm. Returns (W [C, d] in the rows' own
    units, b [C]): logits = x @ W.T + b."""
    from scipy.optimize import minimize
    from scipy.special import log_softmax, softmax
    x = np.asarray(x, np.float64)
    mu = x.mean(0)
    scale = float(np.sqrt(((x - mu) ** 2).sum(1).mean())) or 1.0
    z = (x - mu) / scale
    n, d = z.shape
    onehot = np.zeros((n, n_classes))
    onehot[np.arange(n), y] = 1

    def loss(p):
        w, b = p[:n_classes * d].reshape(n_classes, d), p[n_classes * d:]
        logits = z @ w.T + b
        lp = log_softmax(logits, axis=1)
        g = (softmax(logits, axis=1) - onehot) / n
        return (-(onehot * lp).sum() / n + 0.5 * l2 * (w * w).sum(),
                np.concatenate([(g.T @ z + l2 * w).ravel(), g.sum(0)]))

    res = minimize(loss, np.zeros(n_classes * (d + 1)), jac=True, method="L-BFGS-B", options={"maxiter": maxiter})
    w, b = res.x[:n_classes * d].reshape(n_classes, d), res.x[n_classes * d:]
    return w / scale, b - (w / scale) @ mu


def mean_ci(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean over ``values`` (nan where fewer than 2)."""
    from scipy import stats
    v = np.asarray([a for a in values if np.isfinite(a)], np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    h = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return m, m - h, m + h


def first_letter_probes(rows, token_ids, decode, min_probe_f1: float = 0.6, min_tokens: int = 20,
                        test_frac: float = 0.5, seed: int = 0) -> dict:
    """The first-letter task's data and probes (shared by every SAE of a site): rows whose token's
    first letter is known (``token_letters``), split by token id into train and test folds, one
    multinomial probe fit on the train fold, F1 per letter on the test fold; letters with fewer than
    ``min_tokens`` rows in either fold, or test F1 below ``min_probe_f1``, are skipped."""
    ids = np.asarray(token_ids)
    letter_of = token_letters(decode, ids)
    keep = np.isin(ids, np.fromiter(letter_of, np.int64, len(letter_of)))
    x, ids = np.asarray(rows, np.float32)[keep], ids[keep]
    y = np.array([letter_of[int(t)] for t in ids], np.int64)
    test = token_split(ids, test_frac, seed)
    enough = [c for c in range(26) if (y[~test] == c).sum() >= min_tokens and (y[test] == c).sum() >= min_tokens]
    out = {"n_rows": int(len(y)), "n_tokens": int(len(letter_of)), "n_train": int((~test).sum()),
           "n_test": int(test.sum()), "letters": [], "probe_f1": [], "skipped_few": [LETTERS[c] for c in range(26)
                                                                                       if c not in enough],
           "skipped_f1": []}
    if len(enough) < 2:
        out.update(x=x[test][:0], y=y[:0], labels=np.zeros((0, 0), bool), correct=np.zeros((0, 0), bool),
                   directions=np.zeros((0, x.shape[1])))
        return out
    remap = np.full(26, -1)
    remap[enough] = np.arange(len(enough))
    yk = remap[y]
    sel = yk >= 0
    w, b = fit_probe(x[sel & ~test], yk[sel & ~test], len(enough))
    xt, yt = x[test & sel], yk[test & sel]
    pred = np.argmax(xt @ w.T + b, 1)
    kept = []
    for j, c in enumerate(enough):
        tp = int(((pred == j) & (yt == j)).sum())
        f1 = 2 * tp / max(1, int((pred == j).sum() + (yt == j).sum()))
        if f1 >= min_probe_f1:
            kept.append(j), out["letters"].append(LETTERS[c]), out["probe_f1"].append(f1)
        else:
            out["skipped_f1"].append(LETTERS[c])
    js = kept
    labels = yt[:, None] == np.asarray(js)[None, :]
    dirs = w[js] / np.maximum(np.linalg.norm(w[js], axis=1, keepdims=True), 1e-12)
    out.update(x=xt, labels=labels, correct=labels & (pred[:, None] == np.asarray(js)[None, :]), directions=dirs)
    return out


def first_letter(sae, probes: dict, cos_min: float = 0.025, share_min: float = 0.4) -> dict:
    """Absorption of the first-letter task (``first_letter_probes``) for one SAE: per kept letter
    the main latent (best F1 of firing vs the letter, test rows), its recall, and the absorption rate
    over the test rows whose letter the probe gets right: the main latent silent while latents with
    decoder cosine >= ``cos_min`` to the probe carry >= ``share_min`` of the projection on it.
    Adds the mean rate over letters with a 95% t-interval ("rate_ci")."""
    out = {k: probes[k] for k in ("letters", "probe_f1", "skipped_few", "skipped_f1", "n_rows", "n_tokens",
                                  "n_train", "n_test")}
    if not probes["letters"]:
        return {**out, "rate": float("nan"), "rate_ci": [float("nan")] * 2, "recall": float("nan"),
                "rates": [], "recalls": [], "main_latent": [], "f1": [], "absorbers": [], "counted": []}
    res = absorption(_encode(sae, probes["x"]), sae.arrays["W_dec"], probes["labels"], probes["directions"],
                     cos_min, counted=probes["correct"], share_min=share_min)
    mean, lo, hi = mean_ci(res["rates"])
    return {**out, **res, "rate": mean, "rate_ci": [lo, hi]}
