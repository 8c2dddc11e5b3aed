"""Image preprocessing of the segmenting VLM, from the image as the user's file holds it (Sa2VA's recipe).

Both encoders see the original-resolution image, never a copy shrunk to ``data.patch_size`` first:

- SAM side: the RGB uint8 image resized to SAM's input size (1024) with PIL bicubic, as uint8 (Sa2VA's
  ``DirectResize``: ``np.array(PIL.Image.resize((1024, 1024)))``); the model then divides by 255 and normalises with
  the folder's SAM mean/std (``segvlm.json`` ``sam_image_mean/std``; the Sa2VA importer writes the bf16-rounded
  ImageNet values Sa2VA's ``preprocess_image`` actually uses, other folders get the float ImageNet values).
- VLM side: InternVL's dynamic tiling (``dynamic_preprocess``: the grid of 1..max tiles whose aspect ratio is closest
  to the image's, PIL bicubic resize to that canvas, tiles cut row-major, plus a whole-image thumbnail when there is
  more than one tile) when the VLM's image processor asks for it (``crop_to_patches``), else one tile (the whole
  image resized). The model normalises the uint8 tiles (ToTensor + Normalize in float32).

Everything here returns uint8 tensors, so batches stay small tensors (4x smaller than float) and collate stacks /
concatenates them; the number of tiles decides how many image tokens the text codec puts in the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC: Sa2VA's (and PIL's) default resize filter
UINT8_MAX = 255


def to_uint8_rgb(image) -> np.ndarray:
    """uint8 [H, W, 3] from a float [C, H, W] image in [0, 1] (the data loader's; 8-bit files round-trip exactly),
    a uint8 [C, H, W] array / tensor, or one image [1, C, H, W]. Grey images are repeated to RGB (Sa2VA converts
    every image to RGB)."""
    x = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected an image [C, H, W] with C in (1, 3), got shape {x.shape}")
    if x.dtype != np.uint8:
        x = np.rint(np.clip(x.astype(np.float64), 0.0, 1.0) * UINT8_MAX).astype(np.uint8)
    if x.shape[0] == 1:
        x = np.repeat(x, 3, axis=0)
    return np.ascontiguousarray(x.transpose(1, 2, 0))


def tile_grid(width: int, height: int, min_tiles: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """(columns, rows) of InternVL's ``dynamic_preprocess``: among the grids of min..max tiles, the one whose aspect
    ratio is closest to the image's (ties: the larger grid while the image covers more than half of its canvas).
    transformers' GotOcr2 / InternVL processor implements that choice (``get_optimal_tiled_canvas``); it gives
    Sa2VA's tiles and pixels exactly on the parity fixture and the same grid as Sa2VA's own code for every size
    checked, so it is reused (its PIL module: no torchvision needed)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    cols, rows = get_optimal_tiled_canvas((height, width), (tile, tile), min_tiles, max_tiles)
    return int(cols), int(rows)


@dataclass(frozen=True)
class ImagePrep:
    """Picklable (DataLoader workers): the sizes and the tiling policy of one model."""

    sam_size: tuple[int, int]  # (H, W) of SAM's input
    tile_size: tuple[int, int]  # (H, W) of one VLM tile
    tiling: bool = False  # InternVL dynamic tiling (crop_to_patches)
    min_tiles: int = 1
    max_tiles: int = 12
    thumbnail: bool = True
    resample: int = PIL_BICUBIC  # the VLM image processor's filter

    def num_tiles(self, height: int, width: int) -> int:
        if not self.tiling:
            return 1
        cols, rows = tile_grid(width, height, self.min_tiles, self.max_tiles, self.tile_size[0])
        n = cols * rows
        return n + 1 if self.thumbnail and n != 1 else n

    def vlm_tiles(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 [N, 3, th, tw]: the tiles in dynamic_preprocess order (row-major grid, thumbnail last)."""
        pil = Image.fromarray(rgb)
        th, tw = self.tile_size
        if not self.tiling:
            tiles = [pil.resize((tw, th), resample=self.resample)]
        else:
            cols, rows = tile_grid(pil.width, pil.height, self.min_tiles, self.max_tiles, th)
            canvas = pil.resize((tw * cols, th * rows), resample=self.resample)
            tiles = [canvas.crop((c * tw, r * th, (c + 1) * tw, (r + 1) * th))
                     for r in range(rows) for c in range(cols)]
            if self.thumbnail and len(tiles) != 1:
                tiles.append(pil.resize((tw, th), resample=self.resample))
        return torch.from_numpy(np.stack([np.array(t) for t in tiles])).permute(0, 3, 1, 2).contiguous()

    def sam_image(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 [3, S, S]: the image resized to SAM's input with PIL bicubic (Sa2VA's DirectResize)."""
        h, w = self.sam_size
        resized = Image.fromarray(rgb).resize((w, h), resample=PIL_BICUBIC)
        return torch.from_numpy(np.array(resized)).permute(2, 0, 1).contiguous()

    def __call__(self, image) -> dict[str, torch.Tensor]:
        """The model inputs of one image: ``sam_image`` uint8 [3, S, S], ``vlm_tiles`` uint8 [N, 3, th, tw],
        ``image_size`` long [2] (the original H, W)."""
        rgb = to_uint8_rgb(image)
        return {"sam_image": self.sam_image(rgb), "vlm_tiles": self.vlm_tiles(rgb),
                "image_size": torch.tensor(rgb.shape[:2], dtype=torch.long)}
