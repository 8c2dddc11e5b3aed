"""Near-duplicates never straddle train/val/test, and the guard for modalities the hash cannot separate."""
import shutil

import pytest
from helpers import write_generic

from medtune.config import build_config
from medtune.data.run_split import prepare_split


def _cfg(data, tmp_path, *extra):
    return build_config({}, [f"data.path={data}", "data.layout=generic", f"run.output_dir={tmp_path}",
                             "data.split.val_fraction=0.2", "data.split.test_fraction=0.3", *extra])


@pytest.mark.parametrize("seed", range(6))
def test_a_copy_lands_in_the_split_of_its_original(tmp_path, seed):
    data = write_generic(tmp_path / "d", n=12, size=64, seed=1)
    for name in ("images", "masks"):
        shutil.copy(data / name / "img3.png", data / name / "zcopy.png")
    run_dir = tmp_path / f"run{seed}"
    run_dir.mkdir()
    split = prepare_split(_cfg(data, tmp_path, f"data.split.seed={seed}"), run_dir).split
    where = {i: name for name, ids in split.items() for i in ids}
    assert where["images/zcopy"] == where["images/img3"]


def test_grouping_skipped_when_the_hash_cannot_tell_images_apart(tmp_path):
    data = write_generic(tmp_path / "d", n=10, size=64, seed=1)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.warns(RuntimeWarning, match="cannot tell these images apart"):
        split = prepare_split(_cfg(data, tmp_path, "data.duplicate_hash_distance=64"), run_dir).split
    assert split["train"] and split["test"]


def test_the_file_hash_matches_the_hash_of_the_decoded_image(tmp_path):
    """The split hashes files without read_image's float copy (JPEG from a reduced DCT decode); the result stays
    the hash of the image as training reads it: equal for 8-bit PNG, within 2 of 64 bits for JPEG, and exactly
    read_image's for files the fast path does not take (16-bit)."""
    import numpy as np
    from PIL import Image
    from test_data_pipeline import smooth_image

    from medtune.data.inspect import file_phash64, phash64
    from medtune.data.io import read_image

    def distance(path) -> int:
        return bin(file_phash64(path) ^ phash64(read_image(path, channels=1))).count("1")

    for seed in range(4):
        rgb = (smooth_image(seed, 600).transpose(1, 2, 0) * 255).astype(np.uint8)
        Image.fromarray(rgb).save(tmp_path / "a.png")
        Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
        Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=90)
        Image.fromarray(rgb[..., 1].astype(np.uint16) * 200).save(tmp_path / "wide.png")
        assert distance(tmp_path / "a.png") == 0 and distance(tmp_path / "grey.png") == 0
        assert distance(tmp_path / "wide.png") == 0
        assert distance(tmp_path / "a.jpg") <= 2
