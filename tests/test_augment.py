"""The per-item augmentation: exact flips and quarter turns, binary labels, stated probabilities, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medtune.config import AugmentCfg
from medtune.data.augment import Augmentation

ONLY_SPATIAL = {"rotate_degrees": 0.0, "scale_range": (1.0, 1.0), "intensity": 0.0}


def _item(size: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, size, size, generator=g)
    mask = (torch.rand(2, size, size, generator=g) > 0.7).float()  # two targets, as a segmenting VLM has
    fov = torch.ones(1, size, size)
    return image, mask, fov


def test_flips_and_quarter_turns_are_exact_permutations():
    image, mask, fov = _item()
    augment = Augmentation(AugmentCfg(prob=1.0, **ONLY_SPATIAL))
    for seed in range(6):
        out_image, out_mask, _ = augment(image, mask, fov, np.random.default_rng(seed))
        candidates = [torch.rot90(torch.flip(image, dims=(1, 2)), k, dims=(1, 2)) for k in range(4)]
        match = [k for k, c in enumerate(candidates) if torch.allclose(out_image, c, atol=1e-5)]
        assert len(match) == 1, seed
        expected_mask = torch.rot90(torch.flip(mask, dims=(1, 2)), match[0], dims=(1, 2))
        assert torch.equal(out_mask, expected_mask)


def test_both_flips_without_quarter_turns_with_probability_one():
    image, mask, fov = _item()
    augment = Augmentation(AugmentCfg(prob=1.0, rotate90=False, **ONLY_SPATIAL))
    out_image, out_mask, out_fov = augment(image, mask, fov, np.random.default_rng(0))
    assert torch.allclose(out_image, torch.flip(image, dims=(1, 2)), atol=1e-5)  # both axes flipped: p = 1 each
    assert torch.equal(out_fov, fov)


def test_rotation_and_zoom_keep_labels_binary_and_zero_pad():
    image, mask, fov = _item(size=32)
    augment = Augmentation(AugmentCfg(prob=1.0, flip=False, rotate90=False, rotate_degrees=30.0,
                                      scale_range=(0.7, 0.8), intensity=0.0))
    out_image, out_mask, out_fov = augment(image, mask, fov, np.random.default_rng(1))
    assert set(out_mask.unique().tolist()) <= {0.0, 1.0} and set(out_fov.unique().tolist()) <= {0.0, 1.0}
    assert out_fov[0, 0, 0] == 0 and out_fov.mean() < 1  # zoomed out and rotated: corners come from outside


def test_zoom_above_one_magnifies():
    mask = torch.zeros(1, 41, 41)
    mask[:, 15:26, 15:26] = 1  # an 11-px centred square
    augment = Augmentation(AugmentCfg(prob=1.0, flip=False, rotate90=False, rotate_degrees=0.0,
                                      scale_range=(1.5, 1.5), intensity=0.0))
    _, out, _ = augment(torch.zeros(1, 41, 41), mask, torch.ones(1, 41, 41), np.random.default_rng(0))
    assert out.sum() == pytest.approx(mask.sum() * 1.5**2, rel=0.25)


def test_each_transform_applies_with_its_probability_and_items_are_reproducible():
    image, mask, fov = _item()
    augment = Augmentation(AugmentCfg(prob=0.3, rotate90=False, **ONLY_SPATIAL))
    changed = 0
    n = 2000
    for seed in range(n):
        out, _, _ = augment(image, mask, fov, np.random.default_rng(seed))
        changed += not torch.allclose(out, image, atol=1e-5)
    assert changed / n == pytest.approx(1 - 0.7**2, abs=0.03)  # two independent flips, each at p = 0.3
    a = augment(image, mask, fov, np.random.default_rng(7))
    b = augment(image, mask, fov, np.random.default_rng(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_intensity_only_touches_the_image():
    image, mask, fov = _item()
    augment = Augmentation(AugmentCfg(prob=1.0, flip=False, rotate90=False, rotate_degrees=0.0,
                                      scale_range=(1.0, 1.0), intensity=0.15))
    out_image, out_mask, out_fov = augment(image, mask, fov, np.random.default_rng(0))
    assert torch.equal(out_mask, mask) and torch.equal(out_fov, fov)
    assert not torch.allclose(out_image, image)
    disabled = Augmentation(AugmentCfg(enabled=False))
    assert disabled(image, mask, fov, np.random.default_rng(0))[0] is image
