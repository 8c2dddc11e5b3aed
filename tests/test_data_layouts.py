"""Discovery of every layout, auto-detection, and bad-input errors that name the file and the fix."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtune.config import DataCfg
from medtune.data.io import derive_fov, rasterize_polygons, read_image, read_mask
from medtune.data.layouts import DataWarning, detect_layout, discover
from medtune.data.loading import load_all, load_sample
from medtune.data.types import DataError

SIZE = 32


def write_image(path: Path, size: int = SIZE, seed: int = 0, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(40, 255, shape, dtype=np.uint8), mode=mode).save(path)
    return path


def write_mask(path: Path, size: int = SIZE, box: tuple[int, int, int, int] = (4, 4, 12, 12),
               high: int = 255, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size, size), np.uint8)
    y1, x1, y2, x2 = box
    arr[y1:y2, x1:x2] = high
    img = Image.fromarray(arr, mode="L")
    if mode == "P":
        img = img.convert("P")
    img.save(path)
    return path


def problems_of(err: pytest.ExceptionInfo) -> str:
    return str(err.value)


# ---------------------------------------------------------------- layouts

def test_generic_with_mask_suffix_and_fov(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    write_image(tmp_path / "images" / "sub" / "b.jpg", seed=1)
    write_mask(tmp_path / "masks" / "a_mask.png")
    write_mask(tmp_path / "masks" / "sub" / "b.png")
    write_mask(tmp_path / "fov" / "a.png", box=(0, 0, SIZE, SIZE))
    write_mask(tmp_path / "fov" / "sub" / "b_fov.png", box=(0, 0, SIZE, SIZE))
    assert detect_layout(tmp_path) == "generic"
    samples = discover(DataCfg(path=str(tmp_path), fov_dir="fov"))
    assert [s.id for s in samples] == ["images/a", "images/sub/b"]
    assert samples[0].masks[0].name == "a_mask.png" and samples[0].fov.name == "a.png"
    assert samples[1].masks[0].name == "b.png" and samples[1].fov.name == "b_fov.png"


def test_generic_images_and_masks_in_one_folder(tmp_path):
    write_image(tmp_path / "data" / "a.png")
    write_mask(tmp_path / "data" / "a_mask.png")
    samples = discover(DataCfg(path=str(tmp_path), layout="generic", image_dir="data", mask_dir="data"))
    assert [s.id for s in samples] == ["data/a"]


def test_drive_layout(tmp_path):
    for split, n in (("training", "21"), ("training", "22"), ("test", "01")):
        write_image(tmp_path / split / "images" / f"{n}_{split}.tif", seed=int(n))
        write_mask(tmp_path / split / "1st_manual" / f"{n}_manual1.gif")
        write_mask(tmp_path / split / "mask" / f"{n}_{split}_mask.gif", box=(2, 2, 30, 30))
    assert detect_layout(tmp_path) == "drive"
    cfg = DataCfg(path=str(tmp_path))
    samples = discover(cfg)
    assert {s.id: s.split for s in samples} == {
        "test/images/01_test": "test", "training/images/21_training": "train", "training/images/22_training": "train"}
    ls = load_sample(samples[0], cfg)
    assert ls.image.shape == (3, SIZE, SIZE) and ls.image.dtype == np.float32
    assert ls.mask.sum() == 64 and ls.fov.sum() == 28 * 28


def test_drive_folders_with_chase_and_stare_names(tmp_path):
    """CHASE_DB1 / STARE redistributed in DRIVE's training/test folders pair by their own names and keep groups."""
    chase = tmp_path / "chase"
    for split, name in (("training", "Image_01L"), ("training", "Image_01R"), ("training", "Image_02L"),
                        ("test", "Image_03L")):
        write_image(chase / split / "images" / f"{name}.jpg")
        write_mask(chase / split / "1st_manual" / f"{name}_1stHO.png")
    assert detect_layout(chase) == "drive"
    samples = discover(DataCfg(path=str(chase)))
    assert {s.id: (s.split, s.group, s.masks[0].name) for s in samples} == {
        "training/images/Image_01L": ("train", "01", "Image_01L_1stHO.png"),
        "training/images/Image_01R": ("train", "01", "Image_01R_1stHO.png"),
        "training/images/Image_02L": ("train", "02", "Image_02L_1stHO.png"),
        "test/images/Image_03L": ("test", "03", "Image_03L_1stHO.png"),
    }
    stare = tmp_path / "stare"
    for split, stem in (("training", "im0001"), ("training", "im0002"), ("test", "im0003")):
        write_image(stare / split / "images" / f"{stem}.ppm")
        write_mask(stare / split / "1st_manual" / f"{stem}.ah.ppm")
    samples = discover(DataCfg(path=str(stare)))
    assert [(s.split, s.masks[0].name) for s in samples] == [
        ("test", "im0003.ah.ppm"), ("train", "im0001.ah.ppm"), ("train", "im0002.ah.ppm")]
    (stare / "test" / "1st_manual" / "im0003.ah.ppm").unlink()
    with pytest.raises(DataError, match=r"im0003.ppm: no vessel mask .*im0003.ah"):
        discover(DataCfg(path=str(stare)))


