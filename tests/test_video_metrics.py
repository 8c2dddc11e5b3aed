"""Video metrics on arrays small enough to score by hand: J, boundary F, mask change / temporal stability, the
per-video scores, and CIs that resample videos (not frames)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from medtune.stats import bootstrap_ci
from medtune.video_metrics import (
    boundary_f,
    boundary_pixels,
    boundary_precision_recall,
    boundary_tolerance,
    mask_change,
    pool_videos,
    pooled_counts,
    region_similarity,
    temporal_stability,
    video_scores,
)


def square(top: int, left: int, side: int = 3, shape=(10, 10)) -> np.ndarray:
    m = np.zeros(shape, dtype=np.uint8)
    m[top:top + side, left:left + side] = 1
    return m


# ------------------------------------------------------------------------------------------------------- J
def test_region_similarity_by_hand():
    gt = np.zeros((4, 4), np.uint8)
    gt[0, :3] = gt[1, :3] = 1  # 6 pixels
    pred = np.zeros((4, 4), np.uint8)
    pred[1, :3] = 1  # 3 of them ...
    pred[3, 3] = 1  # ... and one false alarm: J = 3 / (6 + 4 - 3)
    assert region_similarity(pred, gt) == pytest.approx(3 / 7)


def test_region_similarity_empty_frames_follow_davis():
    empty = np.zeros((5, 5), np.uint8)
    assert region_similarity(empty, empty) == 1.0  # object absent, nothing predicted: right
    assert region_similarity(square(1, 1, shape=(5, 5)), empty) == 0.0
    assert region_similarity(empty, square(1, 1, shape=(5, 5))) == 0.0


def test_region_similarity_ignores_pixels_outside_the_fov():
    gt = square(1, 1)
    pred = gt.copy()
    pred[8, 8] = 1  # a false alarm outside the FOV costs nothing
    fov = np.ones_like(gt)
    fov[7:, 7:] = 0
    assert region_similarity(pred, gt) < 1.0
    assert region_similarity(pred, gt, fov) == 1.0


# ------------------------------------------------------------------------------------------------------- F
def test_boundary_of_a_square_is_the_davis_ring():
    b = boundary_pixels(square(1, 1))  # rows / cols 1-3
    ring = np.zeros((10, 10), bool)
    ring[0:4, 0:4] = True  # the contour runs between pixel centres: the row / column above / left is on it too
    ring[1:3, 1:3] = False  # windows wholly inside the square
    assert (b == ring).all() and b.sum() == 12
    full = np.ones((4, 4), np.uint8)
    assert boundary_pixels(full).sum() == 0  # the image's edge is no contour
    corner = np.zeros((4, 4), np.uint8)
    corner[2:, 2:] = 1  # touching the bottom-right edge: the contour is its top and left side only
    assert np.argwhere(boundary_pixels(corner)).tolist() == [[1, 1], [1, 2], [1, 3], [2, 1], [3, 1]]


def test_boundary_map_is_the_davis_rule_pixel_by_pixel():
    """DAVIS' rule written as a loop: a pixel is on the contour when its right, lower or lower-right neighbour is of
    the other class; on the last row only the right neighbour counts, on the last column only the lower one."""
    from scipy import ndimage

    rng = np.random.default_rng(7)
    m = ndimage.binary_opening(rng.random((17, 13)) > 0.4)
    h, w = m.shape
    expected = np.zeros_like(m)
    for y in range(h):
        for x in range(w):
            others = []
            if x + 1 < w and y + 1 < h:
                others = [m[y, x + 1], m[y + 1, x], m[y + 1, x + 1]]
            elif x + 1 < w:
                others = [m[y, x + 1]]
            elif y + 1 < h:
                others = [m[y + 1, x]]
            expected[y, x] = any(o != m[y, x] for o in others)
    assert (boundary_pixels(m) == expected).all()


def test_boundary_tolerance_follows_the_diagonal_rule():
    assert boundary_tolerance((10, 10), 0.008) == 1  # ceil(0.113)
    assert boundary_tolerance((480, 854), 0.008) == 8  # DAVIS 480p: ceil(7.84)
    assert boundary_tolerance((10, 10), 3) == 3  # >= 1: pixels


def test_boundary_f_by_hand_for_shifted_squares():
    gt = square(1, 1)
    # rings of 12 (4x4 less 2x2). Shifted one column, tolerance 0: they share 3 pixels of the top row and 3 of the
    # bottom row, none of the sides: 6 of 12 each way
    assert boundary_precision_recall(square(1, 2), gt, bound_th=0.0) == pytest.approx((0.5, 0.5, 0.5))
    # ... and with the default tolerance (1 px on a 10x10 image) every ring pixel is within 1 of the other ring
    assert boundary_f(square(1, 2), gt) == pytest.approx(1.0)
    # shifted two columns: per top / bottom row 3 of 4 within 1 px, per side row 1 of 2: 8 of 12 each way
    f, p, r = boundary_precision_recall(square(1, 3), gt, bound_th=1)
    assert (p, r, f) == pytest.approx((2 / 3, 2 / 3, 2 / 3))


def test_boundary_f_empty_cases_follow_davis():
    empty = np.zeros((10, 10), np.uint8)
    assert boundary_precision_recall(empty, empty) == (1.0, 1.0, 1.0)
    assert boundary_precision_recall(empty, square(1, 1)) == (0.0, 1.0, 0.0)  # nothing predicted: precision 1
    assert boundary_precision_recall(square(1, 1), empty) == (0.0, 0.0, 1.0)


def test_boundary_f_equals_brute_force_matching():
    """The distance-transform matching equals checking every boundary pixel against every other (random blobs)."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    for _ in range(5):
        pred = ndimage.binary_opening(rng.random((24, 30)) > 0.45)
        gt = ndimage.binary_opening(rng.random((24, 30)) > 0.45)
        tol = 2
        bp, bg = np.argwhere(boundary_pixels(pred)), np.argwhere(boundary_pixels(gt))
        d = np.sqrt(((bp[:, None, :] - bg[None, :, :]) ** 2).sum(-1))
        precision, recall = float((d.min(1) <= tol).mean()), float((d.min(0) <= tol).mean())
        f, p, r = boundary_precision_recall(pred, gt, bound_th=tol)
        assert (p, r) == pytest.approx((precision, recall))
        assert f == pytest.approx(2 * precision * recall / (precision + recall))


