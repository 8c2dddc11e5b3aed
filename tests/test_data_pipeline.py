"""Splits, scale normalisation, patch datasets, the step-indexed batch sampler, inspection and near-duplicates."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from medtune.config import DataCfg, ScaleNormCfg, SplitCfg
from medtune.data.datasets import (
    StepBatchSampler,
    TrainPatchDataset,
    whole_image_tensor,
)
from medtune.data.inspect import (
    duplicate_groups,
    find_near_duplicates,
    format_inspection,
    inspect_dataset,
)
from medtune.data.layouts import discover
from medtune.data.loading import (
    fov_diameter,
    load_all,
    load_sample,
    resample_to_native,
    scale_factors,
)
from medtune.data.splits import check_split, load_split, make_split, save_split
from medtune.data.types import DataError, LoadedSample, Sample

DRIVE = Path(__file__).parents[2] / "shared" / "data" / "DRIVE"


def smooth_image(seed: int, size: int = 64) -> np.ndarray:
    """A blurry random RGB image: perceptual hashes of distinct seeds differ a lot."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.uniform(0, 1, (3, size, size)), sigma=(0, size / 20, size / 20))
    return ((field - field.min()) / (field.max() - field.min())).astype(np.float32)


def loaded(i: int, size: int = 40, seed: int | None = None) -> LoadedSample:
    image = smooth_image(i if seed is None else seed, 64)[:, :size, :size]
    mask = np.zeros((size, size), np.uint8)
    mask[5:15, 8:20] = 1
    fov = np.zeros((size, size), np.uint8)
    fov[2:-2, 2:-2] = 1
    return LoadedSample(id=f"s{i}", image=np.ascontiguousarray(image), mask=mask, fov=fov, native_shape=(size, size))


def samples(n: int, **fields) -> list[Sample]:
    return [Sample(id=f"s{i:02d}", image=Path(f"s{i:02d}.png"), **fields) for i in range(n)]


# ---------------------------------------------------------------- splits

def test_split_is_deterministic_and_group_aware():
    items = samples(30)
    for i, s in enumerate(items):
        s.group = f"patient{i // 3}"  # ten patients, three images each
    cfg = SplitCfg(val_fraction=0.2, test_fraction=0.2)
    split = make_split(items, cfg, seed=7)
    assert split == make_split(items, cfg, seed=7)
    assert split != make_split(items, cfg, seed=8)
    assert sorted(i for ids in split.values() for i in ids) == sorted(s.id for s in items)
    where = {i: name for name, ids in split.items() for i in ids}
    for patient in range(10):
        assert len({where[f"s{patient * 3 + k:02d}"] for k in range(3)}) == 1
    assert [len(split[k]) for k in ("train", "val", "test")] == [18, 6, 6]


def test_split_duplicate_groups_keep_copies_together():
    items = samples(12)
    dup = duplicate_groups([("s00", "s05", 1), ("s05", "s11", 2)])
    assert dup == {"s00": "dup:s00", "s05": "dup:s00", "s11": "dup:s00"}
    for seed in range(5):
        split = make_split(items, SplitCfg(val_fraction=0.25, test_fraction=0.25), seed, duplicate_groups=dup)
        where = {i: name for name, ids in split.items() for i in ids}
        assert where["s00"] == where["s05"] == where["s11"]



def test_split_says_when_a_requested_split_comes_out_empty(recwarn):
    # three images the hash puts in one near-duplicate group: one unit, which training keeps
    items = samples(3)
    dup = duplicate_groups([("s00", "s01", 3), ("s01", "s02", 4)])
    with pytest.warns(RuntimeWarning, match=r"the val and test splits are empty .*only 1 unit.*keep_duplicates_together"):
        split = make_split(items, SplitCfg(val_fraction=0.1, test_fraction=0.2), 0, duplicate_groups=dup)
    assert split["train"] == ["s00", "s01", "s02"] and not split["val"] and not split["test"]
    recwarn.clear()
    make_split(samples(20), SplitCfg(val_fraction=0.1, test_fraction=0.2), 0)  # enough units: nothing to say
    make_split(samples(20), SplitCfg(val_fraction=0.0, test_fraction=0.2), 0)  # no val asked for
    assert not [w for w in recwarn if "empty" in str(w.message)]

