"""Atomic checkpoints: write to a temporary folder, rename into place, only then rotate old ones away.

A checkpoint folder holds the trainable weights (``adapter/`` in PEFT format or ``model/`` for full fine-tuning),
``trainer_state.pt`` (optimizer, scheduler, RNG, step, counters) and ``meta.json``. A crash at any moment leaves
either the previous or the new checkpoint complete, never neither (pitfall 12).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from medtune.models.base import SegModel
from medtune.models.lora import load_trainable, save_trainable


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    best_metric: float = float("-inf")
    best_step: int = -1
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    val_history: list[float] = field(default_factory=list)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _replace_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(f".old-{final.name}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(ckpt_root: Path, name: str, model: SegModel, optimizer, scheduler, state: TrainerState,
                    extra_meta: dict | None = None) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_trainable(model, tmp)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": _rng_state(),
            "trainer": asdict(state),
        },
        tmp / "trainer_state.pt",
    )
    meta = {"step": state.step, "best_metric": state.best_metric, "best_step": state.best_step, **(extra_meta or {})}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    final = ckpt_root / name
    _replace_dir(tmp, final)
    return final


def rotate_step_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    steps = sorted((p for p in ckpt_root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in steps[: max(0, len(steps) - keep_last)]:
        shutil.rmtree(old)


def find_checkpoint(run_dir: Path, which: str = "last") -> Path:
    """`which` = best | last | step-N | a path. Falls back to the `.old-` copy left by a crash mid-rename."""
    candidate = Path(which)
    if candidate.is_dir() and (candidate / "meta.json").exists():
        return candidate
    root = Path(run_dir) / "checkpoints"
    for path in (root / which, root / f".old-{which}"):
        if (path / "meta.json").exists():
            return path
    available = sorted(p.name for p in root.glob("*") if (p / "meta.json").exists()) if root.exists() else []
    raise FileNotFoundError(
        f"no checkpoint '{which}' in {root}; available: {', '.join(available) or 'none (did training save any?)'}"
    )


def load_checkpoint(ckpt: Path, model: SegModel, optimizer=None, scheduler=None, restore_rng: bool = True) -> TrainerState:
    load_trainable(model, ckpt)
    state_path = ckpt / "trainer_state.pt"
    if optimizer is None and scheduler is None and not restore_rng:
        meta = json.loads((ckpt / "meta.json").read_text())
        return TrainerState(step=meta.get("step", 0))
    blob = torch.load(state_path, map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None and blob["scheduler"] is not None:
        scheduler.load_state_dict(blob["scheduler"])
    if restore_rng:
        _set_rng_state(blob["rng"])
    return TrainerState(**blob["trainer"])