def test_chase_groups_left_and_right_eye(tmp_path):
    for name in ("Image_01L", "Image_01R", "Image_02L"):
        write_image(tmp_path / f"{name}.jpg")
        write_mask(tmp_path / f"{name}_1stHO.png")
        write_mask(tmp_path / f"{name}_2ndHO.png")
    assert detect_layout(tmp_path) == "chase"
    samples = discover(DataCfg(path=str(tmp_path)))
    assert {s.id: s.group for s in samples} == {"Image_01L": "01", "Image_01R": "01", "Image_02L": "02"}
    assert all(s.masks[0].name.endswith("_1stHO.png") for s in samples)


@pytest.mark.parametrize("split_folders", [False, True])
def test_stare_layout(tmp_path, split_folders):
    image_dir = tmp_path / "stare-images" if split_folders else tmp_path
    label_dir = tmp_path / "labels-ah" if split_folders else tmp_path
    for stem in ("im0001", "im0002"):
        write_image(image_dir / f"{stem}.ppm")
        write_mask(label_dir / f"{stem}.ah.ppm")
    assert detect_layout(tmp_path) == "stare"
    samples = discover(DataCfg(path=str(tmp_path)))
    assert [s.masks[0].name for s in samples] == ["im0001.ah.ppm", "im0002.ah.ppm"]


def test_busi_unions_multiple_masks(tmp_path):
    write_image(tmp_path / "benign" / "benign (1).png", mode="L")
    write_mask(tmp_path / "benign" / "benign (1)_mask.png", box=(0, 0, 4, 4))
    write_mask(tmp_path / "benign" / "benign (1)_mask_1.png", box=(10, 10, 14, 14))
    write_image(tmp_path / "malignant" / "malignant (1).png", mode="L")
    write_mask(tmp_path / "malignant" / "malignant (1)_mask.png")
    write_image(tmp_path / "normal" / "normal (1).png", mode="L")
    write_mask(tmp_path / "normal" / "normal (1)_mask.png", box=(0, 0, 0, 0))
    assert detect_layout(tmp_path) == "busi"
    cfg = DataCfg(path=str(tmp_path))
    samples = discover(cfg)
    assert {s.id: s.label for s in samples} == {
        "benign/benign (1)": "benign", "malignant/malignant (1)": "malignant", "normal/normal (1)": "normal"}
    ls = load_sample(samples[0], cfg)
    assert len(samples[0].masks) == 2 and ls.mask.sum() == 32  # two 4x4 lesions


def test_polygon_json_and_path_escape(tmp_path):
    root = tmp_path / "data"
    write_image(root / "imgs" / "a.png")
    write_image(tmp_path / "x.png")  # exists, but outside the data folder
    entries = [
        {"image": "imgs/a.png", "mask": [[2, 2, 10, 2, 10, 10, 2, 10], [20, 20, 28, 20, 28, 28]], "text": ["a"]},
    ]
    (root / "annotations.json").write_text(json.dumps(entries))
    assert detect_layout(root) == "polygon_json"
    cfg = DataCfg(path=str(root))
    [sample] = discover(cfg)
    assert sample.id == "imgs/a" and len(sample.polygons) == 2
    assert load_sample(sample, cfg).mask.sum() > 64

    entries += [{"image": "../x.png", "mask": [], "text": []}, {"image": str(tmp_path / "x.png"), "mask": []}]
    (root / "annotations.json").write_text(json.dumps(entries))
    with pytest.raises(DataError) as err:
        discover(cfg)
    assert "'../x.png' escapes the data folder" in problems_of(err)
    assert problems_of(err).count("escapes the data folder") == 2