def test_layout_split_is_honoured():
    items = samples(10)
    for s in items[:4]:
        s.split = "test"
    for s in items[4:]:
        s.split = "train"
    split = make_split(items, SplitCfg(val_fraction=0.2, test_fraction=0.5), seed=0)
    assert split["test"] == ["s00", "s01", "s02", "s03"]
    assert len(split["val"]) == 1 and len(split["train"]) == 5
    ignored = make_split(items, SplitCfg(use_layout_split=False, val_fraction=0.2, test_fraction=0.2), seed=0)
    assert ignored["test"] != split["test"]


def test_split_never_leaves_train_empty(tmp_path):
    with pytest.warns(RuntimeWarning, match="the val split is empty .* 2 samples are too few"):
        assert make_split(samples(2), SplitCfg(val_fraction=0.5, test_fraction=0.4), 0)["train"]
    all_test = samples(3, split="test")
    with pytest.raises(DataError, match="no training samples"):
        make_split(all_test, SplitCfg(), 0)
    split = make_split(samples(5), SplitCfg(), 0)
    save_split(tmp_path / "split.json", split)
    assert load_split(tmp_path / "split.json") == split
    check_split(split, samples(5))
    with pytest.raises(DataError, match="'s04' in split"):
        check_split(split, samples(4))


# ---------------------------------------------------------------- loading / scale

def test_scale_normalisation_round_trip(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name, size in (("small", 32), ("large", 64)):
        yy, xx = np.mgrid[:size, :size]
        disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.45) ** 2)
        Image.fromarray((disc * 200).astype(np.uint8)).save(tmp_path / "images" / f"{name}.png")
        Image.fromarray((disc[:, :] * (xx < size / 2) * 255).astype(np.uint8)).save(tmp_path / "masks" / f"{name}.png")
    cfg = DataCfg(path=str(tmp_path), channels=1, scale_norm={"enabled": True, "target_fov_diameter": 40})
    items = discover(cfg)
    native = load_all(items, cfg)
    assert [fov_diameter(ls.fov) for ls in native] == pytest.approx([58, 29], abs=1)  # derived from the dark border
    target, scales = scale_factors(native, cfg.scale_norm)
    assert target == 40 and scales["images/small"] == pytest.approx(40 / fov_diameter(native[1].fov))
    ls = load_sample(items[1], cfg, scales["images/small"])
    assert ls.native_shape == (32, 32) and ls.mask.shape == (44, 44) and set(np.unique(ls.mask)) <= {0, 1}
    assert resample_to_native(ls.mask.astype(np.float32), ls.native_shape).shape == (32, 32)
    _, off = scale_factors(native, ScaleNormCfg(enabled=False))
    assert set(off.values()) == {1.0}


# ---------------------------------------------------------------- datasets

