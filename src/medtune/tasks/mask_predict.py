"""Prediction of the tasks whose outputs are masks: one image in memory (``mask_image``, what `medtune app` shows),
and the files `medtune predict` writes from it: binary masks, probability maps and overlays as PNG, at the run's
calibrated threshold (``masks``: one mask per image; ``segvlm``, in tasks/segvlm.py: one mask per [SEG] of the
generated answers)."""
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
from medtune.runs.load import LoadedRun, load_run
from medtune.tasks.base import ImagePrediction, PredictRequest

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


def _scale_target(run: LoadedRun) -> float | None:
    """The FOV diameter the run was trained at (scale normalisation), or None."""
    if not run.cfg.data.scale_norm.enabled:
        return None
    scale_file = run.run_dir / "scale.json"
    if not scale_file.exists():
        raise DataError(f"{scale_file} missing: the run used scale normalisation but recorded no target")
    return float(json.loads(scale_file.read_text())["target_fov_diameter"])


def read_input(run: LoadedRun, path: Path, **kwargs):
    """One image to predict on, read as the run's training data were (FOV, 16-bit scaling); DataError when missing."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such image file")
    use_recorded_image_max(run.cfg, run.run_dir)  # 16-bit images scaled like the training data
    return load_sample(Sample(id=Path(path).stem, image=Path(path)), run.cfg.data, **kwargs)  # FOV as in training


def mask_image(run: LoadedRun, path: Path, req: PredictRequest) -> ImagePrediction:
    """One mask run's probability map for one image (probs [1, H, W], native resolution, zero outside the FOV)."""
    cfg, model, device, box = run.cfg, run.model, run.device, req.box
    if cfg.model.prompt == "box" and box is None:
        raise DataError("this run was trained with box prompts: pass --box x1,y1,x2,y2 (pixels of the input image)")
    sample = read_input(run, path)
    image, fov = sample.image, sample.fov
    if box is not None:  # inference takes the prompt box from the "mask"'s bounding box
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        sample.mask[:] = 0
        sample.mask[y1:y2, x1:x2] = 1
        if not sample.mask.any():
            raise DataError(f"box {tuple(box)} lies outside the {image.shape[-1]}x{image.shape[-2]} image {path}")
    target_diameter = _scale_target(run)
    if target_diameter is not None and not uses_whole_image(cfg):
        # the model learned vessel widths at the training scale: resample like training, map back
        scaled = read_input(run, path, scale=target_diameter / max(fov_diameter(fov), 1.0))
        prob = resample_to_native(predict_prob(model, scaled, cfg, device), fov.shape) * fov
    else:
        prob = predict_prob(model, sample, cfg, device) * fov
    return ImagePrediction(image=image, probs=prob[None].astype(np.float32))


def mask_prompt_option(cfg) -> str | None:
    return "box" if cfg.model.prompt == "box" else None


def write_maps(stem: str, image: np.ndarray, prob: np.ndarray, thr: float) -> Path:
    binary = (prob >= thr).astype(np.uint8)
    Image.fromarray(binary * 255).save(f"{stem}_mask.png")
    Image.fromarray((prob * 255).round().astype(np.uint8)).save(f"{stem}_prob.png")
    Image.fromarray(overlay(image, binary)).save(f"{stem}_overlay.png")
    return Path(f"{stem}_mask.png")


def predict_masks(req: PredictRequest) -> list[str]:
    """One mask per image (task ``masks``): STEM_{mask,prob,overlay}.png and predict.json in ``req.out_dir``."""
    req.refuse("mask", prompt="segmenting VLM runs (family segvlm)", question="instruction-tuned VLM runs",
               frame="video runs (family sam2_video)")
    run = load_run(req.run_dir, req.checkpoint)
    if run.cfg.model.prompt == "box" and req.box is None:
        raise DataError("this run was trained with box prompts: pass --box x1,y1,x2,y2 (pixels of the input image)")
    thr, source = (req.threshold, "given") if req.threshold is not None else calibrated_threshold(req.run_dir)
    req.out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in tqdm([Path(p) for p in req.images], desc="predict", unit="img"):
        pred = mask_image(run, path, req)
        written.append(write_maps(str(req.out_dir / path.stem), pred.image, pred.probs[0], thr))
    (req.out_dir / "predict.json").write_text(json.dumps({
        "run": str(req.run_dir), "threshold": thr, "threshold_source": source,
        "images": [str(p) for p in req.images]}, indent=2))
    return [f"{len(written)} masks (+ probability maps, overlays) written to {req.out_dir} (threshold {thr:.3f}: "
            f"{source})"]

