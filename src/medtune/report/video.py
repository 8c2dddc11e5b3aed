"""The report of a video run: the mask report's configuration, preflight and training sections, then metrics with CIs
over videos, one row per video (worst first), and per video Dice over time and the prediction's frame-to-frame
change, with the annotated frames marked.

Everything is read from the run folder (config.yaml, split.json, metrics.jsonl, preflight.json and eval/<split>/ as
``medtune.tasks.video_eval`` writes it: summary.json, per_video.csv, per_frame.csv, calibration.json); no data set
and no model is needed. The pieces are functions the video task's ``write_report`` calls (``write_video_report``)
or composes into a page of its own.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from medtune.report import plots
from medtune.report.html import _metrics_table, run_head, sort_worst_first
from medtune.report.page import (
    esc,
    eval_dir,
    fmt,
    img,
    metric_column,
    page,
    read_json,
    read_metric_csv,
    read_per_image,
    table,
)
from medtune.stats import LOWER_IS_BETTER
from medtune.video_metrics import VIDEO_METRICS

PER_VIDEO_COLUMNS = ["dice@cal", "dice@t050", "jf@cal", "j@cal", "f@cal", "cldice@cal", "change_error@cal",
                     "pred_change@cal", "gt_change@cal", "flicker@cal", "n_frames", "n_annotated"]
VIDEOS_PER_FIGURE = len(plots.COLORS)  # one colour per video line: more would repeat colours in one legend
LABELS = {"jf": "J&F", "j": "J (region)", "f": "F (boundary)"}


def read_per_frame(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """per_frame.csv -> {video id: {column: float array over its frames, in file order}}; 'nan' and empty cells NaN."""
    rows, fields = read_metric_csv(path, required=("id", "frame"))
    grouped: dict[str, list[dict]] = {}
    for r in rows:
        grouped.setdefault(r["id"], []).append(r)
    return {vid: {c: metric_column(rs, c) for c in fields} for vid, rs in grouped.items()}


def _chunks(ids: list[str], size: int) -> list[list[str]]:
    return [ids[k:k + size] for k in range(0, len(ids), size)]


def over_time_figures(per_frame: dict[str, dict[str, np.ndarray]], order: list[str], column: str, title: str,
                      ylabel: str, ylim: tuple[float, float] | None = None) -> list[tuple[str, str]]:
    """[(caption, data URI)]: ``column`` of per_frame.csv against the frame, one line per video, the annotated frames
    ticked along the bottom; videos in ``order`` (worst first), ``VIDEOS_PER_FIGURE`` to a figure."""
    out = []
    shown = [v for v in order if v in per_frame and column in per_frame[v]]
    for k, chunk in enumerate(_chunks(shown, VIDEOS_PER_FIGURE)):
        series = {v: (per_frame[v]["frame"], per_frame[v][column]) for v in chunk}
        marks = {v: per_frame[v]["frame"][per_frame[v]["annotated"] > 0] for v in chunk if "annotated" in per_frame[v]}
        n = len(shown)
        part = f" ({k * VIDEOS_PER_FIGURE + 1}-{k * VIDEOS_PER_FIGURE + len(chunk)} of {n})" if n > len(chunk) else ""
        uri = plots.over_time_plot(series, title + part, ylabel, marks=marks, ylim=ylim)
        if uri:
            out.append((f"{title}{part}: {', '.join(chunk)}", uri))
    return out


def dice_over_time_figures(per_frame: dict[str, dict[str, np.ndarray]], order: list[str],
                           at: str = "cal") -> list[tuple[str, str]]:
    """Dice on the annotated frames against the frame index (the Dice-over-time plot)."""
    return over_time_figures(per_frame, order, f"dice@{at}", "Dice over time", "Dice", ylim=(0.0, 1.02))


def change_over_time_figures(per_frame: dict[str, dict[str, np.ndarray]], order: list[str],
                             at: str = "cal") -> list[tuple[str, str]]:
    """The prediction's change from the previous frame (1 - Dice between consecutive predicted masks) on every
    frame: an image-by-image model's flicker shows as spikes between annotated frames."""
    return over_time_figures(per_frame, order, f"change@{at}", "prediction's change from the previous frame",
                             "change", ylim=(0.0, 1.02))


def video_order(ids: list[str], cols: dict[str, np.ndarray], at: str = "cal") -> list[int]:
    """Row indices worst Dice first (NaN last, ties by id)."""
    return sort_worst_first(cols.get(f"dice@{at}", np.full(len(ids), np.nan)), ids)