def test_patch_dataset_types_shapes_and_determinism():
    cfg = DataCfg(patch_size=32, patches_per_image=3)
    ds = TrainPatchDataset([loaded(0), loaded(1, size=24)], cfg, seed=3)  # second image smaller than the patch
    assert len(ds) == 6
    first, again, other_epoch = ds[(4, 0)], ds[(4, 0)], ds[(4, 1)]
    assert set(first) == {"image", "mask", "fov", "box"}
    assert all(type(v) is torch.Tensor and v.dtype == torch.float32 for v in first.values())
    assert first["image"].shape == (3, 32, 32) and first["mask"].shape == (1, 32, 32) and first["box"].shape == (4,)
    assert set(first["mask"].unique().tolist()) <= {0.0, 1.0}
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other_epoch[k]) for k in ("image", "mask"))
    x1, y1, x2, y2 = first["box"].tolist()
    assert 0 <= x1 < x2 <= 32 and 0 <= y1 < y2 <= 32
    batch = torch.utils.data.default_collate([ds[(i, 0)] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 32)


def test_whole_image_sampling_and_eval_tensor():
    cfg = DataCfg(patch_size=16, sampling="whole_image", augment={"enabled": False})
    ds = TrainPatchDataset([loaded(0), loaded(1)], cfg, seed=0)
    item = ds[(1, 0)]
    assert len(ds) == 2 and item["image"].shape == (3, 16, 16)
    # mask rows 5:15, cols 8:20 of 40 -> box (3.2, 2, 8, 6) in a 16 px image, up to 5 % jitter of its side
    assert item["box"].tolist() == pytest.approx([3.2, 2.0, 8.0, 6.0], abs=0.5)
    full = whole_image_tensor(loaded(0))
    assert full["image"].shape == (3, 40, 40) and full["mask"].shape == (1, 40, 40) and full["fov"].dtype == torch.float32


def test_step_batch_sampler_resume_and_ranks():
    fresh = list(itertools.islice(iter(StepBatchSampler(10, 4, seed=1)), 8))
    resumed = list(itertools.islice(iter(StepBatchSampler(10, 4, seed=1, start_step=5)), 3))
    assert resumed == fresh[5:8]
    # 8 steps x 4 = 32 keys: epochs 0..2 are full permutations of the 10 indices
    stream = [k for batch in fresh for k in batch]
    for epoch in range(3):
        assert sorted(i for i, e in stream if e == epoch) == list(range(10))
    ranks = [list(itertools.islice(iter(StepBatchSampler(10, 4, 1, rank=r, world=2)), 8)) for r in range(2)]
    for step in range(8):
        assert len(ranks[0][step]) == 2
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(fresh[step])
    with pytest.raises(ValueError, match="not divisible"):
        StepBatchSampler(10, 5, 0, world=2)


# ---------------------------------------------------------------- inspection

def test_near_duplicates_found_for_noisy_copy_only():
    rng = np.random.default_rng(0)
    noisy = loaded(0)
    noisy.image = np.clip(noisy.image + rng.normal(0, 0.02, noisy.image.shape), 0, 1).astype(np.float32)
    noisy.id = "copy"
    pairs = find_near_duplicates([loaded(0), loaded(1), loaded(2), noisy], max_distance=4)
    assert [(a, b) for a, b, _ in pairs] == [("copy", "s0")]


def test_inspect_reports_counts_problems_and_straddling_duplicates(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name, seed in (("a", 0), ("a_copy", 0), ("b", 1), ("c", 2)):
        Image.fromarray((smooth_image(seed, 32).transpose(1, 2, 0) * 255).astype(np.uint8)).save(
            tmp_path / "images" / f"{name}.png")
        mask = np.zeros((32, 32), np.uint8)
        mask[4:12, 4:12] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / f"{name}.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / "lonely.png")
    cfg = DataCfg(path=str(tmp_path))
    split = {"train": ["images/a", "images/b"], "val": ["images/a_copy"], "test": ["images/c"]}
    report = inspect_dataset(cfg, split)
    assert report["layout"] == "generic" and report["n_samples"] == 4
    assert report["image_size"]["min"] == [32, 32]
    assert report["foreground_fraction_in_fov"]["mean"] == pytest.approx(64 / 1024)
    assert any("lonely.png: no mask" in p for p in report["problems"])
    assert report["near_duplicates"]["across_splits"] == [["images/a", "images/a_copy", 0, "train", "val"]]
    text = format_inspection(report)
    assert "straddling splits: 1" in text and "lonely.png" in text


# ---------------------------------------------------------------- real data

@pytest.mark.realdata
def test_drive_real_data():
    if not DRIVE.is_dir():
        pytest.skip("../shared/data/DRIVE not found: real-data test skipped")
    cfg = DataCfg(path=str(DRIVE))
    items = discover(cfg)
    assert sum(s.split == "train" for s in items) == 20 and sum(s.split == "test" for s in items) == 20
    assert all(s.fov is not None for s in items)
    for ls in load_all(items[::10], cfg):  # four images keep the test fast
        fov = ls.fov.astype(bool)
        assert 0.6 < fov.mean() < 0.75
        assert 0.08 < ls.mask[fov].mean() < 0.18
