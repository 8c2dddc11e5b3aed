"""medtune.metrics against the reference libraries (MONAI, scikit-learn, scikit-image) and hand-made shapes."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance, compute_iou
from scipy import ndimage
from skimage.measure import euler_number
from skimage.morphology import skeletonize
from sklearn.metrics import roc_auc_score

from medtune import metrics as M

TOL = 1e-6


def t4(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]


def monai_ref(p: np.ndarray, g: np.ndarray) -> dict[str, float]:
    """MONAI on the FOV-masked masks (masking both is how MONAI expresses 'outside the FOV counts nowhere')."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "dice": float(compute_dice(t4(p), t4(g), include_background=True, ignore_empty=True)),
            "iou": float(compute_iou(t4(p), t4(g), include_background=True, ignore_empty=True)),
            "hd95": float(compute_hausdorff_distance(t4(p), t4(g), include_background=True, percentile=95)),
            "assd": float(compute_average_surface_distance(t4(p), t4(g), include_background=True, symmetric=True)),
        }


def same(a: float, b: float, tol: float = TOL) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol * max(1.0, abs(b))


def blobs(rng, shape=(48, 52), density=0.04) -> np.ndarray:
    return ndimage.binary_dilation(rng.random(shape) < density)


def circle_fov(shape=(48, 52)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 <= (min(shape) * 0.45) ** 2).astype(np.uint8)


PIXEL_37 = np.arange(256).reshape(16, 16) == 37
PIXEL_200 = np.arange(256).reshape(16, 16) == 200
EDGE_CASES = {  # name -> (pred, gt) on a 16x16 grid
    "empty_gt": (np.pad(np.ones((3, 3)), ((2, 11), (2, 11))), np.zeros((16, 16))),
    "empty_pred": (np.zeros((16, 16)), np.pad(np.ones((3, 3)), ((2, 11), (2, 11)))),
    "both_empty": (np.zeros((16, 16)), np.zeros((16, 16))),
    "full": (np.ones((16, 16)), np.ones((16, 16))),
    "single_pixel_hit": (PIXEL_37, PIXEL_37),
    "single_pixel_miss": (PIXEL_37, PIXEL_200),
}


@pytest.mark.parametrize("seed", range(4))
def test_overlap_and_surface_match_monai_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    gt, fov = blobs(rng), circle_fov()
    pred = (gt & (rng.random(gt.shape) > 0.2)) | blobs(rng, density=0.01)
    p, g = pred & fov.astype(bool), gt & fov.astype(bool)
    ref = monai_ref(p, g)
    ours = M.binary_metrics(pred, gt, fov)
    assert same(ours["dice"], ref["dice"]) and same(ours["iou"], ref["iou"])
    assert same(M.hd95(pred, gt, fov), ref["hd95"])
    assert same(M.assd(pred, gt, fov), ref["assd"])
    # image_metrics shares one edge/distance pass between hd95 and assd: it must not change the numbers
    prob = np.where(pred, 0.8, 0.2) + rng.normal(0, 0.01, gt.shape)
    im = M.image_metrics(prob, gt, fov, threshold=0.5)
    for k in ("dice", "iou", "hd95", "assd"):
        assert same(im[k], ref[k]), k


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_edge_cases_match_monai_ignore_empty(case):
    pred, gt = (np.asarray(a).astype(bool) for a in EDGE_CASES[case])
    ref = monai_ref(pred, gt)
    ours = M.binary_metrics(pred, gt)
    assert same(ours["dice"], ref["dice"]) and same(ours["iou"], ref["iou"])
    if pred.any() and gt.any():
        assert same(M.hd95(pred, gt), ref["hd95"]) and same(M.assd(pred, gt), ref["assd"])
    else:  # MONAI gives inf / NaN here; a distance to nothing is undefined
        assert math.isnan(M.hd95(pred, gt)) and math.isnan(M.assd(pred, gt))


