"""Segmentation metrics over a video: per-frame Dice, DAVIS region similarity J and boundary F, clDice on annotated
frames, temporal stability, and the pooling of per-video scores with confidence intervals over videos.

Conventions (shared with ``medtune.metrics``):
- ``probs`` / ``gts`` are mappings frame index -> [H, W] array; ``probs`` holds every predicted frame, ``gts`` only
  the annotated ones (sparse annotation is normal). A frame without ground truth carries no Dice, J, F or clDice; it
  still counts for the prediction's own frame-to-frame change (``flicker``).
- A pixel is foreground when ``prob >= threshold`` (``medtune.metrics.binarize``), pixels outside the FOV count
  nowhere (prediction and ground truth are zeroed there).
- Dice and clDice follow medtune's rule: NaN on a frame whose ground truth is empty. J and F follow the DAVIS
  benchmark's rule instead (both empty: 1; one empty: 0), so J&F is the number the video segmentation literature
  reports; a frame before the contrast arrives (empty vessel mask) is thereby scored on J&F (a false alarm costs)
  but not on Dice.

Uncertainty: frames of one run are strongly correlated (the same vessel tree, one patient, one acquisition), so a
bootstrap over frames would treat 30 near-copies as 30 independent observations and give a falsely narrow interval.
Every CI here resamples videos (``pool_videos``), the unit that is independent.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import numpy as np
from scipy import ndimage

from medtune.metrics import NAN, _as_mask, binarize, cldice, confusion, metrics_from_counts
from medtune.stats import aggregate

# DAVIS default: boundaries match within 0.8% of the image diagonal (about 5 px at 480p, 3 px at 256²).
BOUND_TH = 0.008
# Per-video scalar metrics pooled with CIs over videos; the order of report tables and of format_summary.
VIDEO_METRICS = ["dice", "j", "f", "jf", "cldice", "pooled_dice", "precision", "recall", "pred_change", "gt_change",
                 "change_ratio", "change_excess", "change_error", "flicker"]


def _check_shapes(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: prediction {a.shape} and ground truth {b.shape} differ in shape")


# ------------------------------------------------------------------------------------------------- J and F
def region_similarity(pred: np.ndarray, gt: np.ndarray, fov: np.ndarray | None = None) -> float:
    """DAVIS region similarity J = |pred ∩ gt| / |pred ∪ gt| inside the FOV; 1 when both are empty (the object is
    absent and nothing was predicted: correct), 0 when only one is."""
    tp, fp, fn, _ = confusion(pred, gt, fov)
    union = tp + fp + fn
    return 1.0 if union == 0 else tp / union


def boundary_pixels(mask: np.ndarray) -> np.ndarray:
    """The boundary map DAVIS scores (its ``seg2bmap``): pixels whose 2x2 window (the pixel and its right, lower and
    lower-right neighbours) is not all one class. The contour runs between pixel centres, so it is marked on the
    pixels above / left of the object's edge as well as on the object's own last row / column: a 3x3 square has a
    12-pixel ring (its 4x4 block less the 2x2 inside). Beyond the image the last row / column repeat, so the image's
    edge is no contour and a mask filling the image has no boundary."""
    m = _as_mask(mask, "mask")
    if not m.any():
        return m
    padded = np.pad(m, ((0, 1), (0, 1)), mode="edge")
    window = (padded[:-1, :-1], padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:])
    all_fg = window[0] & window[1] & window[2] & window[3]
    any_fg = window[0] | window[1] | window[2] | window[3]
    return any_fg & ~all_fg


def boundary_tolerance(shape: tuple[int, int], bound_th: float = BOUND_TH) -> int:
    """Matching distance in pixels: ``bound_th`` x the image diagonal rounded up when ``bound_th < 1``, else
    ``bound_th`` pixels (DAVIS' rule for both)."""
    if bound_th >= 1:
        return int(math.ceil(bound_th))
    return int(math.ceil(bound_th * math.hypot(shape[0], shape[1])))


def boundary_precision_recall(pred: np.ndarray, gt: np.ndarray, bound_th: float = BOUND_TH,
                              fov: np.ndarray | None = None) -> tuple[float, float, float]:
    """(F, precision, recall) of the mask boundaries (DAVIS contour accuracy, Perazzi et al. CVPR 2016).

    A boundary pixel of the prediction is matched when a ground-truth boundary pixel lies within the tolerance
    (Euclidean distance <= ``boundary_tolerance``, the same set as DAVIS' dilation by a disk), and vice versa.
    precision = matched prediction boundary / prediction boundary, recall = matched ground-truth boundary / ground-
    truth boundary, F their harmonic mean. Empty boundaries as in DAVIS: both empty 1, one empty 0.
    The boundary map is DAVIS' (``boundary_pixels``), so the scores are the benchmark's for masks of one size.
    """
    p, g = _as_mask(pred, "pred"), _as_mask(gt, "gt")
    _check_shapes(p, g, "boundary F")
    if fov is not None:
        f = _as_mask(fov, "fov")
        p, g = p & f, g & f
    bp, bg = boundary_pixels(p), boundary_pixels(g)
    n_p, n_g = int(bp.sum()), int(bg.sum())
    if n_p == 0 or n_g == 0:
        both_empty = n_p == 0 and n_g == 0
        # DAVIS: nothing predicted -> precision 1, recall 0; nothing to find -> precision 0, recall 1
        precision = 1.0 if n_p == 0 else 0.0
        recall = 1.0 if n_g == 0 else 0.0
        return (1.0 if both_empty else 0.0), precision, recall
    tol = boundary_tolerance(p.shape, bound_th)
    # distance of every pixel to the nearest boundary pixel of the other mask: one EDT each, cost independent of tol
    near_g = ndimage.distance_transform_edt(~bg) <= tol
    near_p = ndimage.distance_transform_edt(~bp) <= tol
    precision = float((bp & near_g).sum()) / n_p
    recall = float((bg & near_p).sum()) / n_g
    f_score = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return f_score, precision, recall


def boundary_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = BOUND_TH, fov: np.ndarray | None = None) -> float:
    """DAVIS boundary F (see ``boundary_precision_recall``)."""
    return boundary_precision_recall(pred, gt, bound_th, fov)[0]


