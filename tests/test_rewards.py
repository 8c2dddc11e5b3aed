import sys
import types

import pytest
import torch
import torch.nn.functional as F

import medtune.rewards as R


def _mask(rows):
    return torch.tensor(rows, dtype=torch.float32).view(1, 1, len(rows), len(rows[0]))


GT = _mask([[1, 1, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 0, 0]])
PRED = _mask([[1, 0, 0, 0],
              [1, 1, 1, 0],
              [0, 0, 1, 0]])  # tp=3, |pred|=5, |gt|=4


def test_overlap_rewards_hand_computed():
    assert R.dice(PRED, GT).tolist() == pytest.approx([2 * 3 / 9])
    assert R.recall(PRED, GT).tolist() == pytest.approx([3 / 4])
    assert R.precision(PRED, GT).tolist() == pytest.approx([3 / 5])
    assert R.area_ratio(PRED, GT).tolist() == pytest.approx([1 - abs(5 / 4 - 1)])
    assert R.area_ratio(torch.ones_like(GT), GT).tolist() == pytest.approx([0.0])  # 12/4 area: clipped at 0


def test_fov_excludes_outside_pixels():
    fov = _mask([[1, 1, 1, 1],
                 [1, 1, 0, 0],
                 [1, 1, 0, 0]])  # drops the two false positives
    assert R.precision(PRED, GT, fov).tolist() == pytest.approx([1.0])
    assert R.dice(PRED, GT, fov).tolist() == pytest.approx([2 * 3 / 7])


def _line(length, start=4, size=32, row=10, width=1):
    m = torch.zeros(1, 1, size, size)
    m[..., row:row + width, start:start + length] = 1
    return m


def test_length_on_straight_lines():
    gt = _line(20)
    pred = torch.cat([_line(20), _line(14), _line(25), torch.zeros(1, 1, 32, 32)])
    assert R.skeleton(gt).sum() == 20  # a 1-px line is its own skeleton
    assert R.length(pred, gt).tolist() == pytest.approx([1.0, 1 - 6 / 20, 1 - 5 / 20, 0.0])
    # a 3-px wide bar of length 22 has a centre line of 20 px: length rewards the tree length, not the calibre
    assert R.length(_line(22, start=3, row=9, width=3), gt).tolist() == pytest.approx([1.0])


def test_topology_is_cldice_on_binary_masks():
    gt = _line(20)
    broken = gt.clone()
    broken[..., 10, 12:16] = 0  # a 4-px gap: S_pred (16 px) lies on gt, 16 of 20 gt skeleton px covered
    assert R.topology(gt, gt).tolist() == pytest.approx([1.0])
    assert R.topology(broken, gt).tolist() == pytest.approx([2 * 0.8 / 1.8])
    # painting everything must not look topologically perfect (the skeleton of a filled square is not empty)
    assert float(R.topology(torch.ones(1, 1, 32, 32), gt)) < 0.3


def test_precision_floor_is_a_penalty():
    assert R.precision_floor(PRED, GT).tolist() == pytest.approx([0.0])  # precision 0.6 >= 0.5
    assert R.precision_floor(PRED, GT, p0=0.8, k=2.0).tolist() == pytest.approx([-2.0 * 0.2])
    assert float(R.precision_floor(torch.ones_like(GT), GT, p0=0.5, k=1.0)) == pytest.approx(-(0.5 - 4 / 12))


def test_empty_ground_truth_conventions():
    empty = torch.zeros_like(GT)
    both = {name: float(fn(empty, empty)) for name, fn in R.BUILTIN_REWARDS.items()}
    assert both == {"dice": 1.0, "recall": 1.0, "precision": 1.0, "topology": 1.0, "length": 1.0, "area_ratio": 1.0,
                    "precision_floor": 0.0}
    over = {name: float(fn(PRED, empty)) for name, fn in R.BUILTIN_REWARDS.items() if name != "precision_floor"}
    assert over == {"dice": 0.0, "recall": 1.0, "precision": 0.0, "topology": 0.0, "length": 0.0, "area_ratio": 0.0}
    missed = {name: float(fn(empty, GT)) for name, fn in R.BUILTIN_REWARDS.items() if name != "precision_floor"}
    assert missed == {"dice": 0.0, "recall": 0.0, "precision": 0.0, "topology": 0.0, "length": 0.0,
                      "area_ratio": 0.0}


