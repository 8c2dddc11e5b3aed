"""Numbers that must not depend on what they should not: evaluation regions on labels, image brightness on one
image's content, and run files on which process got there first."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtune.config import build_config
from medtune.data.datasets import TrainPatchDataset
from medtune.data.io import read_image
from medtune.data.layouts import discover
from medtune.data.loading import fov_diameter, load_all, scale_factors
from medtune.data.run_split import INTENSITY_FILE, load_split_samples, prepare_split, use_recorded_image_max
from medtune.data.splits import load_split, save_split

SIZE = 48
# The corner block of a "bad" mask, in the dark border outside every disc.
CORNER = (slice(0, 6), slice(0, 6))


def write_discs(root: Path, n: int = 8, corner_in: tuple[str, ...] = ()) -> Path:
    """Fundus-like images: a bright disc (radius varies) on a dark border; the mask is a bar inside the disc, plus a
    block in the dark corner for the images named in ``corner_in``."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        radius = 12 + i
        disc = (yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < radius**2
        image = np.where(disc, rng.uniform(120, 220, (SIZE, SIZE)), rng.uniform(0, 4, (SIZE, SIZE)))
        Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"img{i}.png")
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[SIZE // 2 - 2:SIZE // 2 + 2, SIZE // 2 - 8:SIZE // 2 + 8] = 255
        if f"img{i}" in corner_in:
            mask[CORNER] = 255
        Image.fromarray(mask).save(root / "masks" / f"img{i}.png")
    return root


def cfg_for(data: Path, tmp_path: Path, *extra: str):
    return build_config({}, [f"data.path={data}", "data.layout=generic", f"run.output_dir={tmp_path}",
                             "data.split.val_fraction=0.25", "data.split.test_fraction=0.25", *extra])


# ---------------------------------------------------------------- item 3: evaluation region is label-free

def test_changing_a_mask_changes_no_fov_and_no_scale(tmp_path):
    clean = write_discs(tmp_path / "clean")
    everywhere = [f"img{i}" for i in range(8)]
    dirty = write_discs(tmp_path / "dirty", corner_in=tuple(everywhere))
    cfg_clean = cfg_for(clean, tmp_path, "data.scale_norm.enabled=true")
    cfg_dirty = cfg_for(dirty, tmp_path, "data.scale_norm.enabled=true")
    native_clean, native_dirty = load_all(discover(cfg_clean.data), cfg_clean.data), load_all(
        discover(cfg_dirty.data), cfg_dirty.data)
    for a, b in zip(native_clean, native_dirty):
        assert a.mask[CORNER].sum() == 0 and b.mask[CORNER].all()
        assert np.array_equal(a.fov, b.fov) and not a.fov[CORNER].any()  # the corner is outside the derived FOV
    assert scale_factors(native_clean, cfg_clean.data.scale_norm) == scale_factors(native_dirty, cfg_dirty.data.scale_norm)
    assert [fov_diameter(s.fov) for s in native_clean] == [fov_diameter(s.fov) for s in native_dirty]

    # the run level: same split, same scale target, same test FOVs and scales whatever the test masks say
    runs = []
    for name, data in (("clean", clean), ("dirty", dirty)):
        run_dir = tmp_path / f"run-{name}"
        cfg = cfg_for(data, tmp_path, "data.scale_norm.enabled=true")
        run = prepare_split(cfg, run_dir)
        test = load_split_samples(cfg, run, "test", run_dir)
        runs.append((run.split, run.target_scale, [(s.id, s.scale, s.fov.tobytes()) for s in test]))
    assert runs[0] == runs[1]


def test_training_loss_region_still_holds_the_annotated_foreground(tmp_path):
    data = write_discs(tmp_path / "d", n=1, corner_in=("img0",))
    cfg = cfg_for(data, tmp_path, "data.sampling=whole_image", f"data.patch_size={SIZE}", "data.augment.enabled=false")
    [ls] = load_all(discover(cfg.data), cfg.data)
    assert not ls.fov[CORNER].any()
    item = TrainPatchDataset([ls], cfg.data, seed=0)[(0, 0)]
    region = item["fov"][0].numpy()
    assert region[CORNER].all() and region.sum() == (ls.fov | ls.mask).sum()


# ---------------------------------------------------------------- item 8: one intensity scale per data set

def write_16bit(root: Path, peaks: dict[str, int]) -> Path:
    """16-bit images of one 'scanner': the same tissue value 3000 everywhere but a different brightest pixel."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for name, peak in peaks.items():
        arr = np.full((16, 16), 3000, np.uint16)
        arr[0, 0] = peak
        Image.fromarray(arr).save(root / "images" / f"{name}.png")
        mask = np.zeros((16, 16), np.uint8)
        mask[4:8, 4:8] = 255
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    return root


def test_16bit_images_share_one_scale_recorded_in_the_run(tmp_path):
    data = write_16bit(tmp_path / "d", {"dim": 4000, "bright": 5000})  # per-image tiers would be 4095 vs 65535
    cfg = cfg_for(data, tmp_path, "data.split.val_fraction=0", "data.split.test_fraction=0", "data.derive_fov=false")
    run_dir = tmp_path / "run"
    run = prepare_split(cfg, run_dir)
    train = {s.id: s for s in load_split_samples(cfg, run, "train", run_dir)}
    tissue = {i: float(s.image[0, 8, 8]) for i, s in train.items()}
    assert tissue["images/dim"] == tissue["images/bright"] == pytest.approx(3000 / 65535)
    recorded = json.loads((run_dir / INTENSITY_FILE).read_text())
    assert recorded["image_max"] == 65535 and recorded["observed_max"] == 5000
    assert cfg.data.image_max == 65535  # every later load with cfg.data reads like training

    fresh = cfg_for(data, tmp_path)  # what predict / report get from config.yaml
    use_recorded_image_max(fresh, run_dir)
    assert fresh.data.image_max == 65535
    dim = read_image(data / "images" / "dim.png", 1, fresh.data.image_max)
    assert float(dim[0, 8, 8]) == pytest.approx(tissue["images/dim"])
    with pytest.warns(UserWarning, match="exceed data.image_max=4095"):
        assert read_image(data / "images" / "bright.png", 1, 4095.0).max() == 1.0


# ---------------------------------------------------------------- item 13: run files from the main process only

def test_other_processes_use_the_main_processs_split(tmp_path):
    data = write_discs(tmp_path / "d", n=12)
    run_dir = tmp_path / "run"
    # the main process's split differs from the one this process would make on its own (another split seed)
    cfg_main, cfg_other = cfg_for(data, tmp_path, "data.split.seed=1"), cfg_for(data, tmp_path, "data.split.seed=2")
    own = prepare_split(cfg_other, tmp_path / "scratch").split

    def main_writes_meanwhile():
        prepare_split(cfg_main, run_dir, is_main=True)

    seen = prepare_split(cfg_other, run_dir, is_main=False, wait_for_main=main_writes_meanwhile).split
    assert seen == load_split(run_dir / "split.json") and seen != own


def test_only_the_main_process_writes_run_files(tmp_path):
    data = write_discs(tmp_path / "d")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = cfg_for(data, tmp_path, "data.scale_norm.enabled=true")
    other = prepare_split(cfg, run_dir, is_main=False)
    load_split_samples(cfg, other, "val", run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == []
    main = prepare_split(cfg, run_dir, is_main=True)
    load_split_samples(cfg, main, "val", run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["intensity.json", "scale.json", "split.json"]


def test_a_crash_while_saving_leaves_no_half_written_split(tmp_path, monkeypatch):
    import medtune.runs.files as files

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_split(tmp_path / "split.json", {"train": ["a"], "val": [], "test": ["b"]})
    assert not (tmp_path / "split.json").exists()
