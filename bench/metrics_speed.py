"""Per-image metric cost (not a test): ``medtune.metrics.image_metrics`` vs the same metrics computed by calling
MONAI, scikit-image and scikit-learn directly in the most straightforward way, on a DRIVE-sized (584x565)
vessel-like image, measured alternately in one run on one thread.

    .venv/bin/python bench/metrics_speed.py [--rounds 5] [--reps 3] [--seed 0]

Targets: ours < 0.5 s per image and ours / reference <= 1.2. The script also asserts that both give the same
numbers (within 1e-6), so a speed-up can never come from computing something else.
"""
from __future__ import annotations

import os

# one core, as in the target; set before numpy / torch load their thread pools
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402

H, W = 584, 565


def vessel_image(seed: int = 0, target_fraction: float = 0.12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prob float32, gt uint8, fov uint8): a branching tree of thin lines thickened to ~target_fraction of the FOV,
    and a probability map with blur, noise, missed thin branches and spurious specks, so the prediction differs
    from the truth in overlap, topology and boundary."""
    from skimage.draw import line
    from skimage.morphology import disk

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    cy, cx, radius = H / 2, W / 2, min(H, W) * 0.47
    fov = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2)

    centre = np.zeros((H, W), bool)
    thick = np.zeros((H, W), bool)
    # (y, x, angle, length, depth): trunks leave the optic disc and split as they go, like retinal vessels
    stack = [(cy + rng.normal(0, 20), cx - radius * 0.35, a, rng.uniform(60, 110), 0)
             for a in rng.uniform(0, 2 * np.pi, 8)]
    while stack:
        y, x, ang, length, depth = stack.pop()
        n_seg = 4
        for _ in range(n_seg):
            ang += rng.normal(0, 0.25)
            y1, x1 = y + np.sin(ang) * length / n_seg, x + np.cos(ang) * length / n_seg
            rr, cc = line(int(y), int(x), int(y1), int(x1))
            ok = (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
            (thick if depth < 1 else centre)[rr[ok], cc[ok]] = True
            y, x = y1, x1
        if depth < 5 and 0 <= y < H and 0 <= x < W:
            for side in (-1, 1):
                stack.append((y, x, ang + side * rng.uniform(0.3, 0.8), length * rng.uniform(0.65, 0.9), depth + 1))
    vessels = centre | ndimage.binary_dilation(thick, disk(2))
    # thicken until the foreground fraction inside the FOV reaches the target
    while (vessels & fov).sum() / fov.sum() < target_fraction:
        vessels = ndimage.binary_dilation(vessels)
    gt = vessels & fov

    soft = ndimage.gaussian_filter(gt.astype(np.float32), 1.2)
    missed = ndimage.binary_dilation(rng.random((H, W)) < 0.0004, disk(6)) & gt  # gaps break vessels apart
    specks = ndimage.binary_dilation(rng.random((H, W)) < 0.00005, disk(1))
    prob = 0.9 * soft - 0.6 * missed + 0.55 * specks + ndimage.gaussian_filter(rng.normal(0.0, 0.25, (H, W)), 0.7)
    prob = np.clip(prob, 0.0, 1.0).astype(np.float32)
    return prob, gt.astype(np.uint8), fov.astype(np.uint8)


def reference_metrics(prob: np.ndarray, gt: np.ndarray, fov: np.ndarray, threshold: float = 0.5) -> dict:
    """Straightforward per-metric library calls: each metric prepares its own inputs, nothing is shared."""
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance, compute_iou
    from skimage.measure import label
    from skimage.morphology import skeletonize
    from sklearn.metrics import confusion_matrix, roc_auc_score

    f = fov.astype(bool)
    p = (prob >= threshold) & f
    g = gt.astype(bool) & f
    tp_ = torch.from_numpy(p.astype(np.float32))[None, None]
    tg_ = torch.from_numpy(g.astype(np.float32))[None, None]
    out = {
        "dice": float(compute_dice(tp_, tg_, include_background=True, ignore_empty=True)),
        "iou": float(compute_iou(tp_, tg_, include_background=True, ignore_empty=True)),
    }
    tn, fp, fn, tp = confusion_matrix(g[f], p[f], labels=[False, True]).ravel()
    out["precision"] = tp / (tp + fp)
    out["recall"] = tp / (tp + fn)
    out["specificity"] = tn / (tn + fp)
    out["accuracy"] = (tp + tn) / (tp + tn + fp + fn)
    out["auc"] = roc_auc_score(g[f], prob[f])

    sp, sg = skeletonize(p), skeletonize(g)
    t_prec = (sp & g).sum() / sp.sum()
    t_sens = (sg & p).sum() / sg.sum()
    out["cldice"] = 2 * t_prec * t_sens / (t_prec + t_sens)

    def betti(m):
        b0 = label(m, connectivity=2).max()
        bg = label(~m, connectivity=1)
        border = set(np.unique(np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]]))) - {0}
        return b0, bg.max() - len(border)

    (p0, p1), (g0, g1) = betti(p), betti(g)
    out["betti0_error"] = abs(p0 - g0)
    out["betti1_error"] = abs(p1 - g1)
    out["hd95"] = float(compute_hausdorff_distance(tp_, tg_, include_background=True, percentile=95))
    out["assd"] = float(compute_average_surface_distance(tp_, tg_, include_background=True, symmetric=True))
    return {k: float(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="alternations of ours / reference")
    ap.add_argument("--reps", type=int, default=3, help="calls per side per round")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # MONAI's own deprecation noise

    from medtune.metrics import image_metrics

    prob, gt, fov = vessel_image(args.seed)
    frac = gt[fov > 0].mean()
    print(f"image {H}x{W}, FOV {fov.mean():.1%} of pixels, foreground {frac:.1%} of FOV, "
          f"predicted {(prob[fov > 0] >= 0.5).mean():.1%}")

    ours = image_metrics(prob, gt, fov, threshold=0.5)
    ref = reference_metrics(prob, gt, fov, threshold=0.5)
    assert ours.keys() == ref.keys(), (sorted(ours), sorted(ref))
    for k in ref:
        assert abs(ours[k] - ref[k]) <= 1e-6 * max(1.0, abs(ref[k])), f"{k}: ours {ours[k]} vs reference {ref[k]}"
    print("metrics (identical for both): " + ", ".join(f"{k} {v:.4f}" for k, v in ours.items()))

    times: dict[str, list[float]] = {"ours": [], "reference": []}
    fns = {"ours": lambda: image_metrics(prob, gt, fov, threshold=0.5),
           "reference": lambda: reference_metrics(prob, gt, fov, threshold=0.5)}
    for r in range(args.rounds):
        order = ("ours", "reference") if r % 2 == 0 else ("reference", "ours")  # cancel drift in machine load
        for name in order:
            t0 = time.perf_counter()
            for _ in range(args.reps):
                fns[name]()
            times[name].append((time.perf_counter() - t0) / args.reps)

    med = {k: statistics.median(v) for k, v in times.items()}
    for k in ("ours", "reference"):
        print(f"{k:<10} {med[k]:.4f} s/image  (median of {args.rounds} rounds; rounds: "
              + ", ".join(f"{t:.4f}" for t in times[k]) + ")")
    ratio = med["ours"] / med["reference"]
    print(f"ratio ours/reference {ratio:.3f}  (target <= 1.2)   ours < 0.5 s: {med['ours'] < 0.5}")


if __name__ == "__main__":
    main()
