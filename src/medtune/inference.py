"""Full-resolution probability maps from a SegModel.

Thin vessels must be seen at native scale, so semantic models run by sliding window (MONAI) over the whole image;
whole-image / box-prompted models (lesions) see the image resized to their input size, and the logits are resized
back. Scale-normalised samples are mapped back to native resolution by the caller (``data.loading``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from medtune.config import Config
from medtune.data.types import LoadedSample
from medtune.models.base import SegModel


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight (x1, y1, x2, y2) box of the mask; the whole image when the mask is empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        h, w = mask.shape
        return np.array([0, 0, w - 1, h - 1], dtype=np.float32)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def uses_whole_image(cfg: Config) -> bool:
    return cfg.data.sampling == "whole_image" or cfg.model.prompt == "box"


@torch.no_grad()
def predict_logits(model: SegModel, sample: LoadedSample, cfg: Config, device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits [1, 1, H, W] at the sample's (possibly scale-normalised) resolution."""
    image = torch.from_numpy(sample.image).unsqueeze(0).to(device)
    h, w = image.shape[-2:]
    if uses_whole_image(cfg):
        size = cfg.data.patch_size
        resized = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
        box = None
        if cfg.model.prompt == "box":
            # MedSAM protocol: the box comes from the ground truth at evaluation time too
            box = torch.from_numpy(mask_box(sample.mask)).to(device)
            box = (box * torch.tensor([size / w, size / h, size / w, size / h], device=device)).unsqueeze(0)
        logits = model.forward_logits(resized, box)
        return F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)
    roi = cfg.eval.roi_size or cfg.data.patch_size
    return sliding_window_inference(
        image,
        roi_size=(roi, roi),
        sw_batch_size=cfg.eval.sw_batch_size,
        predictor=lambda x: model.forward_logits(x).float(),
        overlap=cfg.eval.overlap,
        mode="gaussian",
        padding_mode="constant",
    )


def predict_prob(model: SegModel, sample: LoadedSample, cfg: Config, device: torch.device | str = "cpu") -> np.ndarray:
    """Probability map float32 [H, W] in [0, 1]."""
    was_training = model.training
    model.eval()
    try:
        return torch.sigmoid(predict_logits(model, sample, cfg, device))[0, 0].float().cpu().numpy()
    finally:
        model.train(was_training)