# ----------------------------------------------------------------------------------------- temporal stability
def mask_change(a: np.ndarray, b: np.ndarray) -> float:
    """How much a mask changed from one frame to another: |a xor b| / (|a| + |b|) = 1 - Dice(a, b), in [0, 1].

    0: identical; 1: disjoint. Relative to the masks' own size, so a thin vessel tree covering 3% of the image and
    a large organ are on one scale; both empty: 0 (nothing changed)."""
    n = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 0.0 if n == 0 else int(np.count_nonzero(a ^ b)) / n


def _as_masks(frames: Mapping[int, np.ndarray], fov) -> dict[int, np.ndarray]:
    return {int(t): _fov_masked(_as_mask(m, f"frame {t}"), fov, t) for t, m in frames.items()}


def _fov_at(fov, t: int) -> np.ndarray | None:
    if fov is None:
        return None
    if isinstance(fov, Mapping):
        f = fov.get(t)
        return None if f is None else _as_mask(f, f"fov of frame {t}")
    return _as_mask(fov, "fov")


def _fov_masked(m: np.ndarray, fov, t: int) -> np.ndarray:
    f = _fov_at(fov, t)
    if f is None:
        return m
    _check_shapes(m, f, f"fov of frame {t}")
    return m & f


def temporal_stability(preds: Mapping[int, np.ndarray], gts: Mapping[int, np.ndarray],
                       fov: np.ndarray | Mapping[int, np.ndarray] | None = None) -> dict[str, float]:
    """How much the prediction changes over time against how much the ground truth does.

    ``preds``: frame -> binary prediction (every predicted frame); ``gts``: frame -> binary ground truth (the
    annotated frames). The change of a mask between two frames is ``mask_change`` (= 1 - Dice between them).

    Pairs: each annotated frame and the next annotated frame (a, b), for which a prediction exists at both. Where
    annotation is dense these are consecutive frames; where it is sparse (every k-th frame) they are k apart, the
    closest pairs on which the true change is known. Per pair, the prediction's change c_P = change(P_a, P_b) and
    the ground truth's c_G = change(G_a, G_b); then

    - ``pred_change`` = mean c_P, ``gt_change`` = mean c_G over the pairs;
    - ``change_ratio`` = pred_change / gt_change (1: the prediction moves as much as the anatomy; > 1 it flickers
      or drifts; < 1 it lags, e.g. a mask stuck on the first frame). NaN when the ground truth never changes;
    - ``change_excess`` = pred_change - gt_change (signed; defined also for a static ground truth);
    - ``change_error`` = mean |c_P - c_G| (0 only if the prediction changes exactly as much as the ground truth on
      every pair; lower is better: the number to compare runs on);
    - ``flicker`` = mean change(P_t, P_t+1) over all consecutive predicted frames (t and t + 1 both predicted):
      the frame-to-frame jitter an image-by-image model shows, measured also where nothing is annotated. It has no
      ground-truth reference (a beating heart moves too), so it compares runs on the same videos, not to 0;
    - ``n_pairs``, ``n_flicker_pairs``: how many pairs each mean is over (NaN means when 0).

    Why this measure: per-frame Dice cannot see flicker, since a mask that jumps between two equally wrong shapes
    scores like one that holds still. Change relative to the ground truth's own change separates the two things
    that move a mask, the anatomy (cardiac motion, contrast filling) and the model's instability; comparing the
    same frame pairs keeps the comparison fair when annotation is sparse.
    """
    p = _as_masks(preds, fov)
    g = _as_masks(gts, fov)
    frames = sorted(p)
    flick = [mask_change(p[t], p[t + 1]) for t in frames if t + 1 in p]
    return _stability(*_annotated_changes(p, g), flick)