def test_polygon_json_entry_without_mask_key_is_a_problem(tmp_path):
    root = tmp_path / "data"
    for name in ("a", "b", "c"):
        write_image(root / f"{name}.png")
    entries = [{"image": "a.png", "mask": [[2, 2, 10, 2, 10, 10, 2, 10]], "text": ["a"]},
               {"image": "b.png", "text": ["the lesion"]},  # an export that dropped the mask
               {"image": "c.png", "mask": []}]  # explicitly no target: stays an empty mask
    (root / "annotations.json").write_text(json.dumps(entries))
    cfg = DataCfg(path=str(root), layout="polygon_json")
    with pytest.raises(DataError) as err:
        discover(cfg)
    assert "entry 1" in problems_of(err) and "no 'mask' key" in problems_of(err)
    assert "entry 0" not in problems_of(err) and "entry 2" not in problems_of(err)
    del entries[1]
    (root / "annotations.json").write_text(json.dumps(entries))
    samples = {s.id: s for s in discover(cfg)}
    assert load_sample(samples["c"], cfg).mask.sum() == 0

def test_max_samples_keeps_first_ids_and_group_by(tmp_path):
    for name in ("p1_a", "p1_b", "p2_a", "zz"):
        write_image(tmp_path / "images" / f"{name}.png")
        write_mask(tmp_path / "masks" / f"{name}.png")
    # a file the regex misses is its own group, but never silently: it could be a patient the regex spreads out
    with pytest.warns(DataWarning, match=r"does not match 1 of 4 image file names \(e.g. zz.png\)"):
        samples = discover(DataCfg(path=str(tmp_path), split={"group_by": r"^(p\d+)_"}))
    assert {s.id: s.group for s in samples} == {
        "images/p1_a": "p1", "images/p1_b": "p1", "images/p2_a": "p2", "images/zz": "images/zz"}
    assert [s.id for s in discover(DataCfg(path=str(tmp_path), max_samples=2))] == ["images/p1_a", "images/p1_b"]


def test_group_by_matching_no_file_is_an_error(tmp_path):
    for name in ("p1_a", "p1_b", "p2_a"):
        write_image(tmp_path / "images" / f"{name}.png")
        write_mask(tmp_path / "masks" / f"{name}.png")
    with pytest.raises(DataError) as err:
        discover(DataCfg(path=str(tmp_path), split={"group_by": r"^(P\d+)_"}))  # typo: capital P
    text = problems_of(err)
    assert r"group_by='^(P\d+)_' matches none of the 3 image file names (e.g. p1_a.png, p1_b.png, p2_a.png)" in text


def test_group_by_keeps_the_layouts_own_groups(tmp_path):
    # CHASE groups one child's two eyes; a user regex grouping by eye must not split a child across splits
    for name in ("Image_01L", "Image_01R", "Image_02L", "Image_03R"):
        write_image(tmp_path / f"{name}.jpg")
        write_mask(tmp_path / f"{name}_1stHO.png")
    samples = discover(DataCfg(path=str(tmp_path), split={"group_by": r"\d+([LR])"}))
    groups = {s.id: s.group for s in samples}
    assert groups["Image_01L"] == groups["Image_01R"]  # same child, different eye
    assert groups["Image_01L"] == groups["Image_02L"] == groups["Image_03R"]  # ... and the user's eye groups hold


# ---------------------------------------------------------------- bad input

