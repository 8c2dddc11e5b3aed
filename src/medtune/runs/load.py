"""Loading a trained model back from its run folder (evaluation, predict, export, RL's parent)."""
from __future__ import annotations

from pathlib import Path

import torch

from medtune.config import Config, build_config
from medtune.models.base import SegModel
from medtune.models.registry import build_model
from medtune.runs.checkpoint import find_checkpoint, load_checkpoint
from medtune.runs.files import load_run_config


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_run_model(run_dir: str | Path, checkpoint: str = "best", device=None,
                   overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, SegModel, Path]:
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if overrides:
        cfg = build_config(cfg.model_dump(mode="json"), overrides, source=str(run_dir / "config.yaml"))
    ckpt = find_checkpoint(run_dir, checkpoint)
    model = build_model(cfg)
    load_checkpoint(ckpt, model, restore_rng=False)
    model.to(device or default_device()).eval()
    return cfg, model, ckpt
