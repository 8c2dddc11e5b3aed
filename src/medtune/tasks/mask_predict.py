"""Prediction files of the tasks whose outputs are masks: binary masks, probability maps and overlays as PNG, at the
run's calibrated threshold (``masks``: one mask per image; ``segvlm``: one mask per [SEG] of the generated answer)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from medtune.data.loading import fov_diameter, load_sample, resample_to_native
from medtune.data.run_split import use_recorded_image_max
from medtune.data.types import DataError, Sample
from medtune.inference import predict_prob, uses_whole_image
from medtune.runs.load import default_device, load_run_model
from medtune.tasks.base import PredictRequest

log = logging.getLogger("medtune")


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


def predict_masks(req: PredictRequest) -> list[str]:
    """One mask per image (task ``masks``): STEM_{mask,prob,overlay}.png and predict.json in ``req.out_dir``."""
    req.refuse("mask", prompt="segmenting VLM runs (family segvlm)", question="instruction-tuned VLM runs")
    run_dir, out_dir, images, threshold, box = req.run_dir, req.out_dir, req.images, req.threshold, req.box
    device = default_device()
    cfg, model, _ = load_run_model(run_dir, req.checkpoint, device)
    use_recorded_image_max(cfg, run_dir)  # 16-bit images scaled like the training data
    if cfg.model.prompt == "box" and box is None:
        raise DataError("this run was trained with box prompts: pass --box x1,y1,x2,y2 (pixels of the input image)")
    thr, source = (threshold, "given") if threshold is not None else calibrated_threshold(run_dir)
    target_diameter = None
    if cfg.data.scale_norm.enabled:
        scale_file = run_dir / "scale.json"
        if not scale_file.exists():
            raise DataError(f"{scale_file} missing: the run used scale normalisation but recorded no target")
        target_diameter = float(json.loads(scale_file.read_text())["target_fov_diameter"])
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in tqdm([Path(p) for p in images], desc="predict", unit="img"):
        if not path.is_file():
            raise DataError(f"{path}: no such image file")
        sample = load_sample(Sample(id=path.stem, image=path), cfg.data)  # FOV derived as in training
        image, fov = sample.image, sample.fov
        if box is not None:  # inference takes the prompt box from the "mask"'s bounding box
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            sample.mask[:] = 0
            sample.mask[y1:y2, x1:x2] = 1
        if target_diameter is not None and not uses_whole_image(cfg):
            # the model learned vessel widths at the training scale: resample like training, map back
            scaled = load_sample(Sample(id=path.stem, image=path), cfg.data,
                                 scale=target_diameter / max(fov_diameter(fov), 1.0))
            prob = resample_to_native(predict_prob(model, scaled, cfg, device), fov.shape) * fov
        else:
            prob = predict_prob(model, sample, cfg, device) * fov
        binary = (prob >= thr).astype(np.uint8)
        stem = out_dir / path.stem
        Image.fromarray(binary * 255).save(f"{stem}_mask.png")
        Image.fromarray((prob * 255).round().astype(np.uint8)).save(f"{stem}_prob.png")
        Image.fromarray(overlay(image, binary)).save(f"{stem}_overlay.png")
        written.append(Path(f"{stem}_mask.png"))
    (out_dir / "predict.json").write_text(json.dumps({"run": str(run_dir), "threshold": thr, "threshold_source": source,
                                                       "images": [str(p) for p in images]}, indent=2))
    return [f"{len(written)} masks (+ probability maps, overlays) written to {out_dir} (threshold {thr:.3f}: {source})"]