def test_all_problems_reported_at_once(tmp_path):
    write_image(tmp_path / "images" / "no_mask.png")
    write_image(tmp_path / "images" / "ok.png")
    write_mask(tmp_path / "masks" / "ok.png")
    write_mask(tmp_path / "masks" / "orphan_mask.png")
    with pytest.raises(DataError) as err:
        discover(DataCfg(path=str(tmp_path)))
    text = problems_of(err)
    assert "2 problem(s)" in text
    assert "no_mask.png: no mask" in text and "orphan_mask.png: mask without an image" in text


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="no samples found"):
        discover(DataCfg(path=str(tmp_path)))
    with pytest.raises(DataError, match="data folder not found"):
        discover(DataCfg(path=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="cannot tell the data layout"):
        discover(DataCfg(path=str(tmp_path / "images")))
    with pytest.raises(DataError, match="masks_x.*folder not found"):
        discover(DataCfg(path=str(tmp_path), layout="generic", mask_dir="masks_x"))


def test_size_mismatch_names_both_files(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    write_mask(tmp_path / "masks" / "a.png", size=SIZE + 8)
    cfg = DataCfg(path=str(tmp_path))
    with pytest.raises(DataError) as err:
        load_all(discover(cfg), cfg)
    assert f"a.png is {SIZE}x{SIZE} but mask" in problems_of(err)
    assert "re-export the mask at the image size" in problems_of(err)


def test_non_binary_mask_is_binarised_with_warning(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    arr = np.zeros((SIZE, SIZE), np.uint8)
    arr[:, 8:16], arr[:, 16:24] = 100, 250  # 100 < 250/2 -> background
    (tmp_path / "masks").mkdir()
    Image.fromarray(arr).save(tmp_path / "masks" / "a.png")
    cfg = DataCfg(path=str(tmp_path))
    with pytest.warns(UserWarning, match="a.png: mask has 3 grey levels"):
        ls = load_sample(discover(cfg)[0], cfg)
    assert set(np.unique(ls.mask)) == {0, 1} and ls.mask.sum() == 8 * SIZE


def test_jpeg_noise_mask_is_still_binarised(tmp_path):
    arr = np.zeros((SIZE, SIZE), np.uint8)
    arr[:, SIZE // 2:] = 255
    rng = np.random.default_rng(0)
    noisy = np.clip(arr.astype(int) + rng.integers(-20, 21, arr.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(tmp_path / "m.png")
    mask, warning = read_mask(tmp_path / "m.png")
    assert "grey levels" in warning and mask.sum() == SIZE * SIZE // 2


def test_label_map_mask_is_refused_unless_labels_are_chosen(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    arr = np.zeros((SIZE, SIZE), np.uint8)
    arr[:, 8:16], arr[:, 16:24], arr[:, 24:] = 1, 2, 3  # background + three classes
    (tmp_path / "masks").mkdir()
    Image.fromarray(arr).save(tmp_path / "masks" / "a.png")
    cfg = DataCfg(path=str(tmp_path))
    with pytest.raises(DataError) as err:
        load_sample(discover(cfg)[0], cfg)
    text = problems_of(err)
    assert "a.png: mask is a label map with values [0, 1, 2, 3]" in text
    assert "data.mask_labels=[1, 2, 3]" in text and "\n" not in text
    chosen = DataCfg(path=str(tmp_path), mask_labels=[2, 3])
    ls = load_sample(discover(chosen)[0], chosen)
    assert ls.mask.sum() == 16 * SIZE and ls.mask[:, 16:].all() and not ls.mask[:, :16].any()


def test_truncated_image_raises_data_error(tmp_path):
    full = write_image(tmp_path / "full.png", size=64)
    data = full.read_bytes()
    write_mask(tmp_path / "masks" / "a.png", size=64)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(data[: len(data) // 2])
    cfg = DataCfg(path=str(tmp_path))
    with pytest.raises(DataError) as err:
        load_sample(discover(cfg)[0], cfg)
    assert "a.png: cannot be read as an image" in problems_of(err) and "re-export the file" in problems_of(err)


# ---------------------------------------------------------------- io

def test_read_image_channels_and_16bit(tmp_path):
    grey = write_image(tmp_path / "g.png", mode="L")
    assert read_image(grey, 3).shape == (3, SIZE, SIZE)
    rgb = write_image(tmp_path / "c.png")
    one = read_image(rgb, 1)
    assert one.shape == (1, SIZE, SIZE) and 0 <= one.min() and one.max() <= 1
    arr16 = np.full((8, 8), 4095, np.uint16)
    arr16[0, 0] = 0
    Image.fromarray(arr16).save(tmp_path / "twelve_bit.png")
    img = read_image(tmp_path / "twelve_bit.png", 1)
    assert img.dtype == np.float32 and img.max() == pytest.approx(1.0)


def test_read_mask_palette_zero_one(tmp_path):
    arr = np.zeros((8, 8), np.uint8)
    arr[2:4, 2:4] = 1
    img = Image.fromarray(arr, mode="L").convert("P")
    img.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    img.save(tmp_path / "m.gif")
    mask, warning = read_mask(tmp_path / "m.gif")
    assert warning is None and mask.sum() == 4 and mask.dtype == np.uint8


def test_rasterize_polygons_union():
    mask = rasterize_polygons([[0, 0, 4, 0, 4, 4, 0, 4], [2, 2, 6, 2, 6, 6, 2, 6]], (8, 8))
    assert mask.dtype == np.uint8 and mask[1, 1] == 1 and mask[5, 5] == 1 and mask[7, 0] == 0


def test_rasterize_polygons_closed_boundary_and_centre_rule():
    # integer vertices: the boundary belongs to the polygon (rows and columns 0..4 of a [0, 4] square)
    square = rasterize_polygons([[0, 0, 4, 0, 4, 4, 0, 4]], (6, 6))
    assert square.sum() == 25 and square[:5, :5].all()
    # a triangle with off-grid vertices: pixel (r, c) is in when its centre is; hand-counted row by row
    tri = rasterize_polygons([[0.5, 0.5, 4.5, 0.5, 0.5, 4.5]], (6, 6))
    assert tri.sum(axis=1).tolist() == [0, 4, 3, 2, 1, 0]


TRACED_VERTICES = 4000  # a traced lesion contour: thousands of vertices (pixel-by-pixel outline)
TRACED_RADIUS = 300
RASTERIZE_SECONDS = 0.5  # the per-pixel test took ~2.5 s for this one polygon; the scanline fill takes ~5 ms


def test_rasterize_polygons_traced_contour_is_fast_and_exact():
    import time

    t = np.linspace(0, 2 * np.pi, TRACED_VERTICES, endpoint=False)
    centre = TRACED_RADIUS + 50.3
    xy = np.stack([centre + TRACED_RADIUS * np.cos(t), centre + TRACED_RADIUS * np.sin(t)], 1).ravel().tolist()
    size = int(2 * centre)
    start = time.perf_counter()
    mask = rasterize_polygons([xy], (size, size))
    elapsed = time.perf_counter() - start
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - centre) ** 2 + (xx - centre) ** 2 <= TRACED_RADIUS**2
    assert (mask != disc).sum() < 2 * np.pi * TRACED_RADIUS * 0.05  # only boundary pixels may differ
    assert elapsed < RASTERIZE_SECONDS, f"{elapsed:.2f} s to rasterize one traced contour"


def test_derive_fov_on_disc_image():
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 32) ** 2 + (xx - 32) ** 2 < 26**2
    rng = np.random.default_rng(0)
    image = np.where(disc, rng.uniform(0.3, 0.9, (64, 64)), rng.uniform(0, 0.02, (64, 64)))
    image[30:34, 10:50] *= np.where(disc[30:34, 10:50], 0.02, 1)  # a dark "vessel" inside the disc stays in
    fov = derive_fov(np.repeat(image[None], 3, 0).astype(np.float32))
    iou = (fov & disc).sum() / (fov | disc).sum()
    assert fov.dtype == np.uint8 and iou > 0.95
    assert derive_fov(np.full((3, 16, 16), 0.5, np.float32)).all()  # no dark border -> whole image


def test_synthetic_layout_calls_generator_lazily(tmp_path, monkeypatch):
    import sys
    import types

    calls = []

    def ensure_dataset(synthetic_cfg, root):
        calls.append((synthetic_cfg.n_images, Path(root)))
        folder = Path(root) / "generated"
        for i in range(synthetic_cfg.n_images):
            write_image(folder / "images" / f"img{i}.png", seed=i)
            write_mask(folder / "masks" / f"img{i}.png")
        return folder

    fake = types.ModuleType("medtune.data.synthetic")
    fake.ensure_dataset = ensure_dataset
    monkeypatch.setitem(sys.modules, "medtune.data.synthetic", fake)
    samples = discover(DataCfg(path=str(tmp_path), layout="synthetic", synthetic={"n_images": 3}))
    assert calls == [(3, tmp_path)]
    assert [s.id for s in samples] == ["images/img0", "images/img1", "images/img2"]


def test_polygon_json_keeps_each_expression_as_its_own_target(tmp_path):
    # Sa2VA's annotations.json: one entry per image, one mask (a list of polygons) per referring expression
    root = tmp_path / "data"
    write_image(root / "a.png")
    left, right = [[2, 2, 10, 2, 10, 10, 2, 10]], [[20, 20, 28, 20, 28, 28, 20, 28]]
    entries = [{"image": "a.png", "mask": [left, right], "text": ["the left box", "the right box"]}]
    (root / "annotations.json").write_text(json.dumps(entries))
    cfg = DataCfg(path=str(root))
    [sample] = discover(cfg)
    assert [t.text for t in sample.targets] == ["the left box", "the right box"]
    loaded = load_sample(sample, cfg)
    targets = loaded.target_masks()
    assert targets.shape[0] == 2 and loaded.target_texts() == ["the left box", "the right box"]
    assert targets[0][5, 5] == 1 and targets[0][24, 24] == 0  # not a union
    assert targets[1][24, 24] == 1 and targets[1][5, 5] == 0
    assert (loaded.mask == (targets[0] | targets[1])).all()  # the union stays for mask-only tasks

    entries[0]["text"] = ["only one", "two", "three"]
    (root / "annotations.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match="3 expressions in 'text' but 2 masks"):
        discover(cfg)
