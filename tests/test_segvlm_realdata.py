"""A tiny segmenting VLM trained for a few steps on four real DRIVE images through the shipped config, then evaluated:
the whole segvlm pipeline (real image loading and FOV, [SEG] conversation, preflight, calibration, free generation)
on real data rather than synthetic shapes."""
from __future__ import annotations

import csv
import json

import pytest
from helpers import REPO, SHARED_DATA

N_IMAGES = 4


@pytest.mark.slow
@pytest.mark.realdata
def test_tiny_segvlm_trains_and_evaluates_on_drive(tmp_path):
    from medtune.config import load_config
    from medtune.evaluate import evaluate_run
    from medtune.train.sft import train

    drive = SHARED_DATA / "DRIVE"
    if not drive.is_dir():
        pytest.skip(f"{drive} not found: real-data test skipped (see ../shared/data/README.md)")
    # max_samples takes the first ids, all from DRIVE's test folder: a random split of the four gives train/val/test
    cfg = load_config(REPO / "configs" / "drive_segvlm.yaml", [
        f"data.path={drive}", f"run.output_dir={tmp_path}", f"data.max_samples={N_IMAGES}",
        "data.split.use_layout_split=false", "data.split.val_fraction=0.25", "data.split.test_fraction=0.25",
        "data.patch_size=64", "data.batch_size=2", "optim.max_steps=4", "optim.warmup_steps=1",
        "train.eval_every=4", "train.save_every=4", "train.log_every=1", "eval.bootstrap=50",
    ])
    run = train(cfg)
    assert json.loads((run / "preflight.json").read_text())["passed"] is True
    split = json.loads((run / "split.json").read_text())
    assert split["train"] and split["val"] and split["test"]
    assert len(split["train"]) + len(split["val"]) + len(split["test"]) == N_IMAGES

    summary = evaluate_run(run)
    with open(run / "eval" / "test" / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["id"] for r in rows) == sorted(split["test"])
    assert summary["n_images"] == len(split["test"])
    generation = summary["generation"]
    assert generation["n"] == len(split["test"]) and generation["seg_token"] == "[SEG]"
    assert 0.0 <= generation["no_seg_rate"] <= generation["wrong_seg_count_rate"] <= 1.0
    assert 0.0 <= summary["pooled@cal"]["dice"] <= 1.0
