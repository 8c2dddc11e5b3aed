"""The data contract every layout produces and every consumer reads."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medtune.errors import DataError  # noqa: F401  (imported from here by the data layer)


@dataclass
class Target:
    """One referring expression of an image and what it refers to (Sa2VA-style annotations): its own mask, never
    unioned with the image's other expressions."""

    text: str | None = None
    polygons: list[list[float]] = field(default_factory=list)
    masks: list[Path] = field(default_factory=list)


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
    # Per-expression targets (polygon_json with "text"): K >= 1 masks for one image. Empty: one target, the union
    # of masks/polygons above, asked for with the task's default prompt.
    targets: list[Target] = field(default_factory=list)
    # llava_json: the conversation, turns {"role": "user" | "assistant" | "system", "content": str} with the image at
    # an "<image>" placeholder (medtune.data.conversations)
    conversations: list[dict[str, str]] | None = None

    def files(self) -> list[Path]:
        """Every file loading this sample reads: image, masks, FOV, target masks."""
        return [self.image, *self.masks, *([self.fov] if self.fov is not None else []),
                *(m for t in self.targets for m in t.masks)]

    def target_texts(self) -> list[str | None]:
        """The K expressions this sample's items ask for (None: the task's default prompt), as ``LoadedSample``."""
        return [t.text for t in self.targets] if self.targets else [None]


@dataclass
class LoadedSample:
    id: str
    image: np.ndarray  # float32 [C, H, W] in [0, 1]
    mask: np.ndarray  # uint8 [H, W] in {0, 1}
    fov: np.ndarray  # uint8 [H, W] in {0, 1}; all ones when there is no FOV
    scale: float = 1.0  # resampling factor applied (scale normalisation); predictions are mapped back by 1/scale
    native_shape: tuple[int, int] | None = None  # (H, W) before scale normalisation
    targets: np.ndarray | None = None  # uint8 [K, H, W] per-expression masks; None -> one target, ``mask``
    texts: list[str | None] = field(default_factory=list)  # K expressions (None -> the task's default prompt)
    conversations: list[dict[str, str]] | None = None  # Sample.conversations (instruction tuning)
    label: str | None = None  # Sample.label

    def target_masks(self) -> np.ndarray:
        """uint8 [K, H, W]: the per-expression masks, or the union mask as the single target."""
        return self.targets if self.targets is not None else self.mask[None]

    def target_texts(self) -> list[str | None]:
        return list(self.texts) if self.targets is not None else [None]
