"""The mask head's image input (Sa2VA's recipe), from the image as the user's file holds it, never from a copy shrunk
to ``data.patch_size``: the RGB uint8 image resized to SAM's input size (1024) with PIL bicubic, kept as uint8
(Sa2VA's ``DirectResize``: ``np.array(PIL.Image.resize((1024, 1024)))``); the model divides by 255 and normalises
with the folder's SAM mean/std (``segvlm.json`` ``sam_image_mean/std``; the Sa2VA importer writes the bf16-rounded
ImageNet values Sa2VA's ``preprocess_image`` uses, other folders get the float ImageNet values).

The VLM's pixels are not made here: the VLM's own processor makes them from the same uint8 image (through
``ChatCodec.encode``). For a Sa2VA-imported InternVL, transformers' GotOcr2 image processor with the importer's
``crop_to_patches`` / 1..12 tiles gives Sa2VA's ``dynamic_preprocess`` tiles exactly (0.0 max difference on both
fixture images, one tile and 4x3 + thumbnail).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC: Sa2VA's (and PIL's) default resize filter


@dataclass(frozen=True)
class SamImagePrep:
    """The mask head's input of one image (Sa2VA's ``DirectResize``). Picklable (DataLoader workers)."""

    sam_size: tuple[int, int]  # (H, W) of SAM's input

    def sam_image(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 [3, S, S]: the image resized to SAM's input with PIL bicubic."""
        h, w = self.sam_size
        resized = Image.fromarray(rgb).resize((w, h), resample=PIL_BICUBIC)
        return torch.from_numpy(np.array(resized)).permute(2, 0, 1).contiguous()

    def __call__(self, rgb: np.ndarray) -> dict[str, torch.Tensor]:
        """``sam_image`` uint8 [3, S, S] and ``image_size`` long [2] (the original H, W) of a uint8 [H, W, 3]."""
        return {"sam_image": self.sam_image(rgb), "image_size": torch.tensor(rgb.shape[:2], dtype=torch.long)}
