"""Threshold calibration on the validation split: pooled counts over a threshold grid, then a selection rule.

A thin-structure model's best threshold is rarely 0.5 (class imbalance pushes probabilities down), and the lead's
protocol fits it on val only and reports test at both 0.5 and the fitted value (see ``medtune.evaluate``).
Prediction rule everywhere: foreground when ``prob >= threshold`` (``medtune.metrics.binarize``), so the Dice a
threshold was chosen for is exactly what ``pooled_metrics`` reproduces at that threshold.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from medtune.metrics import _as_mask

DEFAULT_THRESHOLDS = np.linspace(0.02, 0.98, 49)
STRATEGIES = ("max_dice", "max_fbeta", "target_recall")


def _check_lists(probs, gts, fovs) -> None:
    if not (len(probs) == len(gts) == len(fovs)):
        raise ValueError(f"probs ({len(probs)}), gts ({len(gts)}) and fovs ({len(fovs)}) differ in length")
    if len(probs) == 0:
        raise ValueError("no images to calibrate on (empty probs list)")


def _safe_div(num: np.ndarray, den: np.ndarray, fill: float = np.nan) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    out = np.full(np.broadcast(num, den).shape, fill, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def threshold_sweep(probs: Sequence[np.ndarray], gts: Sequence[np.ndarray], fovs: Sequence[np.ndarray | None],
                    thresholds: Sequence[float] | np.ndarray = DEFAULT_THRESHOLDS) -> dict[str, np.ndarray]:
    """Pooled confusion counts over all FOV pixels for every threshold (sorted ascending, duplicates dropped).

    Each pixel is binned once by how many thresholds lie at or below its probability (one binary search into the
    grid), per class; a reverse cumulative sum of the two histograms then gives tp / fp at every threshold. Cost is
    O(pixels · log T) rather than thresholding every image T times.

    Returns arrays over thresholds: thresholds, tp, fp, fn, tn, dice, precision, recall (NaN where undefined:
    dice / recall without ground-truth foreground, precision where nothing is predicted).
    """
    _check_lists(probs, gts, fovs)
    thr = np.unique(np.asarray(thresholds, dtype=np.float64))
    if thr.size == 0:
        raise ValueError("thresholds is empty")
    n_bins = thr.size + 1
    pos_hist = np.zeros(n_bins, dtype=np.int64)
    neg_hist = np.zeros(n_bins, dtype=np.int64)
    for prob, gt, fov in zip(probs, gts, fovs):
        prob = np.asarray(prob)
        g = _as_mask(gt, "gt")
        if prob.shape != g.shape:
            raise ValueError(f"prob {prob.shape} and gt {g.shape} differ in shape")
        if fov is not None:
            f = _as_mask(fov, "fov")
            prob, g = prob[f], g[f]
        # bin k = number of thresholds <= p (compared in float64, as metrics.binarize): the pixel is foreground at
        # exactly the thresholds with index < k
        k = np.searchsorted(thr, prob.ravel().astype(np.float64, copy=False), side="right")
        g = g.ravel()
        pos_hist += np.bincount(k[g], minlength=n_bins)
        neg_hist += np.bincount(k[~g], minlength=n_bins)
    # tp[j] = positives in bins > j
    tp = np.cumsum(pos_hist[::-1])[::-1][1:]
    fp = np.cumsum(neg_hist[::-1])[::-1][1:]
    n_pos, n_neg = int(pos_hist.sum()), int(neg_hist.sum())
    fn, tn = n_pos - tp, n_neg - fp
    dice = _safe_div(2 * tp, 2 * tp + fp + fn) if n_pos else np.full(thr.size, np.nan)
    return {
        "thresholds": thr, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "dice": dice,
        "precision": _safe_div(tp, tp + fp),
        "recall": _safe_div(tp, np.full(thr.size, n_pos)),
    }


def _fbeta(sweep: dict, beta: float) -> np.ndarray:
    b2 = float(beta) ** 2
    tp, fp, fn = sweep["tp"], sweep["fp"], sweep["fn"]
    if int(tp[0] + fn[0]) == 0:
        return np.full(tp.size, np.nan)
    return _safe_div((1 + b2) * tp, (1 + b2) * tp + b2 * fn + fp)


def _middle_of_best(values: np.ndarray) -> int | None:
    """Index of the maximum; on a flat optimum the middle one of the tied thresholds, which keeps the choice away
    from the plateau's edge where a small shift in the test distribution starts to cost."""
    finite = np.isfinite(values)
    if not finite.any():
        return None
    best = np.nanmax(values)
    tied = np.flatnonzero(finite & (values == best))
    return int(tied[len(tied) // 2])


def calibrate(probs: Sequence[np.ndarray], gts: Sequence[np.ndarray], fovs: Sequence[np.ndarray | None],
              strategy: Literal["max_dice", "max_fbeta", "target_recall"] = "max_dice", beta: float = 1.0,
              target_recall: float = 0.9, thresholds: Sequence[float] | np.ndarray = DEFAULT_THRESHOLDS) -> dict:
    """Choose a threshold from pooled validation counts.

    - ``max_dice``: maximise pooled Dice.
    - ``max_fbeta``: maximise pooled F-beta (beta > 1 favours recall, < 1 precision).
    - ``target_recall``: the highest-precision threshold among those with pooled recall >= ``target_recall``
      (ties: the higher threshold); if none reaches it, the highest-recall threshold with ``met=False``.

    Returns {threshold, strategy, value (the objective at the threshold: Dice, F-beta, or precision for
    target_recall), dice, precision, recall (at the threshold), met, note, curve={thresholds, dice, precision,
    recall} as lists}, plus beta / target_recall when used. Without any foreground in the validation ground truth
    nothing can be fitted: threshold 0.5, value NaN, met False, and ``note`` says why.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown calibration strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "max_fbeta" and not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if strategy == "target_recall" and not 0.0 <= target_recall <= 1.0:
        raise ValueError(f"target_recall must be in [0, 1], got {target_recall}")
    sweep = threshold_sweep(probs, gts, fovs, thresholds)
    thr = sweep["thresholds"]
    result: dict = {"strategy": strategy, "met": True, "note": ""}
    if strategy == "max_fbeta":
        result["beta"] = float(beta)
    if strategy == "target_recall":
        result["target_recall"] = float(target_recall)

    if strategy == "target_recall":
        objective = sweep["precision"]
        recall = sweep["recall"]
        ok = np.isfinite(recall) & (recall >= target_recall)
        if ok.any():
            prec = np.where(ok & np.isfinite(objective), objective, -np.inf)
            if np.isfinite(prec).any():
                idx = int(np.flatnonzero(prec == prec.max())[-1])
            else:  # only thresholds that predict nothing reach the target, which happens only at recall 0
                idx = int(np.flatnonzero(ok)[-1])
        elif np.isfinite(recall).any():
            best = np.nanmax(recall)
            idx = int(np.flatnonzero(recall == best)[-1])
            result["met"] = False
            result["note"] = (f"no threshold reaches recall {target_recall:g} on validation (best {best:.4f} at the "
                              f"lowest useful threshold); using the highest-recall threshold")
        else:
            idx = None
    else:
        objective = sweep["dice"] if strategy == "max_dice" else _fbeta(sweep, beta)
        idx = _middle_of_best(objective)

    if idx is None:
        result.update(threshold=0.5, value=float("nan"), dice=float("nan"), precision=float("nan"),
                      recall=float("nan"), met=False,
                      note="validation ground truth has no foreground inside the FOV; threshold left at 0.5")
    else:
        result.update(threshold=float(thr[idx]), value=float(objective[idx]), dice=float(sweep["dice"][idx]),
                      precision=float(sweep["precision"][idx]), recall=float(sweep["recall"][idx]))
    # lists, not arrays: the curve goes to calibration.json and the report tests it for truthiness
    result["curve"] = {k: [float(v) for v in sweep[k]] for k in ("thresholds", "dice", "precision", "recall")}
    return result


def pr_curve(probs: Sequence[np.ndarray], gts: Sequence[np.ndarray], fovs: Sequence[np.ndarray | None],
             n_thresholds: int = 1001) -> dict:
    """Pooled precision-recall curve over FOV pixels on an even grid of ``n_thresholds`` thresholds in [0, 1].

    Returns {thresholds (descending), precision, recall, ap, n_pos, n_neg} like
    ``medtune.report.plots.pr_curve_from_uint8``: precision is 1 where nothing is predicted, and ``ap`` is the
    step-wise average precision over the grid (exact for maps quantised to it, otherwise a close lower-resolution
    estimate of sklearn's ``average_precision_score``).
    """
    if n_thresholds < 2:
        raise ValueError(f"n_thresholds must be >= 2, got {n_thresholds}")
    sweep = threshold_sweep(probs, gts, fovs, np.linspace(0.0, 1.0, n_thresholds))
    tp, fp = sweep["tp"][::-1], sweep["fp"][::-1]
    n_pos, n_neg = int(sweep["tp"][0] + sweep["fn"][0]), int(sweep["fp"][0] + sweep["tn"][0])
    recall = tp / max(n_pos, 1)
    precision = _safe_div(tp, tp + fp, fill=1.0)
    prev_recall = np.concatenate([[0.0], recall[:-1]])
    ap = float(np.sum((recall - prev_recall) * precision)) if n_pos else float("nan")
    return {"thresholds": sweep["thresholds"][::-1], "precision": precision, "recall": recall, "ap": ap,
            "n_pos": n_pos, "n_neg": n_neg}