def _random_group(g=4, size=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gt = torch.zeros(1, 1, size, size)
    gt[..., 5:8, 2:22] = 1
    gt[..., 5:20, 12:14] = 1
    flips = (torch.rand(g, 1, size, size, generator=gen) < torch.linspace(0.0, 0.2, g).view(g, 1, 1, 1)).float()
    pred = (gt + flips) % 2
    fov = torch.ones(1, 1, size, size)
    fov[..., :, 20:] = 0
    return pred, gt, fov


@pytest.mark.parametrize("name", sorted(R.BUILTIN_REWARDS))
def test_vectorised_over_group_equals_per_sample(name):
    pred, gt, fov = _random_group()
    fn = R.BUILTIN_REWARDS[name]
    group = fn(pred, gt, fov)
    single = torch.cat([fn(pred[i:i + 1], gt, fov) for i in range(4)])
    repeated_gt = fn(pred, gt.expand(4, -1, -1, -1), fov.expand(4, -1, -1, -1))
    assert group.shape == (4,)
    assert torch.allclose(group, single) and torch.allclose(group, repeated_gt)
    if name != "precision_floor":
        assert ((group >= 0) & (group <= 1)).all()


def test_presets_and_resolve_weights():
    assert sum(R.PRESETS["multi_objective"].values()) == pytest.approx(1.0)
    assert R.resolve_weights("dice") == {"dice": 1.0}
    w = R.resolve_weights("recall_focused")
    assert w == {"recall": 0.6, "dice": 0.3, "precision_floor": 1.0}
    w["recall"] = 5.0
    assert R.PRESETS["recall_focused"]["recall"] == 0.6  # callers get a copy
    assert R.resolve_weights({"dice": 1, "topology": 0.5}) == {"dice": 1.0, "topology": 0.5}
    assert R.resolve_weights("area_ratio") == {"area_ratio": 1.0}
    for spec in R.PRESETS.values():
        assert set(spec) <= set(R.REWARDS)


def test_unknown_preset_and_component_list_valid_ones():
    with pytest.raises(ValueError, match="multi_objective, dice, recall_focused"):
        R.resolve_weights("multi_objectiv")
    with pytest.raises(ValueError, match="'dcie'.*valid components: dice, recall"):
        R.resolve_weights({"dcie": 1.0})
    with pytest.raises(ValueError, match="finite number"):
        R.resolve_weights({"dice": float("nan")})


def test_combined_reward_is_the_weighted_sum():
    pred, gt, fov = _random_group()
    weights = {"dice": 0.5, "recall": 0.2, "topology": 0.2, "length": 0.1, "precision_floor": 2.0}
    total, comps = R.combined_reward(pred, gt, fov, weights, precision_floor=0.9, precision_floor_k=3.0)
    assert set(comps) == set(weights)
    assert torch.allclose(comps["precision_floor"], R.precision_floor(pred, gt, fov, p0=0.9, k=3.0))
    for name in ("dice", "recall", "topology", "length"):
        assert torch.allclose(comps[name], R.BUILTIN_REWARDS[name](pred, gt, fov))
    assert torch.allclose(total, sum(w * comps[k] for k, w in weights.items()))


def test_recall_focused_prefers_recall_but_not_over_prediction():
    gt = torch.zeros(1, 1, 40, 40)
    gt[..., 10:14, 4:36] = 1  # 128 px
    extra = torch.zeros_like(gt)
    extra[..., 14:16, 4:36] = 1  # 64 false positives next to the vessel
    missed = gt.clone()
    missed[..., 10:14, 4:12] = 0  # 32 px missed
    candidates = torch.cat([gt, (gt + extra).clamp(max=1), missed, torch.ones_like(gt)])
    total, comps = R.combined_reward(candidates, gt, None, R.resolve_weights("recall_focused"))
    exact, over, under, everything = total.tolist()
    assert exact > over > under > everything  # recall-heavy beats precise-but-incomplete; painting all is worst
    assert comps["precision_floor"][3] < 0 and comps["precision_floor"][:3].eq(0).all()


def test_custom_reward_by_import_path(monkeypatch):
    module = types.ModuleType("medtune_test_custom_reward")

    def foreground_fraction(pred, gt, fov=None):
        return pred.float().mean(dim=(1, 2, 3))

    module.foreground_fraction = foreground_fraction
    module.not_callable = 3
    monkeypatch.setitem(sys.modules, "medtune_test_custom_reward", module)
    monkeypatch.setattr(R, "REWARDS", dict(R.REWARDS))

    fn = R.load_reward("medtune_test_custom_reward:foreground_fraction")
    assert fn is foreground_fraction
    R.register_reward("fg", fn)
    R.register_reward("fg", fn)  # a repeated run registers it again
    pred, gt, fov = _random_group()
    total, comps = R.combined_reward(pred, gt, fov, R.resolve_weights({"fg": 2.0, "dice": 1.0}))
    assert torch.allclose(comps["fg"], pred.mean(dim=(1, 2, 3)))
    assert torch.allclose(total, 2 * comps["fg"] + comps["dice"])

    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        R.load_reward("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        R.load_reward("medtune_test_custom_reward:missing")
    with pytest.raises(ValueError, match="not a function"):
        R.load_reward("medtune_test_custom_reward:not_callable")
    with pytest.raises(ValueError, match="package.module:function"):
        R.load_reward("medtune_test_custom_reward.foreground_fraction")
    with pytest.raises(ValueError, match="built-in"):
        R.register_reward("dice", fn)


def test_custom_reward_with_wrong_shape_is_reported(monkeypatch):
    monkeypatch.setattr(R, "REWARDS", dict(R.REWARDS))
    R.register_reward("scalar", lambda pred, gt, fov: pred.mean())
    pred, gt, fov = _random_group()
    with pytest.raises(ValueError, match="'scalar' returned shape"):
        R.combined_reward(pred, gt, fov, {"scalar": 1.0})


def test_grouped_batch_scores_as_the_ground_truth_repeated_per_sample(monkeypatch):
    """An RL batch: N images, G samples each. group_size=G computes the ground truth's statistics once per image and
    must score exactly as the same call with gt/fov repeated G times; a custom reward still sees one row per sample."""
    monkeypatch.setattr(R, "REWARDS", dict(R.REWARDS))
    seen = {}

    def fg_inside_gt(pred, gt, fov=None):
        seen["shapes"] = (gt.shape[0], fov.shape[0])
        return (pred * gt * fov).mean(dim=(1, 2, 3))

    R.register_reward("fg_inside_gt", fg_inside_gt)
    g = torch.Generator().manual_seed(3)
    n, group = 3, 4
    gt = (torch.rand(n, 1, 24, 24, generator=g) > 0.8).float()
    gt[1] = 0  # an image without foreground: the empty-ground-truth conventions must line up too
    fov = (torch.rand(n, 1, 24, 24, generator=g) > 0.1).float()
    pred = (torch.rand(n * group, 1, 24, 24, generator=g) > 0.7).float()
    weights = {"dice": 0.3, "recall": 0.2, "topology": 0.2, "length": 0.1, "area_ratio": 0.1, "precision_floor": 1.0,
               "fg_inside_gt": 0.5}
    grouped, grouped_parts = R.combined_reward(pred, gt, fov, weights, group_size=group)
    assert seen["shapes"] == (n * group, n * group)
    repeated, repeated_parts = R.combined_reward(pred, gt.repeat_interleave(group, 0), fov.repeat_interleave(group, 0),
                                                 weights)
    assert torch.equal(grouped, repeated)
    for name in weights:
        assert torch.equal(grouped_parts[name], repeated_parts[name]), name
    with pytest.raises(ValueError, match="group 4: pred must hold 4 rows per gt/fov row"):
        R.combined_reward(pred[:-1], gt, fov, weights, group_size=group)


def test_skeleton_equals_monai_soft_skeleton_on_binary_masks_clear_of_the_border():
    from monai.losses.cldice import soft_skel

    g = torch.Generator().manual_seed(0)
    noise = torch.rand(6, 1, 40, 40, generator=g)
    # vessel-like: thresholded smooth noise, then a 3-px clear border (MONAI pads the min with +inf, we with 0)
    smooth = F.avg_pool2d(noise, 5, stride=1, padding=2)
    masks = (smooth > smooth.median()).float()
    masks[..., :3, :] = masks[..., -3:, :] = masks[..., :, :3] = masks[..., :, -3:] = 0
    ours = R.skeleton(masks, iters=R.SKELETON_ITERS)
    theirs = soft_skel(masks, iter_=R.SKELETON_ITERS)
    assert ours.dtype == torch.float32 and set(ours.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(ours, theirs)
