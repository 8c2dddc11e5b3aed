"""Uncertainty and paired comparisons over per-image metric values.

Test sets in medical segmentation are small (DRIVE: 20 images), so every mean is reported with a bootstrap
confidence interval over images, and two runs are compared image-by-image (paired), never by their means alone.
NaN values (e.g. Dice on an image with empty ground truth) are dropped and counted, not treated as 0.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

NAN = float("nan")

# Metrics where a smaller value is the better one; compare_metric flips its verdict for these. change_error and
# flicker: a video's temporal instability (medtune.video_metrics).
LOWER_IS_BETTER = frozenset({"hd95", "assd", "betti0_error", "betti1_error", "change_error", "flicker"})


def _floats(values: Iterable) -> np.ndarray:
    out = []
    for v in values:
        try:
            out.append(float(v) if v is not None and v != "" else NAN)
        except (TypeError, ValueError):
            out.append(NAN)
    return np.asarray(out, dtype=np.float64)


def _bootstrap_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    return x[idx].mean(axis=1)


def bootstrap_ci(values: Sequence[float] | np.ndarray, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> dict[str, float | int]:
    """Mean over images with a percentile-bootstrap (1 - alpha) CI: {mean, lo, hi, n, n_nan}.

    Non-finite values are dropped and counted in ``n_nan``; ``n`` is how many remain. With none left mean, lo and hi
    are NaN; with one, the interval collapses to it (there is no spread to resample).
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    x = _floats(values)
    finite = np.isfinite(x)
    x = x[finite]
    out: dict[str, float | int] = {"mean": NAN, "lo": NAN, "hi": NAN, "n": int(x.size),
                                   "n_nan": int((~finite).sum())}
    if x.size == 0:
        return out
    out["mean"] = float(x.mean())
    if x.size == 1:
        out["lo"] = out["hi"] = out["mean"]
        return out
    boots = _bootstrap_means(x, n_boot, seed)
    out["lo"], out["hi"] = (float(v) for v in np.quantile(boots, [alpha / 2, 1 - alpha / 2]))
    return out


def _pairs(a, b) -> np.ndarray:
    x, y = _floats(a), _floats(b)
    if x.shape != y.shape:
        raise ValueError(f"paired values must cover the same images: got {x.size} and {y.size} values")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep] - y[keep]


def paired_bootstrap(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n_boot: int = 1000,
                     seed: int = 0, alpha: float = 0.05) -> dict[str, float | int]:
    """Paired bootstrap of the mean difference a - b over the same images: {mean_diff, lo, hi, p_value, n}.

    Pairs with a NaN on either side are dropped. The two-sided p-value resamples the differences re-centred on 0
    (the null of no mean difference): p = (1 + #{|boot - mean| >= |mean|}) / (1 + n_boot).
    """
    d = _pairs(a, b)
    out: dict[str, float | int] = {"mean_diff": NAN, "lo": NAN, "hi": NAN, "p_value": NAN, "n": int(d.size)}
    if d.size == 0:
        return out
    mean = float(d.mean())
    out["mean_diff"] = mean
    if d.size == 1:
        out["lo"] = out["hi"] = mean
        out["p_value"] = 1.0
        return out
    boots = _bootstrap_means(d, n_boot, seed)
    out["lo"], out["hi"] = (float(v) for v in np.quantile(boots, [alpha / 2, 1 - alpha / 2]))
    # the tolerance keeps an exactly-zero effect at p = 1 despite rounding in the resampled means
    extreme = np.abs(boots - mean) >= abs(mean) - 1e-12
    out["p_value"] = float((1 + int(extreme.sum())) / (1 + n_boot))
    return out


