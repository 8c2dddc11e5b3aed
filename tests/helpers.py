"""Shared test utilities: tiny configs that train in seconds on CPU."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from medtune.config import build_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
NO_BROWSER = ("no Chromium found (looked for " + ", ".join(BROWSERS) + "); install it with `apt-get install chromium` "
              "(`make test` installs it when run as root)")


def find_chromium() -> str | None:
    """A Chromium binary for the browser tests, or None."""
    import shutil

    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found or Path("/usr/bin/chromium").exists():
        return found or "/usr/bin/chromium"
    return None


def tiny_cfg(tmp_path: Path, *overrides: str, steps: int = 6, name: str = "t"):
    """U-Net on the embedded synthetic vessels, a handful of steps."""
    return build_config({}, [
        f"run.name={name}", f"run.output_dir={tmp_path / 'runs'}", "run.seed=0",
        "data.layout=synthetic", f"data.path={tmp_path / 'data'}", "data.synthetic.n_images=8",
        "data.synthetic.size=64", "data.patch_size=32", "data.batch_size=4", "data.patches_per_image=2",
        "data.split.val_fraction=0.25", "data.split.test_fraction=0.25",
        "model.config={channels: [4, 8, 16], strides: [2, 2], num_res_units: 1}",
        f"optim.max_steps={steps}", "optim.warmup_steps=1", "optim.lr=0.01",
        f"train.eval_every={max(steps // 2, 1)}", f"train.save_every={steps}", "train.log_every=1",
        "train.trackers=[]", "eval.bootstrap=50", "eval.roi_size=32", *overrides,
    ])


def write_generic(root: Path, n: int = 4, size: int = 32, seed: int = 0, mask_suffix: str = "") -> Path:
    """images/ + masks/ folder of random blobs."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(4, size - 12, 2)
        mask[y:y + 8, x:x + 8] = 255
        image = (rng.random((size, size, 3)) * 80 + (mask[..., None] > 0) * 120).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"img{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"img{i}{mask_suffix}.png")
    return root


def assert_logs_mfu(run_dir: Path) -> None:
    """Every recipe and family logs MFU: FLOPs of its first step counted, a peak measured, mfu in (0, 1)."""
    import json

    from medtune.runs.files import read_metrics

    info = json.loads((run_dir / "utilisation.json").read_text())
    assert info["flops_per_image"] > 0 and info["peak"]["flops_per_s"] > 0
    logged = [r["mfu"] for r in read_metrics(run_dir) if "mfu" in r]
    assert logged and all(0 < m < 1 for m in logged)
