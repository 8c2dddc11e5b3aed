"""The data contract every layout produces and every consumer reads."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medtune.errors import DataError  # noqa: F401  (imported from here by the data layer)


@dataclass
class Sample:
    id: str  # unique and stable across runs (relative path without extension)
    image: Path
    masks: list[Path] = field(default_factory=list)  # unioned; empty when polygons are given (or unlabelled)
    fov: Path | None = None
    polygons: list[list[float]] | None = None  # [[x1, y1, x2, y2, ...], ...] in pixel coordinates, unioned
    group: str | None = None  # patient / video id: never split across train/val/test
    split: str | None = None  # split shipped by the layout ("train" | "test"), e.g. DRIVE
    label: str | None = None  # class name where the layout has one (BUSI benign / malignant)


@dataclass
class LoadedSample:
    id: str
    image: np.ndarray  # float32 [C, H, W] in [0, 1]
    mask: np.ndarray  # uint8 [H, W] in {0, 1}
    fov: np.ndarray  # uint8 [H, W] in {0, 1}; all ones when there is no FOV
    scale: float = 1.0  # resampling factor applied (scale normalisation); predictions are mapped back by 1/scale
    native_shape: tuple[int, int] | None = None  # (H, W) before scale normalisation