def wilcoxon(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> dict[str, float | int]:
    """Wilcoxon signed-rank test of a vs b over the same images (``scipy.stats.wilcoxon``, two-sided):
    {statistic, p_value, n}. Pairs with a NaN are dropped; all-zero differences give statistic 0 and p = 1 (scipy
    would return NaN or raise); no pairs give NaN."""
    from scipy.stats import wilcoxon as _wilcoxon

    d = _pairs(a, b)
    if d.size == 0:
        return {"statistic": NAN, "p_value": NAN, "n": 0}
    if not np.any(d != 0):
        return {"statistic": 0.0, "p_value": 1.0, "n": int(d.size)}
    res = _wilcoxon(d)
    p = float(res.pvalue)
    return {"statistic": float(res.statistic), "p_value": 1.0 if not np.isfinite(p) else p, "n": int(d.size)}


def mcnemar(a_correct: Sequence[float] | np.ndarray, b_correct: Sequence[float] | np.ndarray) -> dict[str, float | int]:
    """McNemar's test of two classifiers on the same samples (exact: a two-sided binomial test on the discordant
    pairs). ``a_correct`` / ``b_correct``: 1 where the answer was right, 0 where wrong (NaN pairs dropped).
    Returns {n, a_only (A right, B wrong), b_only, p_value}; no discordant pair gives p = 1."""
    from scipy.stats import binomtest

    x, y = _floats(a_correct), _floats(b_correct)
    if x.shape != y.shape:
        raise ValueError(f"paired values must cover the same samples: got {x.size} and {y.size} values")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep] > 0.5, y[keep] > 0.5
    a_only, b_only = int((x & ~y).sum()), int((~x & y).sum())
    p = 1.0 if a_only + b_only == 0 else float(binomtest(a_only, a_only + b_only, 0.5).pvalue)
    return {"n": int(keep.sum()), "a_only": a_only, "b_only": b_only, "p_value": min(1.0, p)}


def compare_metric(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, alpha: float = 0.05,
                   higher_is_better: bool = True, n_boot: int = 1000, seed: int = 0) -> dict:
    """Paired comparison of run A and run B on one metric over the same images.

    Significant only when both the Wilcoxon signed-rank p < alpha and the paired-bootstrap (1 - alpha) CI of the
    mean difference excludes 0: the two can disagree on a handful of images, and a report that calls a difference
    real while showing a CI through 0 would contradict itself. ``higher_is_better=False`` for distances and error
    counts (see ``LOWER_IS_BETTER``).

    Returns {n, mean_a, mean_b, mean_diff, lo, hi, p_bootstrap, p_wilcoxon, statistic, significant,
    verdict: "A better" | "B better" | "no significant difference"}.
    """
    x, y = _floats(a), _floats(b)
    if x.shape != y.shape:
        raise ValueError(f"paired values must cover the same images: got {x.size} and {y.size} values")
    keep = np.isfinite(x) & np.isfinite(y)
    boot = paired_bootstrap(x, y, n_boot=n_boot, seed=seed, alpha=alpha)
    wil = wilcoxon(x, y)
    ci_excludes_zero = bool(np.isfinite(boot["lo"]) and (boot["lo"] > 0 or boot["hi"] < 0))
    significant = bool(np.isfinite(wil["p_value"]) and wil["p_value"] < alpha and ci_excludes_zero)
    verdict = "no significant difference"
    if significant:
        a_higher = boot["mean_diff"] > 0
        verdict = "A better" if a_higher == higher_is_better else "B better"
    return {
        "n": int(keep.sum()),
        "mean_a": float(x[keep].mean()) if keep.any() else NAN,
        "mean_b": float(y[keep].mean()) if keep.any() else NAN,
        "mean_diff": boot["mean_diff"], "lo": boot["lo"], "hi": boot["hi"],
        "p_bootstrap": boot["p_value"], "p_wilcoxon": wil["p_value"], "statistic": wil["statistic"],
        "significant": significant, "verdict": verdict,
    }


def aggregate(per_image_rows: Sequence[Mapping], metrics: Sequence[str], n_boot: int = 1000, alpha: float = 0.05,
              seed: int = 0) -> dict[str, dict]:
    """{metric: bootstrap_ci(...)} over the rows (one per image); a missing, empty or non-numeric value is NaN.

    One seed for all metrics: metrics with the same valid images are resampled identically, so their intervals
    are comparable rather than differing by resampling noise.
    """
    return {m: bootstrap_ci([row.get(m, NAN) for row in per_image_rows], n_boot=n_boot, alpha=alpha, seed=seed)
            for m in metrics}
