"""Evaluation of a video task from per-video probability maps: calibrate the threshold on the validation videos, then
measure a split at 0.5 and at the calibrated threshold, per frame, per video and pooled.

Writes to the evaluation folder (RUN/eval/<split>/): summary.json, per_video.csv (one row per video, each metric at
``@t050`` and ``@cal``), per_frame.csv (one row per predicted frame: area, change from the previous frame, and on
annotated frames Dice / J / F / clDice) and calibration.json. The summary has the shape of the image tasks'
(``medtune.tasks.mask_eval``): pooled@t050 / pooled@cal blocks (all annotated pixels of all videos), and per-video
means with bootstrap CIs over videos in per_video@t050 / per_video@cal (where images have per_image@...), so the
report and compare code reads both with the unit ("image" / "video") as the only difference.

Nothing here runs a model: the video task turns its model's propagation into ``(video_id, probs, gts, fov)`` tuples
(one per video; ``probs`` may be a lazy mapping, frames are read in order) and calls these functions.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

import numpy as np

from medtune.atomic import write_csv_atomic, write_json_atomic
from medtune.calibration import calibrate
from medtune.errors import DataError
from medtune.video_metrics import BOUND_TH, VIDEO_METRICS, pool_videos, pooled_counts, video_scores

log = logging.getLogger("medtune")

# (video_id, probs: frame -> float [H,W], gts: frame -> binary [H,W] (annotated frames), fov: [H,W] | frame -> [H,W]
# | None), optionally followed by columns of the video's row in per_video.csv (a segmenting VLM's answer)
VideoPrediction = tuple[str, Mapping[int, np.ndarray], Mapping[int, np.ndarray], object] | tuple[
    str, Mapping[int, np.ndarray], Mapping[int, np.ndarray], object, Mapping[str, object]]

PER_FRAME_METRICS = ["area", "change", "dice", "j", "f", "cldice"]
# the count columns of per_video.csv (the same at both thresholds, or threshold-independent)
VIDEO_COUNTS = ["n_frames", "n_annotated", "n_empty_gt", "n_pairs", "n_flicker_pairs"]
TAGS = ("t050", "cal")
# calibration strategies that mean no threshold was fitted (no validation frames; a threshold given by the caller)
UNCALIBRATED = ("none", "given")
SUMMARY_LINES = ["dice", "jf", "j", "f", "cldice", "change_error", "pred_change", "gt_change", "flicker"]


def _video_error(video_id: str, err: Exception) -> DataError:
    return DataError(f"video {video_id}: {err}")


def calibrate_videos(predictions: Iterable[VideoPrediction], strategy: str = "max_dice", beta: float = 1.0,
                     target_recall: float = 0.9, prompt_frames: Mapping[str, Collection[int]] | None = None) -> dict:
    """The threshold from the validation videos' annotated frames (``medtune.calibration.calibrate``: pooled counts
    over all their pixels, the same rule as the image tasks). Frames in ``prompt_frames[video_id]`` (the ones whose
    mask prompted the model) are left out, as in evaluation. No validation video: threshold 0.5, strategy "none"."""
    probs, gts, fovs = [], [], []
    n_videos = 0
    for video_id, video_probs, video_gts, fov, *_ in predictions:
        n_videos += 1
        skip = set((prompt_frames or {}).get(video_id, ()))
        for t in sorted(video_gts):
            if t in skip:
                continue
            if t not in video_probs:
                raise _video_error(video_id, f"ground truth for frame {t} but no prediction")
            probs.append(np.asarray(video_probs[t]))
            gts.append(np.asarray(video_gts[t]))
            fovs.append(fov.get(t) if isinstance(fov, Mapping) else fov)
    if not probs:
        log.warning("no annotated validation frames: the calibrated threshold is 0.5")
        return {"threshold": 0.5, "strategy": "none", "met": False, "n_videos": n_videos, "n_frames": 0,
                "note": "no annotated validation frames: threshold 0.5"}
    calib = calibrate(probs, gts, fovs, strategy=strategy, beta=beta, target_recall=target_recall)
    return {**calib, "n_videos": n_videos, "n_frames": len(probs)}


def score_videos(predictions: Iterable[VideoPrediction], threshold: float, n_boot: int = 1000, seed: int = 0,
                 bound_th: float = BOUND_TH, prompt_frames: Mapping[str, Collection[int]] | None = None
                 ) -> tuple[list[dict], list[dict], dict]:
    """(per-video rows, per-frame rows, summary blocks) at 0.5 and at ``threshold``.

    Rows carry ``id`` (the video id) and each metric as ``<metric>@t050`` / ``<metric>@cal``; blocks are
    pooled@t050 / pooled@cal (``pooled_counts``) and per_video@t050 / per_video@cal (``pool_videos``: CIs over
    videos). A video id given twice, or an error in one video's frames, is one line naming the video."""
    video_rows: list[dict] = []
    frame_rows: list[dict] = []
    scores: dict[str, list[dict]] = {tag: [] for tag in TAGS}
    seen: set[str] = set()
    for video_id, probs, gts, fov, *columns in predictions:
        video_id = str(video_id)
        if video_id in seen:
            raise DataError(f"video {video_id} is listed twice; each video must be evaluated once")
        seen.add(video_id)
        exclude = (prompt_frames or {}).get(video_id, ())
        try:
            by_tag = {tag: video_scores(probs, gts, thr, fov=fov, bound_th=bound_th, exclude=exclude)
                      for tag, thr in zip(TAGS, (0.5, threshold))}
        except ValueError as err:
            raise _video_error(video_id, err) from None
        if by_tag["cal"]["n_annotated"] == 0:
            log.warning("video %s has no scored annotated frame: it has no Dice, J or F", video_id)
        row: dict = {"id": video_id, **(columns[0] if columns else {}), **{k: by_tag["cal"][k] for k in VIDEO_COUNTS}}
        for tag in TAGS:
            row.update({f"{m}@{tag}": by_tag[tag][m] for m in VIDEO_METRICS})
            scores[tag].append(by_tag[tag])
        video_rows.append(row)
        for f050, fcal in zip(by_tag["t050"]["per_frame"], by_tag["cal"]["per_frame"]):
            frame = {"id": video_id, "frame": fcal["frame"], "annotated": int(fcal["annotated"])}
            frame.update({f"{m}@t050": f050[m] for m in PER_FRAME_METRICS})
            frame.update({f"{m}@cal": fcal[m] for m in PER_FRAME_METRICS})
            frame_rows.append(frame)
    blocks = {}
    for tag in TAGS:
        blocks[f"pooled@{tag}"] = pooled_counts(scores[tag]) if scores[tag] else {}
    for tag in TAGS:
        blocks[f"per_video@{tag}"] = pool_videos(scores[tag], n_boot=n_boot, seed=seed)
    return video_rows, frame_rows, blocks