# ------------------------------------------------------------------------------------------ temporal stability
def test_mask_change_by_hand():
    a = np.zeros((2, 4), bool)
    b = np.zeros((2, 4), bool)
    a[0] = True  # 4 px
    b[:, :2] = True  # 4 px, 2 shared -> |a xor b| = 4 of |a| + |b| = 8
    assert mask_change(a, b) == 0.5
    assert mask_change(a, a) == 0.0
    assert mask_change(a, ~a) == 1.0
    assert mask_change(np.zeros_like(a), np.zeros_like(a)) == 0.0


def test_temporal_stability_by_hand():
    z = np.zeros((2, 4), bool)
    left, right, top = z.copy(), z.copy(), z.copy()
    left[:, :2] = True
    right[:, 2:] = True
    top[0] = True
    # annotated frames 0, 2, 4: the anatomy moves left -> left -> top (changes 0, 0.5)
    gts = {0: left, 2: left, 4: top}
    # the prediction flips between left and right every frame, and ends on top
    preds = {0: left, 1: right, 2: left, 3: right, 4: top}
    s = temporal_stability(preds, gts)
    # pairs (0, 2): pred 0, gt 0; (2, 4): pred change(left, top) = 0.5, gt 0.5
    assert s["n_pairs"] == 2
    assert (s["pred_change"], s["gt_change"], s["change_ratio"]) == pytest.approx((0.25, 0.25, 1.0))
    assert s["change_excess"] == pytest.approx(0.0) and s["change_error"] == pytest.approx(0.0)
    # the flicker between annotated frames is what the annotated pairs cannot see: 1, 1, 1, 0.5 over 4 pairs
    assert s["n_flicker_pairs"] == 4 and s["flicker"] == pytest.approx(3.5 / 4)

    # a prediction stuck on the first frame lags: it never changes while the anatomy does
    stuck = temporal_stability({t: left for t in range(5)}, gts)
    assert (stuck["pred_change"], stuck["change_ratio"], stuck["change_excess"]) == pytest.approx((0.0, 0.0, -0.25))
    assert stuck["change_error"] == pytest.approx(0.25) and stuck["flicker"] == 0.0

    # a static ground truth has no ratio, but excess and error are defined
    s = temporal_stability({0: left, 1: right}, {0: left, 1: left})
    assert math.isnan(s["change_ratio"]) and s["change_excess"] == 1.0 and s["change_error"] == 1.0


