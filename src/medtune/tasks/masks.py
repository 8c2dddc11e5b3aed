"""Task ``masks``: one image in, one mask out (U-Net, SAM, SAM 2). ComboLoss on patches or whole images, validation
by pooled Dice at 0.5 inside the FOV."""
from __future__ import annotations

import torch

from medtune.config import Config
from medtune.data.datasets import TrainPatchDataset
from medtune.data.types import LoadedSample
from medtune.inference import predict_prob
from medtune.losses import ComboLoss
from medtune.metrics import pooled_metrics
from medtune.tasks.base import LossFn, TargetPrediction, Task


def train_dataset(samples: list[LoadedSample], cfg: Config, model) -> TrainPatchDataset:
    return TrainPatchDataset(samples, cfg.data, seed=cfg.run.seed)


def mask_targets(out, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return out.mask_logits, batch["mask"], batch["fov"]


def make_loss(cfg: Config) -> LossFn:
    combo = ComboLoss(cfg.loss)

    def loss(model, batch: dict):
        logits, target, fov = mask_targets(model(batch=batch), batch)
        return combo(logits, target, fov)

    return loss


def target_probabilities(model, sample: LoadedSample, cfg: Config, device) -> list[TargetPrediction]:
    return [TargetPrediction(sample.id, predict_prob(model, sample, cfg, device), sample.mask, sample.fov, sample)]


def pooled_validation(predictions: list[TargetPrediction]) -> dict[str, float]:
    """Pooled Dice / AUC at threshold 0.5 inside the FOV over all validation targets."""
    if not predictions:
        return {}
    m = pooled_metrics([p.prob for p in predictions], [p.mask for p in predictions], [p.fov for p in predictions],
                       threshold=0.5)
    return {"val_dice": float(m["dice"]), "val_auc": float(m.get("auc", float("nan")))}


def validate(model, val: list[LoadedSample], cfg: Config, device) -> dict[str, float]:
    return pooled_validation([p for s in val for p in target_probabilities(model, s, cfg, device)])


TASK = Task(
    name="masks",
    train_dataset=train_dataset,
    make_loss=make_loss,
    validate=validate,
    selection_metric="val_dice",
    target_probabilities=target_probabilities,
    mask_targets=mask_targets,
)
