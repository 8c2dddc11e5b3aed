import time

import numpy as np
import pytest
from PIL import Image

from medtune.config import DataCfg, SyntheticCfg
from medtune.data.layouts import discover
from medtune.data.synthetic import ensure_dataset, generate_image


def _gen(seed, domain="A", size=128):
    return generate_image(np.random.default_rng(seed), size, domain)


def test_shapes_dtypes_and_values():
    image, mask, fov = _gen(0, size=96)
    assert image.shape == (96, 96, 3) and mask.shape == (96, 96) and fov.shape == (96, 96)
    assert image.dtype == mask.dtype == fov.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 255} and set(np.unique(fov)) == {0, 255}
    assert not (mask.astype(bool) & ~fov.astype(bool)).any()  # vessels only inside the FOV
    assert image[fov == 0].mean() < 10 < 60 < image[fov > 0].mean()  # dark border around a bright fundus


def test_deterministic_by_seed():
    for a, b in zip(_gen(3, "B"), _gen(3, "B")):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(_gen(3)[1], _gen(4)[1])


@pytest.mark.parametrize("domain", ["A", "B"])
def test_foreground_fraction_inside_fov(domain):
    for seed in range(10):
        _, mask, fov = _gen(seed, domain)
        fraction = (mask > 0).sum() / (fov > 0).sum()
        assert 0.05 <= fraction <= 0.12, (seed, fraction)


def _vessel_contrast(image, mask, fov):
    green = image[..., 1].astype(float)
    vessel = green[(mask > 0)].mean()
    background = green[(fov > 0) & (mask == 0)].mean()
    return (background - vessel) / background


def test_domains_differ_in_colour_and_contrast():
    a = [_gen(s, "A") for s in range(4)]
    b = [_gen(s, "B") for s in range(4)]
    colour_a = np.mean([im[fov > 0].mean(0) for im, _, fov in a], axis=0)
    colour_b = np.mean([im[fov > 0].mean(0) for im, _, fov in b], axis=0)
    assert np.abs(colour_a - colour_b).max() > 40
    assert colour_a[0] / colour_a[1] > 1.5 > colour_b[0] / colour_b[1]  # reddish fundus vs duller yellow-grey
    contrast_a = np.mean([_vessel_contrast(*x) for x in a])
    contrast_b = np.mean([_vessel_contrast(*x) for x in b])
    assert contrast_b < 0.7 * contrast_a


def test_unknown_domain_rejected():
    with pytest.raises(ValueError, match="valid: A, B"):
        _gen(0, "C")


def test_ensure_dataset_layout_idempotent_and_fast(tmp_path):
    cfg = SyntheticCfg(domain="B", n_images=24, size=128, seed=5)
    start = time.perf_counter()
    folder = ensure_dataset(cfg, tmp_path)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0
    assert folder == tmp_path / "B-n24-s128-seed5"
    names = sorted(p.name for p in (folder / "images").iterdir())
    assert len(names) == 24
    for sub in ("masks", "fov"):
        assert sorted(p.name for p in (folder / sub).iterdir()) == names
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left behind
    image = np.asarray(Image.open(folder / "images" / names[0]))
    mask = np.asarray(Image.open(folder / "masks" / names[0]))
    assert image.shape == (128, 128, 3) and mask.shape == (128, 128) and set(np.unique(mask)) <= {0, 255}

    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*.png")}
    assert ensure_dataset(cfg, tmp_path) == folder
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.png")} == stamps

    (folder / "masks" / names[3]).unlink()  # an incomplete set is regenerated, identically
    ensure_dataset(cfg, tmp_path)
    assert np.array_equal(np.asarray(Image.open(folder / "masks" / names[0])), mask)
    assert (folder / "masks" / names[3]).is_file()


def test_synthetic_layout_discovers_images_masks_and_fov(tmp_path):
    samples = discover(DataCfg(path=str(tmp_path), layout="synthetic", synthetic={"n_images": 3, "size": 64}))
    assert len(samples) == 3
    assert all(s.fov is not None and s.masks[0].parent.name == "masks" for s in samples)
