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
from medtune.data.datasets import mask_box
from medtune.data.types import LoadedSample
from medtune.models.base import SegModel


def uses_whole_image(cfg: Config) -> bool:
    return cfg.data.sampling == "whole_image" or cfg.model.prompt == "box"


def with_flips(predictor):
    """Test-time augmentation: mean logits over the identity and three flips, each flipped back."""
    def averaged(x: torch.Tensor) -> torch.Tensor:
        total = predictor(x)
        for dims in ((-1,), (-2,), (-2, -1)):
            total = total + predictor(x.flip(dims)).flip(dims)
        return total / 4
    return averaged


@torch.no_grad()
def predict_logits(model: SegModel, sample: LoadedSample, cfg: Config, device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits [1, 1, H, W] at the sample's (possibly scale-normalised) resolution."""
    image = torch.from_numpy(sample.image).unsqueeze(0).to(device)
    h, w = image.shape[-2:]
    if uses_whole_image(cfg):
        size = cfg.data.patch_size
        # the same resampling as training (datasets.py), so the model sees the same kind of input
        resized = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False,
                                antialias=(h > size or w > size))
        box = None
        if cfg.model.prompt == "box":
            # MedSAM protocol: the box comes from the ground truth at evaluation time too
            box = mask_box(torch.from_numpy(sample.mask)).to(device)
            box = (box * torch.tensor([size / w, size / h, size / w, size / h], device=device)).unsqueeze(0)
        def predictor(x):
            return model.forward_logits(x, box).float()

        if cfg.eval.tta and box is None:  # a flipped image would need a flipped box
            predictor = with_flips(predictor)
        return F.interpolate(predictor(resized), size=(h, w), mode="bilinear", align_corners=False)
    roi = cfg.eval.roi_size or cfg.data.patch_size
    def predictor(x):
        return model.forward_logits(x).float()

    return sliding_window_inference(
        image,
        roi_size=(roi, roi),
        sw_batch_size=cfg.eval.sw_batch_size,
        predictor=with_flips(predictor) if cfg.eval.tta else predictor,
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
