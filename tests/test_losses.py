import math

import pytest
import torch
from monai.losses import SoftclDiceLoss

from medtune.config import LossCfg
from medtune.losses import ComboLoss

LOGITS = [[2.0, -1.0], [0.5, -3.0]]
TARGET = [[1.0, 0.0], [1.0, 0.0]]
SMOOTH = 1e-5


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32).view(1, 1, 2, 2)


def _hand_terms(logits, target, keep, gamma=2.0):
    """Plain-Python Dice / focal / BCE over the pixels where keep == 1 (Dice: the others count as 0)."""
    sig = [1 / (1 + math.exp(-x)) for x in logits]
    inter = sum(p * t * k for p, t, k in zip(sig, target, keep))
    sums = sum(p * k for p, k in zip(sig, keep)) + sum(t * k for t, k in zip(target, keep))
    dice = 1 - (2 * inter + SMOOTH) / (sums + SMOOTH)
    bce, focal = [], []
    for p, t, k in zip(sig, target, keep):
        if not k:
            continue
        pt = p if t == 1 else 1 - p
        bce.append(-math.log(pt))
        focal.append((1 - pt) ** gamma * -math.log(pt))
    return dice, sum(focal) / len(focal), sum(bce) / len(bce)


def test_matches_hand_computed_terms_and_weights():
    cfg = LossCfg(dice=1.0, focal=2.0, bce=0.5, cldice=0.0, focal_gamma=2.0)
    loss, parts = ComboLoss(cfg)(_t(LOGITS), _t(TARGET), None)
    flat_l, flat_t = sum(LOGITS, []), sum(TARGET, [])
    dice, focal, bce = _hand_terms(flat_l, flat_t, [1, 1, 1, 1])
    assert set(parts) == {"dice", "focal", "bce"}
    assert parts["dice"] == pytest.approx(dice, abs=1e-5)
    assert parts["focal"] == pytest.approx(focal, abs=1e-5)
    assert parts["bce"] == pytest.approx(bce, abs=1e-5)
    assert float(loss) == pytest.approx(dice + 2 * focal + 0.5 * bce, abs=1e-5)


def test_focal_gamma_is_used():
    cfg = LossCfg(dice=0.0, focal=1.0, bce=0.0, focal_gamma=0.5)
    _, parts = ComboLoss(cfg)(_t(LOGITS), _t(TARGET), None)
    _, focal, _ = _hand_terms(sum(LOGITS, []), sum(TARGET, []), [1, 1, 1, 1], gamma=0.5)
    assert parts["focal"] == pytest.approx(focal, abs=1e-5)


def test_fov_hand_computed():
    fov = [[1.0, 1.0], [0.0, 1.0]]
    loss, parts = ComboLoss(LossCfg())(_t(LOGITS), _t(TARGET), _t(fov))
    dice, focal, bce = _hand_terms(sum(LOGITS, []), sum(TARGET, []), sum(fov, []))
    assert parts["dice"] == pytest.approx(dice, abs=1e-5)
    assert parts["focal"] == pytest.approx(focal, abs=1e-5)
    assert parts["bce"] == pytest.approx(bce, abs=1e-5)
    assert float(loss) == pytest.approx(dice + focal + 0.5 * bce, abs=1e-5)


def _disc_fov(b, size):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 <= (0.4 * size) ** 2).float()
    return disc.expand(b, 1, size, size).clone()


def test_outside_fov_changes_nothing():
    torch.manual_seed(0)
    loss_fn = ComboLoss(LossCfg(cldice=0.5))
    logits = torch.randn(2, 1, 24, 24)
    target = (torch.rand(2, 1, 24, 24) > 0.8).float()
    fov = _disc_fov(2, 24)
    target = target * fov
    ref_loss, ref_parts = loss_fn(logits, target, fov)
    outside = fov == 0
    logits2 = torch.where(outside, torch.randn_like(logits) * 10, logits)
    target2 = torch.where(outside, torch.ones_like(target), target)  # even a label outside the FOV does not count
    loss2, parts2 = loss_fn(logits2, target2, fov)
    assert float(loss2) == pytest.approx(float(ref_loss), abs=1e-6)
    assert parts2 == pytest.approx(ref_parts, abs=1e-6)