def _annotated_changes(p: Mapping[int, np.ndarray], g: Mapping[int, np.ndarray]) -> tuple[list[float], list[float]]:
    """(c_P, c_G) over the pairs of successive annotated frames that both have a prediction."""
    annotated = sorted(t for t in g if t in p)
    c_p, c_g = [], []
    for a, b in zip(annotated, annotated[1:]):
        _check_shapes(p[a], g[a], f"frame {a}")
        _check_shapes(p[b], g[b], f"frame {b}")
        c_p.append(mask_change(p[a], p[b]))
        c_g.append(mask_change(g[a], g[b]))
    return c_p, c_g


def _stability(c_p: list[float], c_g: list[float], flick: list[float]) -> dict[str, float]:
    out = {"pred_change": NAN, "gt_change": NAN, "change_ratio": NAN, "change_excess": NAN, "change_error": NAN,
           "flicker": float(np.mean(flick)) if flick else NAN, "n_pairs": len(c_p), "n_flicker_pairs": len(flick)}
    if c_p:
        pc, gc = float(np.mean(c_p)), float(np.mean(c_g))
        out.update(pred_change=pc, gt_change=gc, change_ratio=pc / gc if gc > 0 else NAN, change_excess=pc - gc,
                   change_error=float(np.mean(np.abs(np.subtract(c_p, c_g)))))
    return out


