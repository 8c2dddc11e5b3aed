"""`medtune predict RUN IMAGES... --out DIR`: binary masks, probability maps and overlays as PNG."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from medtune.data.io import derive_fov, read_image
from medtune.data.types import DataError, LoadedSample
from medtune.evaluate import default_device, load_run_model
from medtune.inference import predict_prob


def calibrated_threshold(run_dir: Path) -> tuple[float, str]:
    for split in ("test", "val"):
        path = run_dir / "eval" / split / "calibration.json"
        if path.exists():
            return float(json.loads(path.read_text())["threshold"]), f"calibrated on val ({path})"
    return 0.5, "0.5 (run `medtune eval RUN` first to calibrate a threshold on val)"


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    rgb = image if image.shape[0] == 3 else np.repeat(image, 3, axis=0)
    rgb = (rgb.transpose(1, 2, 0) * 255).astype(np.float32)
    tint = np.array([0, 255, 0], dtype=np.float32)
    rgb[mask > 0] = 0.5 * rgb[mask > 0] + 0.5 * tint
    return rgb.clip(0, 255).astype(np.uint8)


def predict_images(run_dir: str | Path, images: list[str | Path], out_dir: str | Path, checkpoint: str = "best",
                   threshold: float | None = None, box: tuple[float, float, float, float] | None = None) -> list[Path]:
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    device = default_device()
    cfg, model, _ = load_run_model(run_dir, checkpoint, device)
    if cfg.model.prompt == "box" and box is None:
        raise DataError("this run was trained with box prompts: pass --box x1,y1,x2,y2 (pixels of the input image)")
    thr, source = (threshold, "given") if threshold is not None else calibrated_threshold(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in tqdm([Path(p) for p in images], desc="predict", unit="img"):
        if not path.is_file():
            raise DataError(f"{path}: no such image file")
        image = read_image(path, cfg.data.channels)
        fov = derive_fov(image) if cfg.data.derive_fov else np.ones(image.shape[1:], np.uint8)
        mask = np.zeros(image.shape[1:], np.uint8)
        if box is not None:  # inference takes the prompt box from the "mask"'s bounding box
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            mask[y1:y2 + 1, x1:x2 + 1] = 1
        sample = LoadedSample(id=path.stem, image=image, mask=mask, fov=fov)
        prob = predict_prob(model, sample, cfg, device) * fov
        binary = (prob >= thr).astype(np.uint8)
        stem = out_dir / path.stem
        Image.fromarray(binary * 255).save(f"{stem}_mask.png")
        Image.fromarray((prob * 255).round().astype(np.uint8)).save(f"{stem}_prob.png")
        Image.fromarray(overlay(image, binary)).save(f"{stem}_overlay.png")
        written.append(Path(f"{stem}_mask.png"))
    (out_dir / "predict.json").write_text(json.dumps({"run": str(run_dir), "threshold": thr, "threshold_source": source,
                                                       "images": [str(p) for p in images]}, indent=2))
    return written