def evaluate_videos(predictions: Iterable[VideoPrediction], threshold: float, out_dir: str | Path,
                    calibration: dict | None = None, n_boot: int = 1000, seed: int = 0, bound_th: float = BOUND_TH,
                    prompt_frames: Mapping[str, Collection[int]] | None = None, meta: dict | None = None) -> dict:
    """Score the videos at 0.5 and at ``threshold`` and write summary.json, per_video.csv, per_frame.csv (and
    calibration.json when ``calibration`` is given, as ``calibrate_videos`` returns it) into ``out_dir``, each
    written whole or not at all. ``meta`` goes to the top of the summary (task, run, checkpoint, split, data, ...:
    what the image tasks' summaries carry). Returns the summary."""
    video_rows, frame_rows, blocks = score_videos(predictions, threshold, n_boot, seed, bound_th, prompt_frames)
    if not video_rows:
        raise DataError(f"no video to evaluate for {out_dir}: the split holds no video")
    calibration = calibration or {"threshold": float(threshold), "strategy": "given",
                                  "note": "threshold given, not calibrated"}
    summary = {
        **(meta or {}),
        "unit": "video",
        "n_videos": len(video_rows),
        "n_frames": sum(r["n_frames"] for r in video_rows),
        "n_annotated_frames": sum(r["n_annotated"] for r in video_rows),
        "threshold": float(threshold),
        "bound_th": bound_th,
        "calibration": {k: v for k, v in calibration.items() if k != "curve"},
        **blocks,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out / "per_video.csv", video_rows)
    write_csv_atomic(out / "per_frame.csv", frame_rows)
    write_json_atomic(out / "calibration.json", calibration)
    write_json_atomic(out / "summary.json", summary)  # last: a summary means the tables beside it are complete
    return summary


def _ci(c: dict | None) -> str | None:
    if not c or c.get("mean") is None or not math.isfinite(float(c["mean"])):
        return None
    text = f"{c['mean']:.4f}  95% CI [{c['lo']:.4f}, {c['hi']:.4f}]"
    return text + (f"  ({c['n_nan']} NaN)" if c.get("n_nan") else "")


def format_summary(summary: dict) -> str:
    """What `medtune eval` prints for a video run: per threshold the pooled overlap over all annotated pixels, then
    per-video means with CIs over videos (Dice, J&F, clDice, temporal stability)."""
    calib = summary.get("calibration") or {}
    head = (f"{summary.get('run', '?')}  [{summary.get('split', '?')}, {summary['n_videos']} videos, "
            f"{summary['n_frames']} frames ({summary['n_annotated_frames']} annotated), "
            f"checkpoint {summary.get('checkpoint', '-')}]")
    lines = [head, *([f"data: {summary['data']}"] if summary.get("data") else []),
             f"calibrated threshold {summary['threshold']:.3f} ({calib.get('strategy')}, fitted on val videos)"
             if calib.get("strategy") not in UNCALIBRATED else
             f"threshold {summary['threshold']:.3f} ({calib.get('note') or 'not calibrated'})"]
    for tag in TAGS:
        label = "0.5" if tag == "t050" else f"{summary['threshold']:.3f}"
        pooled = summary.get(f"pooled@{tag}") or {}
        lines.append(f"  threshold {label}: pooled over annotated frames " + "  ".join(
            f"{k} {pooled[k]:.4f}" for k in ("dice", "iou", "precision", "recall")
            if pooled.get(k) is not None and math.isfinite(pooled[k])))
        per = summary.get(f"per_video@{tag}") or {}
        for m in SUMMARY_LINES:
            text = _ci(per.get(m))
            if text:
                name = {"jf": "J&F", "j": "J", "f": "F"}.get(m, m)
                lines.append(f"      per-video {name:<13} {text}")
    lines.append("  CIs resample videos (frames of one run are not independent); change_* / flicker: temporal "
                 "stability, lower change_error is steadier")
    return "\n".join(lines)