# ------------------------------------------------------------------------------------------------- per video
def video_scores(probs: Mapping[int, np.ndarray], gts: Mapping[int, np.ndarray], threshold: float = 0.5,
                 fov: np.ndarray | Mapping[int, np.ndarray] | None = None, bound_th: float = BOUND_TH,
                 exclude: Collection[int] = ()) -> dict:
    """Every metric of one video at ``threshold``.

    ``probs``: frame -> float [H, W] probability (every predicted frame; a lazy Mapping is fine: frames are read one
    at a time, in order); ``gts``: frame -> binary [H, W] (annotated frames); ``fov``: one [H, W] mask for all
    frames, frame -> mask, or None; ``exclude``: frames scored nowhere but kept for the prediction's flicker (the
    frame whose ground-truth mask prompted the model: DAVIS leaves it out too, a copied mask would score 1).

    Returns a flat dict of per-video scalars (``VIDEO_METRICS``: means over the scored annotated frames of
    dice, j, f, jf = (j + f) / 2, cldice; pooled_dice / precision / recall over the video's annotated pixels; the
    ``temporal_stability`` keys) plus n_frames, n_annotated (scored frames), n_empty_gt, the pooled counts tp, fp,
    fn, tn, and ``per_frame``: one dict per predicted frame {frame, annotated, area (predicted pixels), change
    (``mask_change`` from the previous frame, NaN for the first or after a gap), dice, j, f, cldice (NaN when not
    annotated)}. A ground-truth frame without a prediction is an error (the model skipped a frame).
    """
    skipped = sorted(set(int(t) for t in gts) - set(int(t) for t in probs))
    if skipped:
        raise ValueError(f"ground truth for frame(s) {skipped[:5]} but no prediction: every annotated frame must be "
                         "predicted")
    dropped = {int(t) for t in exclude}
    per_frame: list[dict] = []
    # only the scored frames' masks are kept (for the annotated pairs): memory stays bounded by the annotation, not
    # by the video's length
    scored_preds: dict[int, np.ndarray] = {}
    scored_gts: dict[int, np.ndarray] = {}
    counts = np.zeros(4, dtype=np.int64)
    previous: tuple[int, np.ndarray] | None = None
    for t in sorted(int(k) for k in probs):
        prob = np.asarray(probs[t])
        if prob.ndim != 2:
            raise ValueError(f"frame {t}: probability map must be 2-D [H,W], got shape {prob.shape}")
        f = _fov_at(fov, t)
        pred = binarize(prob, threshold)
        if f is not None:
            _check_shapes(pred, f, f"fov of frame {t}")
            pred &= f
        row = {"frame": t, "annotated": False, "area": int(np.count_nonzero(pred)),
               "change": mask_change(previous[1], pred) if previous and previous[0] == t - 1 else NAN,
               "dice": NAN, "j": NAN, "f": NAN, "cldice": NAN}
        previous = (t, pred)
        if t in gts and t not in dropped:
            gt = _fov_masked(_as_mask(gts[t], f"ground truth of frame {t}"), fov, t)
            _check_shapes(pred, gt, f"frame {t}")
            c = confusion(pred, gt, f)
            counts += c
            scored_preds[t], scored_gts[t] = pred, gt
            row.update(annotated=True, dice=metrics_from_counts(*c)["dice"], j=region_similarity(pred, gt),
                       f=boundary_f(pred, gt, bound_th=bound_th), cldice=cldice(pred, gt))
        per_frame.append(row)
    scored = [r for r in per_frame if r["annotated"]]
    pooled = metrics_from_counts(*(int(c) for c in counts))

    def mean(key: str) -> float:
        values = [r[key] for r in scored if math.isfinite(r[key])]
        return float(np.mean(values)) if values else NAN

    j, f_mean = mean("j"), mean("f")
    out = {
        "n_frames": len(per_frame), "n_annotated": len(scored),
        "n_empty_gt": sum(1 for t in scored_gts if not scored_gts[t].any()),
        "dice": mean("dice"), "j": j, "f": f_mean, "jf": (j + f_mean) / 2 if scored else NAN, "cldice": mean("cldice"),
        "pooled_dice": pooled["dice"], "precision": pooled["precision"], "recall": pooled["recall"],
        **_stability(*_annotated_changes(scored_preds, scored_gts),
                     [r["change"] for r in per_frame if math.isfinite(r["change"])]),
        "tp": int(counts[0]), "fp": int(counts[1]), "fn": int(counts[2]), "tn": int(counts[3]),
        "per_frame": per_frame,
    }
    return out


def pool_videos(rows: Sequence[Mapping], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                metrics: Sequence[str] = VIDEO_METRICS) -> dict[str, dict]:
    """{metric: {mean, lo, hi, n, n_nan}}: the mean over videos of each per-video value (one row per video, as
    ``video_scores`` returns) with a percentile-bootstrap CI that resamples videos, never frames (see the module
    docstring). Every video weighs alike, however many frames it has; NaN values (e.g. a video whose ground truth
    never changes has no change_ratio) are dropped and counted."""
    return aggregate(rows, metrics, n_boot=n_boot, alpha=alpha, seed=seed)


def pooled_counts(rows: Sequence[Mapping]) -> dict[str, float]:
    """Overlap metrics over all annotated pixels of all videos (the confusion counts each ``video_scores`` row
    carries, summed): a video with more annotated frames weighs more, unlike ``pool_videos``."""
    totals = [sum(int(r[k]) for r in rows) for k in ("tp", "fp", "fn", "tn")]
    return metrics_from_counts(*totals)