def test_only_dice_is_one_minus_dice_and_skips_other_terms():
    torch.manual_seed(1)
    logits = torch.randn(3, 1, 8, 8)
    target = (torch.rand(3, 1, 8, 8) > 0.7).float()
    loss, parts = ComboLoss(LossCfg(dice=1.0, focal=0.0, bce=0.0, cldice=0.0))(logits, target, None)
    p = torch.sigmoid(logits)
    per_sample = 1 - (2 * (p * target).sum((1, 2, 3)) + SMOOTH) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + SMOOTH)
    assert list(parts) == ["dice"]
    assert float(loss) == pytest.approx(float(per_sample.mean()), abs=1e-6)


def test_all_zero_weights_rejected():
    with pytest.raises(ValueError, match="all loss weights"):
        ComboLoss(LossCfg(dice=0.0, focal=0.0, bce=0.0, cldice=0.0))


def test_gradient_finite_and_nonzero_with_every_term():
    torch.manual_seed(2)
    logits = torch.randn(2, 1, 16, 16, requires_grad=True)
    target = (torch.rand(2, 1, 16, 16) > 0.85).float()
    loss, parts = ComboLoss(LossCfg(cldice=1.0))(logits, target, _disc_fov(2, 16))
    loss.backward()
    assert set(parts) == {"dice", "focal", "bce", "cldice"}
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert (logits.grad[_disc_fov(2, 16) == 0] == 0).all()  # no gradient leaks outside the FOV


def test_cldice_term_matches_monai_and_rewards_a_correct_line():
    target = torch.zeros(1, 1, 16, 16)
    target[..., 7:9, 2:14] = 1
    good = (target * 2 - 1) * 8.0
    loss_fn = ComboLoss(LossCfg(dice=0.0, focal=0.0, bce=0.0, cldice=1.0, cldice_iters=3))
    _, parts_good = loss_fn(good, target, None)
    _, parts_bad = loss_fn(-good, target, None)
    assert list(parts_good) == ["cldice"]
    expected = SoftclDiceLoss(iter_=3)(torch.sigmoid(good), target)
    assert parts_good["cldice"] == pytest.approx(float(expected), abs=1e-6)
    assert parts_good["cldice"] < 0.05 < 0.5 < parts_bad["cldice"]


def test_mean_over_samples_equals_mean_of_half_batches():
    # Data-parallel equivalence: two ranks with half batches (losses averaged) == one rank with the whole batch.
    torch.manual_seed(3)
    logits = torch.randn(4, 1, 12, 12)
    target = (torch.rand(4, 1, 12, 12) > 0.8).float()
    fov = (torch.rand(4, 1, 12, 12) > torch.tensor([0.1, 0.5, 0.7, 0.2]).view(4, 1, 1, 1)).float()
    loss_fn = ComboLoss(LossCfg(cldice=0.3))
    whole, _ = loss_fn(logits, target, fov)
    halves = [loss_fn(logits[i:i + 2], target[i:i + 2], fov[i:i + 2])[0] for i in (0, 2)]
    assert float(whole) == pytest.approx(float(sum(halves) / 2), abs=1e-6)


def test_bf16_autocast_computes_in_float32():
    torch.manual_seed(4)
    logits = torch.randn(2, 1, 16, 16) * 4
    target = (torch.rand(2, 1, 16, 16) > 0.8).float()
    loss_fn = ComboLoss(LossCfg(cldice=0.5))
    ref, _ = loss_fn(logits.bfloat16().float(), target, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, parts = loss_fn(logits.bfloat16(), target.bfloat16(), None)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert float(low) == pytest.approx(float(ref), abs=1e-6)


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="target shape"):
        ComboLoss(LossCfg())(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5), None)
