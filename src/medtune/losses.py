"""Supervised objective: weighted Dice + Focal + BCE (+ soft clDice) built on MONAI, restricted to the field of view.

Every term is a mean over samples of a per-sample value (Dice per sample, focal/BCE as the mean over that sample's FOV
pixels). A batch-global pixel mean would weight images by their FOV size, so a 2-process data-parallel run (each rank
averaging its half batch, gradients averaged across ranks) would not equal a 1-process run over the full batch; the
per-sample mean makes the two identical.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss, SoftclDiceLoss
from torch import nn

from medtune.config import LossCfg
from medtune.errors import ConfigError

TERMS = ("dice", "focal", "bce", "cldice")


def _masked_pixel_mean(per_pixel: torch.Tensor, fov: torch.Tensor | None) -> torch.Tensor:
    """[B,1,H,W] per-pixel loss -> scalar: mean over each sample's FOV pixels, then over samples.

    A sample without any FOV pixel contributes 0 (and still counts in the sample mean, so the value does not depend on
    how a batch is split across processes).
    """
    dims = tuple(range(1, per_pixel.ndim))
    if fov is None:
        return per_pixel.mean(dim=dims).mean()
    per_sample = (per_pixel * fov).sum(dim=dims) / fov.sum(dim=dims).clamp(min=1.0)
    return per_sample.mean()


class ComboLoss(nn.Module):
    """``w_dice*Dice + w_focal*Focal + w_bce*BCE + w_cldice*softclDice`` on binary logits.

    ``forward(logits [B,1,H,W], target [B,1,H,W] in {0,1}, fov [B,1,H,W] in {0,1} | None) -> (loss, parts)`` where
    ``parts`` maps each computed term (weight != 0) to its detached float value, for logging.
    """

    def __init__(self, cfg: LossCfg, smooth: float = 1e-5):
        super().__init__()
        self.weights = {"dice": cfg.dice, "focal": cfg.focal, "bce": cfg.bce, "cldice": cfg.cldice}
        if all(w == 0 for w in self.weights.values()):
            raise ConfigError("all loss weights (loss.dice, loss.focal, loss.bce, loss.cldice) are 0; set one > 0")
        # Probabilities (not logits) go into Dice/clDice because the FOV has to be applied after the sigmoid: a
        # zeroed logit would still count as probability 0.5.
        # A small smooth keeps Dice close to its textbook value on thin structures (a few hundred foreground pixels),
        # where MONAI's default of 1 would noticeably bias it; both-empty patches still give loss 0.
        self.dice = DiceLoss(sigmoid=False, batch=False, smooth_nr=smooth, smooth_dr=smooth, reduction="mean")
        # Single channel + use_softmax=False -> MONAI's sigmoid focal loss on logits; alpha=None means no class
        # re-weighting (a scalar alpha would weight positives by alpha and negatives by 1-alpha).
        self.focal = FocalLoss(gamma=cfg.focal_gamma, alpha=None, use_softmax=False, reduction="none")
        # clDice keeps MONAI's smoothing of 1: the soft skeleton of an uncertain (near-uniform) prediction is ~0, and
        # a tiny smooth in its denominator would then blow the gradient up by ~1/smooth.
        self.cldice = SoftclDiceLoss(iter_=cfg.cldice_iters, sigmoid=False, reduction="mean")

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, fov: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if logits.ndim != 4 or logits.shape[1] != 1:
            raise ValueError(f"ComboLoss expects logits of shape [B,1,H,W], got {tuple(logits.shape)}")
        if target.shape != logits.shape:
            raise ValueError(f"target shape {tuple(target.shape)} differs from logits shape {tuple(logits.shape)}")
        if fov is not None and fov.shape != logits.shape:
            raise ValueError(f"fov shape {tuple(fov.shape)} differs from logits shape {tuple(logits.shape)}")
        # Under bf16/fp16 autocast the sums over ~10^4 pixels and the log terms lose too much precision; everything
        # here is cheap, so it runs in float32 with autocast off.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            target = target.float()
            fov = fov.float() if fov is not None else None
            terms: dict[str, torch.Tensor] = {}
            need_prob = self.weights["dice"] != 0 or self.weights["cldice"] != 0
            if need_prob:
                prob = torch.sigmoid(logits)
                prob_in, target_in = (prob * fov, target * fov) if fov is not None else (prob, target)
            if self.weights["dice"] != 0:
                terms["dice"] = self.dice(prob_in, target_in)
            if self.weights["focal"] != 0:
                terms["focal"] = _masked_pixel_mean(self.focal(logits, target), fov)
            if self.weights["bce"] != 0:
                bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
                terms["bce"] = _masked_pixel_mean(bce, fov)
            if self.weights["cldice"] != 0:
                terms["cldice"] = self.cldice(prob_in, target_in)
            loss = sum(self.weights[k] * v for k, v in terms.items())
        parts = {k: float(v.detach()) for k, v in terms.items()}
        return loss, parts
