"""Segmentation metrics for one 2-D image (and pooled over a set), restricted to the field of view.

Conventions shared by every function:
- ``prob`` float [H,W] in [0,1]; ``pred`` / ``gt`` / ``fov`` binary [H,W] (any dtype, non-zero = 1).
- A pixel is predicted foreground when ``prob >= threshold`` (the same rule calibration sweeps).
- Pixels outside the FOV count nowhere: overlap metrics ignore them, and for skeleton / topology / surface metrics
  they are zeroed in both prediction and ground truth, so a false positive on the black retina border costs nothing.
- Undefined values are NaN, never a silent 0 or 1 (MONAI's ``ignore_empty=True``): an image with empty ground truth
  has no Dice, and averaging a made-up 1.0 for it would inflate every per-image mean.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
from scipy import ndimage

NAN = float("nan")

# 8-connected foreground / 4-connected background: the dual pair for which b0 - b1 is the Euler number.
_FG_STRUCTURE = np.ones((3, 3), dtype=bool)
_BG_STRUCTURE = ndimage.generate_binary_structure(2, 1)


@contextmanager
def _quiet_monai():
    # MONAI 1.5+ warns about its own internal use of a deprecated argument on every surface-distance call; the
    # warning is not actionable for callers and would flood evaluation logs (one per image).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        yield


def _as_mask(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [H,W] array, got shape {a.shape}")
    return a if a.dtype == bool else a != 0


def _inputs(pred: np.ndarray, gt: np.ndarray, fov: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pred, gt, fov) as bool arrays with pred and gt already zeroed outside the FOV."""
    p, g = _as_mask(pred, "pred"), _as_mask(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and gt {g.shape} differ in shape")
    if fov is None:
        return p, g, np.ones_like(g)
    f = _as_mask(fov, "fov")
    if f.shape != g.shape:
        raise ValueError(f"fov {f.shape} and gt {g.shape} differ in shape")
    return p & f, g & f, f


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else NAN


def binarize(prob: np.ndarray, threshold: float) -> np.ndarray:
    """``prob >= threshold`` compared in float64, the rule ``calibration.threshold_sweep`` counts with.

    With a float32 map a plain ``prob >= 0.3`` compares in float32 (NumPy 2 casts the Python float down), so a
    pixel equal to float32(0.3) would flip class between the sweep and the metrics and the calibrated threshold
    would not reproduce the Dice it was chosen for.
    """
    return np.asarray(prob) >= np.float64(threshold)


# ---------------------------------------------------------------------------------------------- overlap metrics
def confusion(pred: np.ndarray, gt: np.ndarray, fov: np.ndarray | None = None) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) pixel counts inside the FOV (``fov=None``: the whole image)."""
    p, g, f = _inputs(pred, gt, fov)
    return _confusion_masked(p, g, f)


def _confusion_masked(p: np.ndarray, g: np.ndarray, f: np.ndarray) -> tuple[int, int, int, int]:
    # one AND plus three popcounts instead of four full boolean images
    tp = int(np.count_nonzero(p & g))
    n_p, n_g, n_f = int(np.count_nonzero(p)), int(np.count_nonzero(g)), int(np.count_nonzero(f))
    fp, fn = n_p - tp, n_g - tp
    return tp, fp, fn, n_f - tp - fp - fn


def metrics_from_counts(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """Overlap metrics from confusion counts; NaN where the denominator is empty (see module docstring).

    dice / iou / recall are NaN when there is no ground-truth foreground (even if the prediction is empty too),
    precision is NaN when nothing is predicted, specificity when there is no background.
    """
    has_gt = tp + fn > 0
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn) if has_gt else NAN,
        "iou": _ratio(tp, tp + fp + fn) if has_gt else NAN,
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
    }


def binary_metrics(pred: np.ndarray, gt: np.ndarray, fov: np.ndarray | None = None) -> dict[str, float]:
    """dice, iou, precision, recall (= sensitivity), specificity, accuracy inside the FOV."""
    return metrics_from_counts(*confusion(pred, gt, fov))


# ---------------------------------------------------------------------------------------------------------- AUC
def auc_from_scores(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (ties count one half, identical to ``sklearn.metrics.roc_auc_score``); NaN with a single class.

    Mann-Whitney U by binary search of each positive into the sorted negatives: two plain sorts (vectorised in
    numpy) instead of an argsort of all pixels, which is what makes this several times faster than sklearn.
    """
    scores = np.asarray(scores).ravel()
    labels = np.asarray(labels).ravel().astype(bool, copy=False)
    pos, neg = scores[labels], scores[~labels]
    if pos.size == 0 or neg.size == 0:
        return NAN
    neg = np.sort(neg)
    pos = np.sort(pos)  # sorted queries keep the binary searches cache-friendly
    below = np.searchsorted(neg, pos, side="left")
    below_or_tied = np.searchsorted(neg, pos, side="right")
    u = (below.sum(dtype=np.float64) + below_or_tied.sum(dtype=np.float64)) / 2.0
    return float(u / (float(pos.size) * float(neg.size)))