def test_temporal_stability_without_pairs_is_nan_not_zero():
    z = np.zeros((3, 3), bool)
    s = temporal_stability({0: z, 5: z}, {0: z})
    assert s["n_pairs"] == 0 and math.isnan(s["pred_change"]) and math.isnan(s["change_error"])
    assert s["n_flicker_pairs"] == 0 and math.isnan(s["flicker"])  # 0 and 5 are not consecutive


# ------------------------------------------------------------------------------------------------ per video
def _video():
    gt = square(2, 2, side=4)  # 16 px
    half = np.zeros((10, 10), np.float32)
    half[2:4, 2:6] = 0.9  # upper half of the square: Dice 2*8/(8+16) = 2/3
    full = gt.astype(np.float32) * 0.8
    probs = {0: full, 1: half, 2: half, 3: full}
    gts = {0: gt, 2: gt}
    return probs, gts, gt


def test_video_scores_by_hand():
    probs, gts, gt = _video()
    s = video_scores(probs, gts, threshold=0.5)
    assert (s["n_frames"], s["n_annotated"], s["n_empty_gt"]) == (4, 2, 0)
    frames = s["per_frame"]
    assert [r["annotated"] for r in frames] == [True, False, True, False]
    assert [r["area"] for r in frames] == [16, 8, 8, 16]
    assert frames[0]["dice"] == 1.0 and frames[2]["dice"] == pytest.approx(2 / 3)
    assert math.isnan(frames[1]["dice"]) and math.isnan(frames[1]["j"])  # no ground truth: no score
    assert s["dice"] == pytest.approx((1 + 2 / 3) / 2)
    assert s["j"] == pytest.approx((1 + 0.5) / 2)  # J of the half mask: 8 / 16
    assert s["jf"] == pytest.approx((s["j"] + s["f"]) / 2)
    # pooled over the video's annotated pixels: tp 24, fp 0, fn 8
    assert (s["tp"], s["fp"], s["fn"]) == (24, 0, 8)
    assert s["pooled_dice"] == pytest.approx(48 / 56)
    # change from the previous frame: full -> half = 8/24, half -> half = 0, half -> full = 8/24
    assert math.isnan(frames[0]["change"])
    assert [r["change"] for r in frames[1:]] == pytest.approx([1 / 3, 0.0, 1 / 3])
    assert s["flicker"] == pytest.approx(2 / 9)
    # the annotated pair (0, 2): prediction changed by 1/3, ground truth not at all
    assert (s["pred_change"], s["gt_change"], s["change_error"]) == pytest.approx((1 / 3, 0.0, 1 / 3))
    # the threshold matters: at 0.85 frame 0 predicts nothing
    assert video_scores(probs, gts, threshold=0.85)["per_frame"][0]["dice"] == 0.0


def test_video_scores_excluded_prompt_frame_and_missing_prediction():
    probs, gts, gt = _video()
    s = video_scores(probs, gts, exclude=[0])  # frame 0 prompted the model with its mask
    assert s["n_annotated"] == 1 and s["dice"] == pytest.approx(2 / 3) and s["n_pairs"] == 0
    assert s["n_frames"] == 4 and s["flicker"] == pytest.approx(2 / 9)  # still counts for flicker
    with pytest.raises(ValueError, match=r"frame\(s\) \[7\]"):
        video_scores(probs, {**gts, 7: gt})


