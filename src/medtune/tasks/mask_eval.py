"""Evaluation of the tasks whose outputs are masks (``masks``, ``segvlm``): calibrate the threshold on val only, then
measure the split at 0.5 and at the calibrated threshold.

Writes RUN/eval/<split>/{per_image.csv, summary.json, calibration.json, probs.npz}. Pooled metrics (all test pixels
inside the FOV, the usual DRIVE protocol) and per-image means with bootstrap CIs are both reported. The task is an
argument (its ``target_probabilities``, ``free_generation`` and ``generation_summary``), so nothing here depends on
which task it is.

Tasks that generate text (the segmenting VLM) are measured twice: teacher-forced (the blocks at the top of
summary.json, per_image.csv) and in free generation, as `medtune predict` runs them (summary["free_generation"] with
the same blocks and CIs, per_image_free_generation.csv with each answer). Both use the one threshold calibrated on
the teacher-forced validation masks: free generation is what is deployed, and calibrating it on its own validation
answers would fit the threshold to the generation failures of one split.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medtune.atomic import write_csv_atomic, write_json_atomic
from medtune.calibration import calibrate
from medtune.config import Config
from medtune.data.loading import load_all, resample_to_native
from medtune.data.run_split import RunData, evaluated_split, evaluation_data, load_split_samples
from medtune.data.types import LoadedSample
from medtune.metrics import image_metrics, pooled_metrics
from medtune.models.base import SegModel
from medtune.runs.files import FREE_GENERATION_CSV
from medtune.runs.load import default_device, load_run_model
from medtune.stats import aggregate
from medtune.tasks.base import TargetPrediction, Task

log = logging.getLogger("medtune")

PER_IMAGE_METRICS = ["dice", "iou", "precision", "recall", "specificity", "accuracy", "auc", "cldice",
                     "betti0_error", "betti1_error", "hd95", "assd"]


def predictions(model: SegModel, task: Task, samples: list[LoadedSample], natives: list[LoadedSample], cfg: Config,
                device, desc: str, probabilities=None) -> list[TargetPrediction]:
    """One prediction per target (per image, or per referring expression), at each sample's native resolution
    (undoing scale normalisation), paired with its native ground truth. ``probabilities``: (model, sample, cfg,
    device) -> predictions; the task's teacher-forced ``target_probabilities`` unless given."""
    probabilities = probabilities or task.target_probabilities
    out = []
    for s, nat in tqdm(list(zip(samples, natives)), desc=desc, unit="img", leave=False):
        for p in probabilities(model, s, cfg, device):
            prob = p.prob
            if tuple(prob.shape) != tuple(nat.mask.shape):
                prob = resample_to_native(prob, nat.mask.shape)
            out.append(TargetPrediction(p.id, prob, p.ground_truth(nat), nat.fov, nat, p.target))
    return out


def native(cfg: Config, data: RunData, split: str, loaded: list[LoadedSample]) -> list[LoadedSample]:
    """Ground truth at native resolution: metrics are always measured where the annotator drew them."""
    if not cfg.data.scale_norm.enabled:
        return loaded
    return load_all([data.samples[i] for i in data.split[split]], cfg.data)


def evaluate_model(model: SegModel, task: Task, cfg: Config, run_dir: Path, split: str = "test", device=None,
                   strategy: str | None = None, checkpoint_name: str = "-", data_file: str | Path | None = None,
                   image_root: str | Path | None = None) -> tuple[dict, list[dict], dict, list, list[dict]]:
    """Calibrate on val, measure `split` (or, with ``data_file``, every sample of another data set in the run's
    layout). Returns (summary, per-image rows, calibration, probabilities, free-generation rows: per target, with the
    answer; empty unless the task generates text)."""
    device = device or default_device()
    strategy = strategy or cfg.eval.calibration
    data, external = evaluation_data(cfg, run_dir, split, data_file, image_root)

    # 1. threshold from val only
    if task.target_probabilities is None:
        raise ValueError(f"task {task.name!r} has no masks to calibrate; it is evaluated by its own evaluation")
    val = load_split_samples(cfg, data, "val", run_dir)
    if val and split != "val":
        val_preds = predictions(model, task, val, native(cfg, data, "val", val), cfg, device, "val")
        calib = calibrate([p.prob for p in val_preds], [p.mask for p in val_preds], [p.fov for p in val_preds],
                          strategy=strategy, beta=cfg.eval.beta, target_recall=cfg.eval.target_recall)
    else:
        calib = {"threshold": 0.5, "strategy": "none", "note": "no validation split: threshold 0.5"}
        log.warning("no validation images: the calibrated threshold is 0.5")
    threshold = float(calib["threshold"])

    # 2. the split (or the other data set) at 0.5 and at the calibrated threshold
    cfg, data, split, source = evaluated_split(cfg, data, split, external)
    test = load_split_samples(cfg, data, split, run_dir)
    test_natives = native(cfg, data, split, test)
    preds = predictions(model, task, test, test_natives, cfg, device, split)
    rows, blocks = scored(preds, threshold, cfg.eval.bootstrap)
    summary = {
        "task": task.name, "run": str(run_dir), "checkpoint": checkpoint_name, "split": split, **source,
        "n_images": len(rows), "threshold": threshold,
        "calibration": {k: v for k, v in calib.items() if k != "curve"}, **blocks,
    }

    # 3. text-generating tasks: the same measurement of what prediction does (free generation)
    free_rows: list[dict] = []
    if task.free_generation is not None:
        records: list[dict] = []

        def generated(model, sample, cfg, device):
            sample_preds, sample_records = task.free_generation(model, sample, cfg, device)
            records.extend(sample_records)
            return sample_preds

        free = predictions(model, task, test, test_natives, cfg, device, f"{split} (free generation)", generated)
        free_rows, free_blocks = scored(free, threshold, cfg.eval.bootstrap)
        free_rows = [{"id": row["id"], "n_seg": record["n_seg"], "answer": record["answer"], **row}
                     for row, record in zip(free_rows, records)]
        summary["free_generation"] = {
            "n_images": len(free_rows), "threshold": threshold,
            "threshold_source": "calibrated on the teacher-forced validation masks (as `medtune predict` uses it)",
            "empty_answer": "a target whose answer holds no segmentation token is scored as an empty mask",
            **free_blocks}
        if task.generation_summary is not None:
            summary["generation"] = task.generation_summary(records, cfg)
    return summary, rows, calib, [(p.id, p.prob) for p in preds], free_rows