def auc(prob: np.ndarray, gt: np.ndarray, fov: np.ndarray | None = None) -> float:
    """ROC AUC of the probabilities over FOV pixels; NaN when gt inside the FOV is all 0 or all 1."""
    g = _as_mask(gt, "gt")
    prob = np.asarray(prob)
    if prob.shape != g.shape:
        raise ValueError(f"prob {prob.shape} and gt {g.shape} differ in shape")
    if fov is None:
        return auc_from_scores(prob, g)
    f = _as_mask(fov, "fov")
    return auc_from_scores(prob[f], g[f])


# --------------------------------------------------------------------------------------- skeleton / topology
def _skeleton(mask: np.ndarray) -> np.ndarray:
    from skimage.morphology import skeletonize

    return skeletonize(mask) if mask.any() else mask


def _cldice_from(p: np.ndarray, g: np.ndarray, skel_p: np.ndarray, skel_g: np.ndarray) -> float:
    n_skel_g = np.count_nonzero(skel_g)
    if n_skel_g == 0:  # empty ground truth: centreline sensitivity is undefined
        return NAN
    n_skel_p = np.count_nonzero(skel_p)
    # an empty prediction has no centreline to be precise about; it scores 0, it did miss every vessel
    t_prec = np.count_nonzero(skel_p & g) / n_skel_p if n_skel_p else 0.0
    t_sens = np.count_nonzero(skel_g & p) / n_skel_g
    return 0.0 if t_prec + t_sens == 0 else float(2.0 * t_prec * t_sens / (t_prec + t_sens))


def cldice(pred: np.ndarray, gt: np.ndarray, fov: np.ndarray | None = None) -> float:
    """Centreline Dice (Shit et al. 2021): harmonic mean of Tprec = |skel(pred) ∩ gt| / |skel(pred)| and
    Tsens = |skel(gt) ∩ pred| / |skel(gt)|, skeletons by ``skimage.morphology.skeletonize`` of the FOV-masked
    masks. NaN when gt is empty inside the FOV; 0 when the prediction is empty."""
    p, g, _ = _inputs(pred, gt, fov)
    return _cldice_from(p, g, _skeleton(p), _skeleton(g))


def betti_numbers(mask: np.ndarray) -> tuple[int, int]:
    """(b0, b1) of a 2-D binary mask: 8-connected foreground components, and holes = 4-connected background
    components that do not touch the image border. b0 - b1 equals ``skimage.measure.euler_number(mask, 2)``."""
    m = _as_mask(mask, "mask")
    if not m.any():
        return 0, 0
    _, b0 = ndimage.label(m, structure=_FG_STRUCTURE)
    # A one-pixel background frame joins every border-touching background region into a single component,
    # so the holes are all the other background components.
    framed = np.pad(~m, 1, constant_values=True)
    _, n_bg = ndimage.label(framed, structure=_BG_STRUCTURE)
    return int(b0), int(n_bg - 1)


def betti_errors(pred: np.ndarray, gt: np.ndarray, fov: np.ndarray | None = None) -> tuple[int, int]:
    """(|b0(pred) - b0(gt)|, |b1(pred) - b1(gt)|) inside the FOV: fragments / merges and spurious or missed loops."""
    p, g, _ = _inputs(pred, gt, fov)
    (p0, p1), (g0, g1) = betti_numbers(p), betti_numbers(g)
    return abs(p0 - g0), abs(p1 - g1)


# -------------------------------------------------------------------------------------------- surface distance
def _spacing_arg(spacing: float | Sequence[float] | None):
    if spacing is None:
        return None
    if isinstance(spacing, (int, float, np.integer, np.floating)):
        return float(spacing)
    return [float(s) for s in spacing]


def _one_hot(mask: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]


def hd95(pred: np.ndarray, gt: np.ndarray, fov: np.ndarray | None = None,
         spacing: float | Sequence[float] = 1.0) -> float:
    """95th-percentile symmetric Hausdorff distance between the mask boundaries, in units of ``spacing``
    (``monai.metrics.compute_hausdorff_distance(percentile=95)``).

    NaN when the prediction or the ground truth is empty inside the FOV: MONAI would return inf or NaN, and a
    distance to nothing is undefined rather than large."""
    from monai.metrics import compute_hausdorff_distance

    p, g, _ = _inputs(pred, gt, fov)
    if not p.any() or not g.any():
        return NAN
    with _quiet_monai():
        value = compute_hausdorff_distance(_one_hot(p), _one_hot(g), include_background=True, percentile=95,
                                           spacing=_spacing_arg(spacing))
    return float(value.item())