def test_empty_cases_are_nan_not_silent_zero_or_one():
    gt0 = np.zeros((8, 8), np.uint8)
    some = np.zeros((8, 8), np.uint8)
    some[2:4, 2:4] = 1
    m = M.binary_metrics(gt0, gt0)  # both empty: MONAI ignore_empty would give NaN, not 1
    assert all(math.isnan(m[k]) for k in ("dice", "iou", "recall", "precision"))
    assert m["specificity"] == 1.0 and m["accuracy"] == 1.0
    m = M.binary_metrics(gt0, some)  # nothing predicted: precision undefined, recall 0
    assert math.isnan(m["precision"]) and m["recall"] == 0.0 and m["dice"] == 0.0
    m = M.binary_metrics(some, gt0)
    assert math.isnan(m["dice"]) and m["precision"] == 0.0
    assert math.isnan(M.cldice(some, gt0)) and M.cldice(gt0, some) == 0.0
    full = np.ones((8, 8), np.uint8)
    assert math.isnan(M.binary_metrics(full, full)["specificity"])
    assert math.isnan(M.auc(np.random.default_rng(0).random((8, 8)), full))


def test_confusion_counts_and_derived_metrics():
    gt = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], np.uint8)
    pred = np.array([[1, 0, 1, 0], [1, 0, 0, 1]], np.uint8)
    fov = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.uint8)  # the fp at (1, 3) lies outside
    assert M.confusion(pred, gt, fov) == (2, 1, 1, 3)
    m = M.binary_metrics(pred, gt, fov)
    assert m["dice"] == pytest.approx(4 / 6) and m["iou"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(3 / 4) and m["accuracy"] == pytest.approx(5 / 7)


@pytest.mark.parametrize("seed", range(3))
def test_auc_matches_sklearn_with_ties_and_fov(seed):
    rng = np.random.default_rng(seed)
    gt, fov = blobs(rng), circle_fov()
    prob = np.clip(gt * 0.3 + rng.random(gt.shape) * 0.7, 0, 1)
    f = fov.astype(bool)
    assert same(M.auc(prob, gt, fov), roc_auc_score(gt[f], prob[f]))
    coarse = (prob * 8).round() / 8  # heavy ties: every tie must count one half
    assert same(M.auc(coarse, gt, fov), roc_auc_score(gt[f], coarse[f]))
    assert same(M.auc(coarse.astype(np.float32), gt), roc_auc_score(gt.ravel(), coarse.ravel()))
    assert math.isnan(M.auc(prob, np.zeros_like(gt)))


@pytest.mark.parametrize("seed", range(3))
def test_cldice_equals_its_definition(seed):
    rng = np.random.default_rng(seed)
    gt, fov = blobs(rng, density=0.06), circle_fov()
    pred = (gt & (rng.random(gt.shape) > 0.15)) | blobs(rng, density=0.01)
    f = fov.astype(bool)
    p, g = pred & f, gt & f
    sp, sg = skeletonize(p), skeletonize(g)
    t_prec = (sp & g).sum() / sp.sum()
    t_sens = (sg & p).sum() / sg.sum()
    expected = 2 * t_prec * t_sens / (t_prec + t_sens)
    assert same(M.cldice(pred, gt, fov), expected)
    assert same(M.image_metrics(pred.astype(float), gt, fov)["cldice"], expected)


def disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def test_betti_errors_on_hand_made_shapes():
    shape = (40, 40)
    one_blob = disc(shape, 20, 20, 6)
    two_blobs = disc(shape, 10, 10, 4) | disc(shape, 28, 28, 4)
    assert M.betti_errors(two_blobs, one_blob) == (1, 0)
    full_disc = disc(shape, 20, 20, 12)
    ring = full_disc & ~disc(shape, 20, 20, 6)
    assert M.betti_numbers(ring) == (1, 1)
    assert M.betti_errors(ring, full_disc) == (0, 1)
    # background that touches the border is not a hole, however enclosed it looks
    cup = np.zeros(shape, bool)
    cup[5:30, 5:30] = True
    cup[0:25, 12:22] = False
    assert M.betti_numbers(cup) == (1, 0)
    # diagonal neighbours are one 8-connected component; the 4-connected hole inside a diamond still counts
    diamond = np.zeros((7, 7), bool)
    for y, x in [(1, 3), (2, 2), (3, 1), (4, 2), (5, 3), (4, 4), (3, 5), (2, 4)]:
        diamond[y, x] = True
    assert M.betti_numbers(diamond) == (1, 1)


@pytest.mark.parametrize("seed", range(5))
def test_betti_numbers_consistent_with_euler_number(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((30, 33)) < (0.3 + 0.1 * seed)
    b0, b1 = M.betti_numbers(mask)
    assert b0 - b1 == euler_number(mask, connectivity=2)


def test_prediction_outside_fov_changes_nothing():
    rng = np.random.default_rng(3)
    gt, fov = blobs(rng), circle_fov()
    prob = np.clip(gt * 0.6 + rng.random(gt.shape) * 0.4, 0, 1)
    gt_outside = gt.copy()
    gt_outside[~fov.astype(bool)] = rng.random((~fov.astype(bool)).sum()) > 0.5
    noisy = prob.copy()
    noisy[~fov.astype(bool)] = 1.0  # a bright border that would wreck every metric if it counted
    base = M.image_metrics(prob, gt, fov)
    for p, g in ((noisy, gt), (prob, gt_outside), (noisy, gt_outside)):
        other = M.image_metrics(p, g, fov)
        assert all(same(base[k], other[k]) for k in base), (base, other)
    assert M.image_metrics(noisy, gt, None)["dice"] < base["dice"] - 0.05  # and it really would


def test_image_metrics_keys_switches_and_spacing():
    rng = np.random.default_rng(0)
    gt = blobs(rng)
    prob = np.clip(gt * 0.7 + rng.random(gt.shape) * 0.35, 0, 1)
    full = M.image_metrics(prob, gt, None)
    assert list(full) == ["dice", "iou", "precision", "recall", "specificity", "accuracy", "auc", "cldice",
                          "betti0_error", "betti1_error", "hd95", "assd"]
    lean = M.image_metrics(prob, gt, None, topology=False, surface=False)
    assert list(lean) == list(full)[:7] and all(same(lean[k], full[k]) for k in lean)
    scaled = M.image_metrics(prob, gt, None, spacing=2.0)
    assert same(scaled["hd95"], 2 * full["hd95"]) and same(scaled["assd"], 2 * full["assd"])
    assert same(M.hd95(prob >= 0.5, gt, spacing=(2.0, 2.0)), scaled["hd95"])


def test_threshold_rule_is_inclusive_and_float64():
    prob = np.array([[0.3, 0.5, np.nextafter(np.float32(0.3), np.float32(0))]], np.float32)
    gt = np.array([[1, 1, 0]], np.uint8)
    # float32(0.3) > 0.3 in float64 -> foreground; the next float32 below it is < 0.3 -> background
    assert M.binarize(prob, 0.3).tolist() == [[True, True, False]]
    assert M.binarize(prob, 0.5).tolist() == [[False, True, False]]
    assert M.image_metrics(prob, gt, None, threshold=0.5, topology=False, surface=False)["recall"] == 0.5


def test_pooled_differs_from_per_image_mean_as_expected():
    big_gt = np.zeros((40, 40), np.uint8)
    big_gt[5:35, 5:35] = 1
    big_prob = big_gt * 0.9 + 0.05  # perfect on 900 pixels
    small_gt = np.zeros((40, 40), np.uint8)
    small_gt[10:12, 10:12] = 1
    small_prob = np.full((40, 40), 0.1)
    small_prob[20:22, 20:22] = 0.9  # 4 pixels, all wrong
    fovs = [np.ones((40, 40), np.uint8)] * 2
    pooled = M.pooled_metrics([big_prob, small_prob], [big_gt, small_gt], fovs, threshold=0.5)
    per_image = [M.binary_metrics(p >= 0.5, g)["dice"] for p, g in ((big_prob, big_gt), (small_prob, small_gt))]
    assert per_image == [1.0, 0.0]
    assert pooled["dice"] == pytest.approx(2 * 900 / (2 * 900 + 4 + 4))  # weighted by vessel pixels
    assert np.mean(per_image) == 0.5
    scores = np.concatenate([big_prob.ravel(), small_prob.ravel()])
    labels = np.concatenate([big_gt.ravel(), small_gt.ravel()])
    assert same(pooled["auc"], roc_auc_score(labels, scores.astype(np.float32)))
    fov = circle_fov((40, 40))
    pooled_fov = M.pooled_metrics([big_prob], [big_gt], [fov], threshold=0.5)
    assert pooled_fov["accuracy"] == pytest.approx(M.binary_metrics(big_prob >= 0.5, big_gt, fov)["accuracy"])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        M.binary_metrics(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="fov"):
        M.image_metrics(np.zeros((4, 4)), np.zeros((4, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="differ in length"):
        M.pooled_metrics([np.zeros((4, 4))], [], [])