def test_video_scores_fov_and_empty_ground_truth():
    probs, gts, gt = _video()
    empty = np.zeros_like(gt)
    s = video_scores({0: probs[0], 1: probs[0]}, {0: gt, 1: empty})
    assert s["n_empty_gt"] == 1
    assert math.isnan(s["per_frame"][1]["dice"])  # Dice undefined without foreground ...
    assert s["per_frame"][1]["j"] == 0.0  # ... J (DAVIS) scores the false alarm
    fov = np.zeros_like(gt)  # nothing inside the FOV: everything empty, J 1 by the DAVIS rule
    s = video_scores({0: probs[0]}, {0: gt}, fov=fov)
    assert s["per_frame"][0]["area"] == 0 and s["j"] == 1.0
    s = video_scores({0: probs[0], 1: probs[1]}, {0: gt, 1: gt}, fov={0: fov})  # a FOV per frame; frame 1 has none
    assert s["per_frame"][0]["area"] == 0 and s["per_frame"][1]["area"] == 8 and s["per_frame"][1]["dice"] > 0
    # boundary F takes the FOV too: outside it a wrong contour costs nothing
    half = np.ones_like(gt)
    half[:, 5:] = 0
    assert boundary_f(square(2, 2), square(2, 6)) < 1.0
    assert boundary_f(square(2, 2), square(2, 2) | square(2, 7), fov=half) == 1.0


# ------------------------------------------------------------------------------------------------ pooling
def test_ci_resamples_videos_not_frames():
    """Four videos, 30 frames each: the frames of one video agree closely, the videos do not. A bootstrap over
    the 120 frames would be far narrower than the honest one over the 4 videos, which pool_videos gives."""
    rng = np.random.default_rng(0)
    gt = square(2, 2, side=6, shape=(16, 16))  # 36 px
    rows, frame_dice = [], []
    for k, keep_rows in enumerate([1, 2, 4, 5]):  # the model finds the top `keep_rows` rows of the square
        probs, gts = {}, {}
        for t in range(30):
            prob = np.zeros((16, 16), np.float32)
            extra = int(rng.integers(0, 2))  # one row more on some frames: small within-video spread
            prob[2:2 + keep_rows + extra, 2:8] = 0.9
            probs[t], gts[t] = prob, gt
        s = video_scores(probs, gts)
        rows.append(s)
        frame_dice += [r["dice"] for r in s["per_frame"]]
    pooled = pool_videos(rows, n_boot=2000, seed=0)
    assert pooled["dice"]["n"] == 4  # one value per video
    by_video = bootstrap_ci([r["dice"] for r in rows], n_boot=2000, seed=0)
    assert (pooled["dice"]["lo"], pooled["dice"]["hi"]) == (by_video["lo"], by_video["hi"])
    by_frame = bootstrap_ci(frame_dice, n_boot=2000, seed=0)
    assert pooled["dice"]["mean"] == pytest.approx(by_frame["mean"])  # equal frame counts: same mean ...
    assert (by_frame["hi"] - by_frame["lo"]) * 3 < pooled["dice"]["hi"] - pooled["dice"]["lo"]  # ... honest width


def test_pool_videos_drops_nan_and_pooled_counts_sum():
    rows = [{"dice": 0.5, "change_ratio": float("nan"), "tp": 1, "fp": 1, "fn": 0, "tn": 2},
            {"dice": 0.7, "change_ratio": 1.2, "tp": 3, "fp": 0, "fn": 2, "tn": 1}]
    pooled = pool_videos(rows, n_boot=100)
    assert pooled["dice"]["mean"] == pytest.approx(0.6)
    assert pooled["change_ratio"]["n"] == 1 and pooled["change_ratio"]["n_nan"] == 1
    assert pooled_counts(rows)["dice"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