def scored(preds: list[TargetPrediction], threshold: float, n_boot: int) -> tuple[list[dict], dict]:
    """Per-target metric rows at 0.5 and at ``threshold``, and the summary blocks: pooled@t050 / pooled@cal and the
    per-image means with bootstrap CIs per_image@t050 / per_image@cal."""
    probs, gts, fovs = [p.prob for p in preds], [p.mask for p in preds], [p.fov for p in preds]
    rows = []
    for p in preds:
        row = {"id": p.id}
        for tag, thr in (("t050", 0.5), ("cal", threshold)):
            m = image_metrics(p.prob, p.mask, p.fov, threshold=thr)
            row.update({f"{k}@{tag}": v for k, v in m.items()})
        rows.append(row)
    blocks = {
        "pooled@t050": pooled_metrics(probs, gts, fovs, threshold=0.5),
        "pooled@cal": pooled_metrics(probs, gts, fovs, threshold=threshold),
        "per_image@t050": aggregate([{k[:-5]: v for k, v in r.items() if k.endswith("@t050")} for r in rows],
                                    PER_IMAGE_METRICS, n_boot=n_boot),
        "per_image@cal": aggregate([{k[:-4]: v for k, v in r.items() if k.endswith("@cal")} for r in rows],
                                   PER_IMAGE_METRICS, n_boot=n_boot),
    }
    return rows, blocks


def evaluate_run(task: Task, run_dir: str | Path, split: str = "test", checkpoint: str = "best", device=None,
                 strategy: str | None = None, data_file: str | Path | None = None,
                 image_root: str | Path | None = None) -> dict:
    run_dir = Path(run_dir)
    device = device or default_device()
    cfg, model, ckpt = load_run_model(run_dir, checkpoint, device)
    summary, rows, calib, probs, free_rows = evaluate_model(model, task, cfg, run_dir, split, device, strategy,
                                                            ckpt.name, data_file, image_root)
    out = run_dir / "eval" / summary["split"]
    out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out / "per_image.csv", rows)
    if free_rows:
        write_csv_atomic(out / FREE_GENERATION_CSV, free_rows)
    write_json_atomic(out / "summary.json", summary)
    write_json_atomic(out / "calibration.json", calib)
    # probabilities kept (8-bit) so reports and comparisons can draw curves and overlays without re-running
    np.savez_compressed(out / "probs.npz", ids=np.array([i for i, _ in probs]),
                        **{f"p{k}": (p * 255).round().astype(np.uint8) for k, (_, p) in enumerate(probs)})
    return summary



def format_summary(summary: dict) -> str:
    lines = [f"{summary['run']}  [{summary['split']}, {summary['n_images']} images, checkpoint {summary['checkpoint']}]",
             *([f"data: {summary['data']}"] if summary.get("data") else []),
             f"calibrated threshold {summary['threshold']:.3f} ({summary['calibration'].get('strategy')}, fitted on val)"]
    free = summary.get("free_generation")
    if free:
        lines.append("  teacher-forced (the training conversation):")
    lines += _metric_lines(summary, summary["threshold"])
    gen = summary.get("generation")
    if free:
        lines.append("  free generation (what predict does; an answer without a segmentation token = an empty mask, "
                     "same threshold):")
        lines += _metric_lines(free, summary["threshold"])
    if gen:
        seg = gen["seg_token"]
        answers = (f"{gen['answers_without_seg_rate']:.1%} of {gen['n_answers']} answers without {seg}; "
                   if "n_answers" in gen else "")
        lines.append(f"  generated answers ({gen['n']} images): {answers}images with no {seg} at all "
                     f"{gen['no_seg_rate']:.1%}, with a wrong {seg} count {gen['wrong_seg_count_rate']:.1%}")
    return "\n".join(lines)


def _metric_lines(blocks: dict, threshold: float) -> list[str]:
    lines = []
    for tag in ("t050", "cal"):
        pooled = blocks[f"pooled@{tag}"]
        per = blocks[f"per_image@{tag}"]
        label = "0.5" if tag == "t050" else f"{threshold:.3f}"
        lines.append(f"  threshold {label}: pooled " + "  ".join(
            f"{k} {pooled[k]:.4f}" for k in ("dice", "iou", "precision", "recall", "specificity", "auc") if k in pooled))
        for k in ("dice", "cldice", "betti0_error", "betti1_error", "hd95"):
            if k in per and per[k].get("mean") is not None:
                c = per[k]
                lines.append(f"      per-image {k:<13} {c['mean']:.4f}  95% CI [{c['lo']:.4f}, {c['hi']:.4f}]"
                             + (f"  ({c['n_nan']} NaN)" if c.get("n_nan") else ""))
    return lines
