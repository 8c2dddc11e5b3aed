"""Loading a trained model back from its run folder (evaluation, predict, export, RL's parent)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from medtune.config import Config, build_config
from medtune.models.base import SegModel
from medtune.models.registry import build_run_model
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
    model = build_run_model(cfg)  # as training built it: weights the checkpoint does not hold are the trained ones
    load_checkpoint(ckpt, model, restore_rng=False)
    model.to(device or default_device()).eval()
    return cfg, model, ckpt


@dataclass
class LoadedRun:
    """A run's model loaded once, with what inference on it needs (``medtune app`` keeps one per run)."""

    run_dir: Path
    cfg: Config
    model: SegModel
    checkpoint: Path
    device: torch.device


def load_run(run_dir: str | Path, checkpoint: str = "best", device=None) -> LoadedRun:
    device = torch.device(device) if device is not None else default_device()
    cfg, model, ckpt = load_run_model(run_dir, checkpoint, device)
    return LoadedRun(Path(run_dir), cfg, model, ckpt, device)