def per_video_table(ids: list[str], cols: dict[str, np.ndarray], order: list[int]) -> tuple[list[str], list[list]]:
    """(header, rows) of the per-video table, rows in ``order``; the compare and report pages share it."""
    shown = [c for c in PER_VIDEO_COLUMNS if c in cols]
    rows = [[ids[i]] + [fmt(cols[c][i]) if not c.startswith("n_") else _count(cols[c][i]) for c in shown]
            for i in order]
    return ["video"] + shown, rows


def _count(value: float) -> str:
    return str(int(value)) if math.isfinite(value) else "—"


def per_video_section(ids: list[str], cols: dict[str, np.ndarray], order: list[int]) -> str:
    header, rows = per_video_table(ids, cols, order)
    return ("<h2>Per video, worst first (by dice@cal)</h2>"
            '<p class="muted">Means over each video\'s annotated frames (@cal at the calibrated threshold, @t050 at '
            "0.5). change_error: mean |prediction's change − ground truth's change| between successive annotated "
            "frames (0: the mask moves exactly as the anatomy does); pred_change / gt_change: those changes "
            "(1 − Dice between the two frames' masks); flicker: the prediction's change between consecutive frames, "
            "annotated or not.</p>" + table(header, rows))


def video_metrics_section(summary: dict) -> str:
    thr = float(summary.get("threshold", 0.5))
    calib = summary.get("calibration") or {}
    lower = ", ".join(sorted(m for m in VIDEO_METRICS if m in LOWER_IS_BETTER))
    return (f"<h2>Metrics on {esc(summary.get('split', '?'))} ({esc(summary.get('n_videos', '?'))} videos, "
            f"{esc(summary.get('n_frames', '?'))} frames, {esc(summary.get('n_annotated_frames', '?'))} annotated)</h2>"
            f"<p>Calibrated threshold <b>{esc(fmt(thr, 3))}</b> ({esc(calib.get('strategy', '?'))}, fitted on the "
            "validation videos only). Pooled = all annotated pixels of all videos; per-video = mean over videos with "
            "a bootstrap 95% CI that resamples videos, not frames (frames of one run are not independent). "
            "j, f, jf: DAVIS region similarity J, boundary F (tolerance "
            f"{esc(summary.get('bound_th', '?'))} of the image diagonal) and J&amp;F; lower is better for "
            f"{esc(lower)}.</p>" + _metrics_table(summary, thr, unit="video", order=VIDEO_METRICS))


def _calibration_figure(calib: dict | None, threshold: float) -> str:
    if not (calib and calib.get("curve")):
        note = (calib or {}).get("note") or "calibration.json has none"
        return f'<h2>Threshold</h2><p class="muted">No threshold curve: {esc(note)}.</p>'
    uri = plots.threshold_plot(calib["curve"], threshold)
    return ("<h2>Threshold</h2>" + '<div class="figs">'
            + img(uri, "threshold-Dice curve", "Dice, precision and recall against the threshold over the annotated "
                  "frames of the validation videos; dashed: the chosen threshold") + "</div>")


def over_time_section(per_frame: dict[str, dict[str, np.ndarray]], order: list[str]) -> str:
    figs = dice_over_time_figures(per_frame, order) + change_over_time_figures(per_frame, order)
    if not figs:
        return '<h2>Over time</h2><p class="muted">per_frame.csv has no frames.</p>'
    return ("<h2>Over time</h2><p class=\"muted\">One line per video, worst Dice first; ticks along the bottom: the "
            "annotated frames (Dice exists only there).</p>"
            + '<div class="figs">' + "".join(img(uri, caption, caption) for caption, uri in figs) + "</div>")


def write_video_report(run_dir: str | Path, split: str = "test") -> Path:
    """Write RUN/report.html for a video run evaluated by ``medtune.tasks.video_eval`` and return its path."""
    from medtune.atomic import write_text_atomic
    from medtune.runs.files import load_run_config, read_metrics

    run_dir = Path(run_dir)
    ev = eval_dir(run_dir, split)
    cfg = load_run_config(run_dir)
    summary = read_json(ev / "summary.json")
    ids, cols = read_per_image(ev / "per_video.csv")
    order = video_order(ids, cols)
    per_frame = read_per_frame(ev / "per_frame.csv")
    threshold = float(summary.get("threshold", 0.5))
    body = [
        *run_head(run_dir, cfg, split, summary, f'{summary.get("n_videos", "?")} videos', read_metrics(run_dir)),
        video_metrics_section(summary),
        _calibration_figure(read_json(ev / "calibration.json"), threshold),
        per_video_section(ids, cols, order),
        over_time_section(per_frame, [ids[i] for i in order]),
    ]
    out = run_dir / "report.html"
    write_text_atomic(out, page(f"medtune report: {cfg.run.name}", "\n".join(body)))
    return out
