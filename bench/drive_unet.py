"""DRIVE benchmark (not a test): the U-Net preset trained on DRIVE training, threshold calibrated on a validation
split carved from it, evaluated on the 20 DRIVE test images inside the FOV (pooled over all test pixels).

    .venv/bin/python bench/drive_unet.py [overrides...]      # e.g. optim.max_steps=3000

Prints test Dice / AUC / sensitivity, wall time and peak RSS; copy the line into bench/RESULTS.md.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DRIVE = REPO.parent / "shared" / "data" / "DRIVE"


def main(argv: list[str]) -> None:
    from medtune.config import load_config
    from medtune.evaluate import evaluate_run, format_summary
    from medtune.train.sft import train

    if not DRIVE.is_dir():
        sys.exit(f"{DRIVE} not found: the DRIVE benchmark needs ../shared/data/DRIVE")
    cfg = load_config(REPO / "configs" / "drive_unet.yaml", [f"data.path={DRIVE}", *argv])
    started = time.perf_counter()
    run = train(cfg)
    train_s = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    train_cpu_s = usage.ru_utime + usage.ru_stime  # of this process's threads; wall time inflates on a shared machine
    summary = evaluate_run(run)
    total_s = time.perf_counter() - started
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    pooled = summary["pooled@cal"]
    print(format_summary(summary))
    result = {
        "run": str(run), "threads": torch.get_num_threads(), "max_steps": cfg.optim.max_steps,
        "test_dice": pooled["dice"], "test_auc": pooled["auc"], "test_sensitivity": pooled["recall"],
        "test_specificity": pooled["specificity"], "threshold": summary["threshold"],
        "train_minutes": round(train_s / 60, 1), "train_cpu_minutes": round(train_cpu_s / 60, 1),
        "total_minutes": round(total_s / 60, 1), "peak_rss_gb": round(rss_gb, 2),
    }
    print(json.dumps(result, indent=2))
    (Path(run) / "bench_result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
