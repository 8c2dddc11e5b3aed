"""Video evaluation from synthetic probability maps: files written, summary shaped like the image tasks', threshold
calibrated on validation videos, one-line errors naming the video."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from medtune.errors import DataError
from medtune.tasks.video_eval import calibrate_videos, evaluate_videos, format_summary, score_videos

SIZE = 24


def synthetic_video(seed: int, n_frames: int = 6, annotate_every: int = 2, vessel_prob: float = 0.35):
    """A bar drifting one pixel per frame; the model is under-confident (vessel ~0.35, background ~0.1), so a
    threshold below 0.35 beats 0.5, as with thin structures."""
    rng = np.random.default_rng(seed)
    probs, gts = {}, {}
    for t in range(n_frames):
        gt = np.zeros((SIZE, SIZE), np.uint8)
        gt[8:12, 2 + t:16 + t] = 1
        prob = np.where(gt > 0, vessel_prob, 0.1) + rng.uniform(-0.05, 0.05, gt.shape)
        probs[t] = prob.astype(np.float32)
        if t % annotate_every == 0:
            gts[t] = gt
    return probs, gts


def videos(seeds, **kw):
    return [(f"run{s}", *synthetic_video(s, **kw), None) for s in seeds]


def read_csv(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_calibration_on_validation_videos_finds_the_under_confident_threshold():
    calib = calibrate_videos(videos([1, 2]))
    assert 0.15 < calib["threshold"] <= 0.3
    assert calib["dice"] == pytest.approx(1.0)
    assert calib["n_videos"] == 2 and calib["n_frames"] == 6  # frames 0, 2, 4 of each
    assert calib["curve"]["thresholds"]  # the report's threshold plot reads it from calibration.json
    empty = calibrate_videos([])
    assert empty["threshold"] == 0.5 and empty["strategy"] == "none"


def test_evaluate_videos_writes_summary_and_tables(tmp_path):
    calib = calibrate_videos(videos([1, 2]))
    out = tmp_path / "eval" / "test"
    summary = evaluate_videos(videos([3, 4, 5]), calib["threshold"], out, calibration=calib, n_boot=200,
                              meta={"task": "video", "run": "RUN", "checkpoint": "best", "split": "test"})
    assert sorted(p.name for p in out.iterdir()) == ["calibration.json", "per_frame.csv", "per_video.csv",
                                                     "summary.json"]  # no temporary left behind
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["task"] == "video" and on_disk["unit"] == "video"
    assert (on_disk["n_videos"], on_disk["n_frames"], on_disk["n_annotated_frames"]) == (3, 18, 9)
    for tag in ("t050", "cal"):
        assert {"dice", "precision", "recall"} <= set(on_disk[f"pooled@{tag}"])
        assert on_disk[f"per_video@{tag}"]["dice"]["n"] == 3  # CIs over the 3 videos
    # under-confident maps: nothing reaches 0.5, everything the calibrated threshold
    assert summary["pooled@t050"]["recall"] == 0.0
    assert summary["per_video@cal"]["dice"]["mean"] == pytest.approx(1.0)
    assert summary["per_video@cal"]["jf"]["mean"] == pytest.approx(1.0)
    # the bar drifts, the prediction drifts with it: its change equals the ground truth's
    assert summary["per_video@cal"]["change_error"]["mean"] == pytest.approx(0.0)
    assert "curve" not in on_disk["calibration"] and "curve" in json.loads((out / "calibration.json").read_text())

    rows = read_csv(out / "per_video.csv")
    assert [r["id"] for r in rows] == ["run3", "run4", "run5"]
    assert float(rows[0]["dice@cal"]) == pytest.approx(1.0) and float(rows[0]["dice@t050"]) == 0.0
    frames = read_csv(out / "per_frame.csv")
    assert len(frames) == 18
    assert [int(r["annotated"]) for r in frames[:6]] == [1, 0, 1, 0, 1, 0]
    assert frames[1]["dice@cal"] == "nan" and float(frames[2]["dice@cal"]) == pytest.approx(1.0)
    # the report's reader takes the video table as it takes per_image.csv
    from medtune.report.page import read_per_image

    ids, cols = read_per_image(out / "per_video.csv")
    assert ids == ["run3", "run4", "run5"] and cols["dice@cal"] == pytest.approx([1.0, 1.0, 1.0])

    text = format_summary(on_disk)
    assert "3 videos, 18 frames (9 annotated)" in text and "per-video J&F" in text and "change_error" in text
    assert "calibrated threshold" in text and "fitted on val videos" in text
    given = format_summary({**on_disk, "calibration": {"strategy": "given", "note": "threshold given, not calibrated"}})
    assert "fitted on val" not in given and "threshold given, not calibrated" in given


def test_prompt_frames_are_not_scored():
    preds = videos([3])
    rows, frames, _ = score_videos(preds, 0.25, n_boot=10, prompt_frames={"run3": [0]})
    assert rows[0]["n_annotated"] == 2 and rows[0]["n_frames"] == 6
    assert frames[0]["annotated"] == 0  # the prompt frame is in the table, unscored
    assert calibrate_videos(preds, prompt_frames={"run3": [0]})["n_frames"] == 2


def test_bad_videos_are_one_line_naming_the_video(tmp_path):
    probs, gts = synthetic_video(1)
    with pytest.raises(DataError, match="video run1 is listed twice"):
        evaluate_videos([("run1", probs, gts, None)] * 2, 0.5, tmp_path)
    missing = {t: p for t, p in probs.items() if t != 2}
    with pytest.raises(DataError, match=r"video run1: ground truth for frame\(s\) \[2\] but no prediction"):
        evaluate_videos([("run1", missing, gts, None)], 0.5, tmp_path)
    with pytest.raises(DataError, match=r"video run1: ground truth for frame 2 but no prediction"):
        calibrate_videos([("run1", missing, gts, None)])
    with pytest.raises(DataError, match="no video to evaluate"):
        evaluate_videos([], 0.5, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written
