"""Threshold calibration (medtune.calibration) and per-image statistics (medtune.stats)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import wilcoxon as scipy_wilcoxon
from sklearn.metrics import average_precision_score

from medtune.calibration import DEFAULT_THRESHOLDS, calibrate, pr_curve, threshold_sweep
from medtune.metrics import binarize, binary_metrics, pooled_metrics
from medtune.stats import aggregate, bootstrap_ci, compare_metric, paired_bootstrap, wilcoxon


def random_set(seed: int, n: int = 3, shape=(24, 28)):
    rng = np.random.default_rng(seed)
    gts = [(rng.random(shape) < 0.15).astype(np.uint8) for _ in range(n)]
    probs = [np.clip(g * 0.35 + rng.random(shape) * 0.65, 0, 1).astype(np.float32) for g in gts]
    fovs = [(rng.random(shape) < 0.85).astype(np.uint8) for _ in range(n)]
    return probs, gts, fovs


def brute_counts(probs, gts, fovs, t):
    tot = np.zeros(4, np.int64)
    for p, g, f in zip(probs, gts, fovs):
        pred, gt, fov = binarize(p, t), g.astype(bool), f.astype(bool)
        tot += [(pred & gt & fov).sum(), (pred & ~gt & fov).sum(), (~pred & gt & fov).sum(), (~pred & ~gt & fov).sum()]
    return tot


def test_sweep_counts_equal_thresholding_each_image():
    probs, gts, fovs = random_set(0)
    # thresholds that coincide with pixel values exercise the inclusive (>=) boundary
    thresholds = np.unique(np.concatenate([DEFAULT_THRESHOLDS, probs[0].ravel()[:20].astype(np.float64)]))
    sweep = threshold_sweep(probs, gts, fovs, thresholds)
    for j, t in enumerate(sweep["thresholds"]):
        expected = brute_counts(probs, gts, fovs, t)
        got = [sweep[k][j] for k in ("tp", "fp", "fn", "tn")]
        assert got == expected.tolist(), t
    j = int(np.argmin(np.abs(sweep["thresholds"] - 0.5)))
    pooled = pooled_metrics(probs, gts, fovs, threshold=float(sweep["thresholds"][j]))
    for k in ("dice", "precision", "recall"):
        assert sweep[k][j] == pytest.approx(pooled[k])


def separable_case():
    """Foreground probabilities in [0.31, 1], background in [0, 0.29]: on the default grid only 0.30 is perfect."""
    rng = np.random.default_rng(5)
    gts, probs = [], []
    for _ in range(2):
        g = (rng.random((30, 30)) < 0.2).astype(np.uint8)
        p = np.where(g, rng.uniform(0.31, 1.0, g.shape), rng.uniform(0.0, 0.29, g.shape))
        gts.append(g)
        probs.append(p)
    return probs, gts, [np.ones((30, 30), np.uint8)] * 2


def test_max_dice_finds_the_known_best_threshold():
    probs, gts, fovs = separable_case()
    cal = calibrate(probs, gts, fovs, strategy="max_dice")
    assert cal["threshold"] == pytest.approx(0.30) and cal["value"] == 1.0 and cal["met"]
    assert cal["strategy"] == "max_dice" and set(cal["curve"]) == {"thresholds", "dice", "precision", "recall"}
    assert isinstance(cal["curve"]["dice"], list) and len(cal["curve"]["thresholds"]) == 49
    # the Dice the threshold was chosen for is the Dice pooled_metrics reproduces at it
    probs2, gts2, fovs2 = random_set(2)
    cal2 = calibrate(probs2, gts2, fovs2, strategy="max_dice")
    assert pooled_metrics(probs2, gts2, fovs2, threshold=cal2["threshold"])["dice"] == pytest.approx(cal2["value"])
    assert cal2["value"] == pytest.approx(np.nanmax(cal2["curve"]["dice"]))


def test_max_fbeta_trades_precision_for_recall():
    # overlapping classes, so every threshold trades precision against recall
    rng = np.random.default_rng(3)
    gts = [(rng.random((40, 40)) < 0.15).astype(np.uint8) for _ in range(2)]
    probs = [np.clip(np.where(g, rng.normal(0.6, 0.15, g.shape), rng.normal(0.35, 0.15, g.shape)), 0, 1)
             for g in gts]
    fovs = [np.ones((40, 40), np.uint8)] * 2
    f1 = calibrate(probs, gts, fovs, strategy="max_fbeta", beta=1.0)
    dice = calibrate(probs, gts, fovs, strategy="max_dice")
    assert f1["threshold"] == dice["threshold"] and f1["value"] == pytest.approx(dice["value"])
    recall_heavy = calibrate(probs, gts, fovs, strategy="max_fbeta", beta=4.0)
    precision_heavy = calibrate(probs, gts, fovs, strategy="max_fbeta", beta=0.25)
    assert recall_heavy["threshold"] < f1["threshold"] < precision_heavy["threshold"]
    assert recall_heavy["recall"] > precision_heavy["recall"]


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95])
def test_target_recall_respects_the_floor_and_maximises_precision(target):
    probs, gts, fovs = random_set(4)
    cal = calibrate(probs, gts, fovs, strategy="target_recall", target_recall=target)
    assert cal["met"] and cal["recall"] >= target and cal["target_recall"] == target
    curve = cal["curve"]
    eligible = [p for p, r in zip(curve["precision"], curve["recall"]) if r >= target]
    assert cal["precision"] == max(eligible) == cal["value"]
    tp, fp, fn, _ = brute_counts(probs, gts, fovs, cal["threshold"])
    assert tp / (tp + fn) >= target


def test_target_recall_unreachable_falls_back_to_highest_recall():
    probs, gts, fovs = separable_case()
    # every foreground pixel below the lowest threshold: no threshold on the grid can recover them
    probs = [np.where(g, 0.01, p) for p, g in zip(probs, gts)]
    probs[0][gts[0].astype(bool)] = 0.5  # except these
    cal = calibrate(probs, gts, fovs, strategy="target_recall", target_recall=0.9)
    assert cal["met"] is False and "no threshold reaches" in cal["note"]
    assert cal["recall"] == pytest.approx(max(cal["curve"]["recall"]))


def test_calibration_without_foreground_keeps_half():
    probs, gts, fovs = random_set(1)
    gts = [np.zeros_like(g) for g in gts]
    for strategy in ("max_dice", "max_fbeta", "target_recall"):
        cal = calibrate(probs, gts, fovs, strategy=strategy)
        assert cal["threshold"] == 0.5 and math.isnan(cal["value"]) and not cal["met"] and cal["note"]
    with pytest.raises(ValueError, match="strategy"):
        calibrate(probs, gts, fovs, strategy="best")
    with pytest.raises(ValueError, match="empty"):
        calibrate([], [], [])


def test_pr_curve_average_precision_matches_sklearn_on_grid_values():
    rng = np.random.default_rng(6)
    grid = np.linspace(0.0, 1.0, 101)
    gts = [(rng.random((20, 20)) < 0.2).astype(np.uint8) for _ in range(2)]
    probs = [grid[np.clip((g * 30 + rng.integers(0, 71, g.shape)), 0, 100)] for g in gts]
    fovs = [np.ones((20, 20), np.uint8), (rng.random((20, 20)) < 0.9).astype(np.uint8)]
    pr = pr_curve(probs, gts, fovs, n_thresholds=101)
    f = [x.astype(bool) for x in fovs]
    y = np.concatenate([g[m] for g, m in zip(gts, f)])
    s = np.concatenate([p[m] for p, m in zip(probs, f)])
    assert pr["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert pr["n_pos"] == int(y.sum()) and pr["n_neg"] == int((1 - y).sum())
    assert pr["thresholds"][0] == 1.0 and pr["recall"][-1] == 1.0


# ------------------------------------------------------------------------------------------------------ stats
def test_bootstrap_ci_contains_mean_and_narrows_with_more_images():
    rng = np.random.default_rng(0)
    small = bootstrap_ci(rng.normal(0.8, 0.05, 10))
    large = bootstrap_ci(rng.normal(0.8, 0.05, 400))
    for ci in (small, large):
        assert ci["lo"] < ci["mean"] < ci["hi"]
    assert (large["hi"] - large["lo"]) < 0.5 * (small["hi"] - small["lo"])
    assert bootstrap_ci(rng.normal(0.8, 0.05, 10), seed=1) != bootstrap_ci(rng.normal(0.8, 0.05, 10), seed=2)


def test_bootstrap_ci_drops_and_counts_nans():
    ci = bootstrap_ci([0.5, float("nan"), 0.7, None, 0.6])
    assert ci["n"] == 3 and ci["n_nan"] == 2 and ci["mean"] == pytest.approx(0.6)
    one = bootstrap_ci([float("nan"), 0.4])
    assert one["lo"] == one["hi"] == one["mean"] == 0.4
    none = bootstrap_ci([float("nan")])
    assert none["n"] == 0 and math.isnan(none["mean"]) and math.isnan(none["lo"])


def test_paired_tests_identical_ish_vs_clear_shift():
    rng = np.random.default_rng(1)
    a = rng.uniform(0.6, 0.9, 20)
    jitter = a + rng.normal(0, 0.002, 20)
    same = compare_metric(a, jitter)
    assert not same["significant"] and same["verdict"] == "no significant difference"
    assert same["lo"] <= 0 <= same["hi"]
    b = a - 0.05 + rng.normal(0, 0.01, 20)
    shift = compare_metric(a, b)
    assert shift["significant"] and shift["verdict"] == "A better" and shift["mean_diff"] > 0.03
    assert compare_metric(b, a)["verdict"] == "B better"
    # for a distance, the run with the larger values is the worse one
    assert compare_metric(a, b, higher_is_better=False)["verdict"] == "B better"
    pb = paired_bootstrap(a, b)
    assert pb["p_value"] < 0.01 and pb["lo"] > 0 and pb["n"] == 20


def test_paired_handles_nans_ties_and_matches_scipy():
    a = np.array([0.7, 0.8, float("nan"), 0.6, 0.9, 0.75, 0.65])
    b = np.array([0.6, 0.85, 0.5, 0.55, 0.8, 0.7, float("nan")])
    w = wilcoxon(a, b)
    keep = ~np.isnan(a) & ~np.isnan(b)
    ref = scipy_wilcoxon(a[keep] - b[keep])
    assert w["n"] == 5 and w["p_value"] == pytest.approx(ref.pvalue) and w["statistic"] == ref.statistic
    assert wilcoxon(a, a) == {"statistic": 0.0, "p_value": 1.0, "n": 6}
    zero = paired_bootstrap(a, a)
    assert zero["mean_diff"] == 0.0 and zero["p_value"] == 1.0
    assert compare_metric(a, a)["verdict"] == "no significant difference"
    with pytest.raises(ValueError, match="same images"):
        compare_metric([1.0, 2.0], [1.0])


def test_aggregate_rows():
    rows = [{"dice": 0.8, "hd95": 2.0}, {"dice": 0.6, "hd95": float("nan")}, {"dice": "0.7"}]
    agg = aggregate(rows, ["dice", "hd95", "auc"], n_boot=200)
    assert agg["dice"]["mean"] == pytest.approx(0.7) and agg["dice"]["n"] == 3
    assert agg["hd95"]["n"] == 1 and agg["hd95"]["n_nan"] == 2
    assert agg["auc"]["n"] == 0 and math.isnan(agg["auc"]["mean"])
    assert set(agg["dice"]) == {"mean", "lo", "hi", "n", "n_nan"}


def test_binary_metrics_consistent_with_sweep_on_one_image():
    probs, gts, fovs = random_set(7, n=1)
    sweep = threshold_sweep(probs, gts, fovs, [0.4])
    m = binary_metrics(binarize(probs[0], 0.4), gts[0], fovs[0])
    assert sweep["dice"][0] == pytest.approx(m["dice"]) and sweep["recall"][0] == pytest.approx(m["recall"])
