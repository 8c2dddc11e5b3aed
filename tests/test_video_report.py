"""The video report pieces on hand-built run folders (a config and an evaluation written by tasks/video_eval from
synthetic probability maps): the Dice-over-time plot, the per-video rows, the page, and compare paired over videos."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medtune.config import build_config
from medtune.report import plots
from medtune.report.compare import compare_runs, compare_video_runs
from medtune.report.page import read_per_image
from medtune.report.video import (
    dice_over_time_figures,
    per_video_table,
    read_per_frame,
    video_order,
    write_video_report,
)
from medtune.tasks.video_eval import evaluate_videos

SIZE = 24
N_VIDEOS = 8  # >= 6 pairs: the Wilcoxon test can reach p < 0.05


def video(seed: int, steady: bool, n_frames: int = 8, annotate_every: int = 2):
    """A bar drifting right one pixel per frame. A steady model follows it (and misses its last column in video 0,
    so videos differ); an unsteady one jumps by a random offset every frame."""
    rng = np.random.default_rng(seed)
    probs, gts = {}, {}
    for t in range(n_frames):
        gt = np.zeros((SIZE, SIZE), np.uint8)
        gt[8:12, 2 + t:10 + t] = 1
        shift = 0 if steady else int(rng.integers(-3, 4))
        prob = np.zeros((SIZE, SIZE), np.float32)
        prob[8:12, 2 + t + shift:10 + t + shift - (1 if seed == 0 else 0)] = 0.9
        probs[t] = prob
        if t % annotate_every == 0:
            gts[t] = gt
    return probs, gts


def write_video_run(root: Path, name: str, steady: bool) -> Path:
    run = root / name
    cfg = build_config({}, [f"run.name={name}", f"run.output_dir={root}", "data.layout=generic",
                            f"data.path={root / 'data'}"])
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)))
    preds = [(f"vid{k}", *video(k, steady), None) for k in range(N_VIDEOS)]
    evaluate_videos(preds, 0.5, run / "eval" / "test", n_boot=200,
                    meta={"task": "video", "run": str(run), "checkpoint": "best", "split": "test"})
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    return write_video_run(root, "unsteady", steady=False), write_video_run(root, "steady", steady=True)


def test_over_time_plot_marks_and_empty():
    assert plots.over_time_plot({"v": ([0, 1], [float("nan"), None])}, "t", "Dice") is None
    uri = plots.over_time_plot({"v": ([0, 2, 4], [0.5, 0.7, 0.6])}, "Dice over time", "Dice", marks={"v": [0, 2, 4]})
    assert uri.startswith("data:image/png;base64,")


def test_dice_over_time_and_per_video_rows(runs):
    _, steady = runs
    ev = steady / "eval" / "test"
    per_frame = read_per_frame(ev / "per_frame.csv")
    assert sorted(per_frame) == [f"vid{k}" for k in range(N_VIDEOS)]
    assert list(per_frame["vid1"]["frame"]) == list(range(8))
    assert list(per_frame["vid1"]["annotated"]) == [1, 0] * 4
    ids, cols = read_per_image(ev / "per_video.csv")
    order = video_order(ids, cols)
    assert ids[order[0]] == "vid0"  # the one video with a missed column is the worst
    figs = dice_over_time_figures(per_frame, [ids[i] for i in order])
    assert len(figs) == 1 and figs[0][0].startswith("Dice over time: vid0, ")
    header, rows = per_video_table(ids, cols, order)
    assert header[:3] == ["video", "dice@cal", "dice@t050"] and rows[0][0] == "vid0"
    assert rows[0][header.index("n_frames")] == "8" and rows[0][header.index("n_annotated")] == "4"


def test_video_report_page(runs):
    _, steady = runs
    out = write_video_report(steady, "test")
    text = out.read_text()
    assert "8 videos, 64 frames, 32 annotated" in text
    assert "per-video mean [95% CI]" in text and "resamples videos" in text
    assert "Per video, worst first" in text and text.count("<td class=\"l\">vid") == N_VIDEOS
    assert "Dice over time" in text and "change from the previous frame" in text
    assert text.count("data:image/png;base64,") >= 3  # training loss, Dice over time, change over time


def test_compare_pairs_over_videos(runs, tmp_path):
    unsteady, steady = runs
    text = compare_video_runs([unsteady, steady], tmp_path / "cmp")
    assert "paired over 8 common video(s)" in text and "Per-video metrics" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.split()}
    assert lines["dice"].rstrip().endswith("better")
    assert lines["change_error"].rstrip().endswith("better")  # lower is better: the steady model's is 0
    assert "flicker ↓" in text
    assert (tmp_path / "cmp" / "compare.html").is_file()
    # the image comparison is untouched: it looks for per_image.csv, which a video run does not have
    with pytest.raises(FileNotFoundError, match="per_image.csv"):
        compare_runs([unsteady, steady])
