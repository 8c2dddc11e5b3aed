"""`medtune predict RUN IMAGES... --out DIR`: binary masks, probability maps and overlays as PNG."""
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


def predict_images(run_dir: str | Path, images: list[str | Path], out_dir: str | Path, checkpoint: str = "best",
                   threshold: float | None = None, box: tuple[float, float, float, float] | None = None,
                   prompt: str | list[str] | None = None) -> list[Path]:
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    device = default_device()
    cfg, model, _ = load_run_model(run_dir, checkpoint, device)
    use_recorded_image_max(cfg, run_dir)  # 16-bit images scaled like the training data
    if cfg.task_kind() == "segvlm":
        return predict_segvlm(cfg, model, run_dir, images, out_dir, threshold, prompt, device)
    if prompt is not None:
        raise DataError(f"--prompt is for segmenting VLM runs (family segvlm); {run_dir} is a "
                        f"{cfg.model.family} run")
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
    return written


def generated_masks(model, cfg, image: np.ndarray, questions: list[str], device
                    ) -> tuple[list[str], list[np.ndarray]]:
    """(answers, per answer the probabilities [K_k, H, W] at the image's resolution): greedy generation turn by turn
    (one question per turn, the image in the first), then one mask per [SEG] of the generated answers, decoded from
    the hidden states of a forward over the generated conversation."""
    import torch
    import torch.nn.functional as F

    size = int(cfg.data.patch_size)
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    h, w = x.shape[-2:]
    resized = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():  # inference: the model's own mask forward is differentiable for training's sake
        answers, logits = model.generate_turns(resized, questions, max_new_tokens=cfg.task.max_new_tokens)
    probs = []
    for turn in logits:
        if turn.shape[0] == 0:
            probs.append(np.zeros((0, h, w), dtype=np.float32))
            continue
        up = F.interpolate(turn[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
        probs.append(torch.sigmoid(up).cpu().numpy())
    return answers, probs


def predict_segvlm(cfg, model, run_dir: Path, images: list[str | Path], out_dir: Path, threshold: float | None,
                   prompt: str | list[str] | None, device) -> list[Path]:
    """Generated answers with one mask per [SEG]: `STEM_answer.txt`, `STEM_seg{k}_{mask,prob,overlay}.png` (k counts
    the [SEG] of all answers in order), and predict.json listing every answer and the images whose answers held no
    [SEG]. Several prompts are asked in one conversation, one turn each (as the model was trained on several
    referring expressions of one image)."""
    from medtune.tasks.segvlm import question as task_question

    thr, source = (threshold, "given") if threshold is not None else calibrated_threshold(run_dir)
    questions = [prompt] if isinstance(prompt, str) else list(prompt or []) or [task_question(None, cfg)]
    out_dir.mkdir(parents=True, exist_ok=True)
    written, answers, turns, without_seg = [], {}, {}, []
    for path in tqdm([Path(p) for p in images], desc="predict", unit="img"):
        if not path.is_file():
            raise DataError(f"{path}: no such image file")
        sample = load_sample(Sample(id=path.stem, image=path), cfg.data)
        turn_answers, turn_probs = generated_masks(model, cfg, sample.image, questions, device)
        answers[str(path)] = "\n".join(turn_answers)
        stem = out_dir / path.stem
        Path(f"{stem}_answer.txt").write_text(answers[str(path)] + "\n")
        k = 0
        turns[str(path)] = []
        for q, answer, probs in zip(questions, turn_answers, turn_probs):
            probs = probs * sample.fov  # as for the other families: nothing outside the field of view
            files = []
            for prob in probs:
                binary = (prob >= thr).astype(np.uint8)
                Image.fromarray(binary * 255).save(f"{stem}_seg{k}_mask.png")
                Image.fromarray((prob * 255).round().astype(np.uint8)).save(f"{stem}_seg{k}_prob.png")
                Image.fromarray(overlay(sample.image, binary)).save(f"{stem}_seg{k}_overlay.png")
                written.append(Path(f"{stem}_seg{k}_mask.png"))
                files.append(f"{path.stem}_seg{k}_mask.png")
                k += 1
            turns[str(path)].append({"question": q, "answer": answer, "masks": files})
        if k == 0:
            without_seg.append(str(path))
    if without_seg:
        log.warning("%d of %d images got answers without %s, so no mask: %s", len(without_seg), len(answers),
                    cfg.model.vlm.seg_token, without_seg[:5])
    (out_dir / "predict.json").write_text(json.dumps({
        "run": str(run_dir), "question": questions[0] if len(questions) == 1 else questions, "threshold": thr,
        "threshold_source": source, "answers": answers, "turns": turns, "answers_without_seg": without_seg,
        "no_seg_rate": len(without_seg) / max(len(answers), 1)}, indent=2))
    return written
