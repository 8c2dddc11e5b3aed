"""Loading time per image of BUSI as Sa2VA-style polygon annotations (not a test): the segmenting VLM's data path.

    OMP_NUM_THREADS=1 .venv/bin/python bench/polygon_loading.py [N_IMAGES]

Writes, in a temporary folder, a polygon_json data set of the first N/2 benign and N/2 malignant BUSI images
(symlinks to ../shared/data/BUSI) whose lesion masks are traced into polygons at full resolution (as exported
annotations are: hundreds to thousands of vertices), then times ``load_all`` (read, rasterise the polygons).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.measure import find_contours

from medtune.config import DataCfg
from medtune.data.layouts import discover
from medtune.data.loading import load_all

BUSI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "BUSI"
MIN_POINTS = 3


def write_polygon_set(out: Path, n: int) -> None:
    (out / "images").mkdir(parents=True)
    entries = []
    for cls in ("benign", "malignant"):
        for i in range(1, n // 2 + 1):
            mask = np.array(Image.open(BUSI / cls / f"{cls} ({i})_mask.png")) > 0
            polygons = [c[:, ::-1].ravel().round(1).tolist() for c in find_contours(mask.astype(float), 0.5)
                        if len(c) >= MIN_POINTS]
            (out / "images" / f"{cls}_{i}.png").symlink_to(BUSI / cls / f"{cls} ({i}).png")
            entries.append({"image": f"images/{cls}_{i}.png", "mask": [polygons], "text": ["the breast lesion"]})
    (out / "annotations.json").write_text(json.dumps(entries))


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    if not BUSI.is_dir():
        sys.exit(f"{BUSI} not found (see ../shared/data/README.md)")
    with tempfile.TemporaryDirectory() as tmp:
        write_polygon_set(Path(tmp), n)
        cfg = DataCfg(path=tmp, layout="polygon_json", channels=3, derive_fov=False)
        samples = discover(cfg)
        start = time.perf_counter()
        load_all(samples, cfg)
        elapsed = time.perf_counter() - start
    print(f"| {len(samples)} images | {elapsed / len(samples):.3f} s/image | {len(samples) / elapsed:.1f} images/s |")


if __name__ == "__main__":
    main()