def assd(pred: np.ndarray, gt: np.ndarray, fov: np.ndarray | None = None,
         spacing: float | Sequence[float] = 1.0) -> float:
    """Average symmetric surface distance (``monai.metrics.compute_average_surface_distance(symmetric=True)``),
    in units of ``spacing``. NaN when the prediction or the ground truth is empty inside the FOV."""
    from monai.metrics import compute_average_surface_distance

    p, g, _ = _inputs(pred, gt, fov)
    if not p.any() or not g.any():
        return NAN
    with _quiet_monai():
        value = compute_average_surface_distance(_one_hot(p), _one_hot(g), include_background=True,
                                                 symmetric=True, spacing=_spacing_arg(spacing))
    return float(value.item())


def _surface_distances(p: np.ndarray, g: np.ndarray, spacing) -> tuple[float, float]:
    """(hd95, assd) from ONE boundary extraction and one KD-tree query per direction.

    ``compute_hausdorff_distance`` and ``compute_average_surface_distance`` each run the same MONAI edge
    extraction + distance step; sharing it halves the most expensive part of ``image_metrics``. The reductions
    below are MONAI's own (torch.quantile per direction then max; mean of both directions concatenated), so the
    numbers are identical to calling the two functions.
    """
    import torch
    from monai.metrics.utils import get_edge_surface_distance

    if not p.any() or not g.any():
        return NAN, NAN
    with _quiet_monai():
        _, distances, _ = get_edge_surface_distance(
            torch.from_numpy(p), torch.from_numpy(g), distance_metric="euclidean",
            spacing=_spacing_arg(spacing), symmetric=True, warn_empty=False,
        )
    h = max(float(torch.quantile(d, 0.95)) for d in distances)
    a = float(torch.cat(distances).mean())
    return h, a


# ---------------------------------------------------------------------------------------------------- per image
def image_metrics(prob: np.ndarray, gt: np.ndarray, fov: np.ndarray | None = None, threshold: float = 0.5,
                  topology: bool = True, surface: bool = True,
                  spacing: float | Sequence[float] = 1.0) -> dict[str, float]:
    """Every metric for one image at ``threshold``.

    Keys: dice, iou, precision, recall, specificity, accuracy, auc; with ``topology``: cldice, betti0_error,
    betti1_error; with ``surface``: hd95, assd (units of ``spacing``). Each mask is thresholded, FOV-masked and
    skeletonised once and shared by the metrics that need it.
    """
    prob = np.asarray(prob)
    g_raw = _as_mask(gt, "gt")
    if prob.shape != g_raw.shape:
        raise ValueError(f"prob {prob.shape} and gt {g_raw.shape} differ in shape")
    p, g, f = _inputs(binarize(prob, threshold), g_raw, fov)

    out = metrics_from_counts(*_confusion_masked(p, g, f))
    out["auc"] = auc_from_scores(prob[f], g[f]) if fov is not None else auc_from_scores(prob, g)
    if topology:
        out["cldice"] = _cldice_from(p, g, _skeleton(p), _skeleton(g))
        (p0, p1), (g0, g1) = betti_numbers(p), betti_numbers(g)
        out["betti0_error"] = float(abs(p0 - g0))
        out["betti1_error"] = float(abs(p1 - g1))
    if surface:
        out["hd95"], out["assd"] = _surface_distances(p, g, spacing)
    return out


# -------------------------------------------------------------------------------------------------------- pooled
def pooled_metrics(probs: Sequence[np.ndarray], gts: Sequence[np.ndarray], fovs: Sequence[np.ndarray | None],
                   threshold: float = 0.5) -> dict[str, float]:
    """Overlap metrics over all FOV pixels of all images pooled (the usual DRIVE protocol), plus pooled AUC.

    Pooled Dice weights images by their vessel pixel count, so it differs from the mean of per-image Dice; both are
    reported because papers use either.
    """
    if not (len(probs) == len(gts) == len(fovs)):
        raise ValueError(f"probs ({len(probs)}), gts ({len(gts)}) and fovs ({len(fovs)}) differ in length")
    counts = np.zeros(4, dtype=np.int64)
    scores, labels = [], []
    for prob, gt, fov in zip(probs, gts, fovs):
        prob = np.asarray(prob)
        g_raw = _as_mask(gt, "gt")
        if prob.shape != g_raw.shape:
            raise ValueError(f"prob {prob.shape} and gt {g_raw.shape} differ in shape")
        p, g, f = _inputs(binarize(prob, threshold), g_raw, fov)
        counts += _confusion_masked(p, g, f)
        scores.append(prob[f].astype(np.float32, copy=False))
        labels.append(g[f])
    out = metrics_from_counts(*(int(c) for c in counts))
    out["auc"] = auc_from_scores(np.concatenate(scores), np.concatenate(labels)) if scores else NAN
    return out
