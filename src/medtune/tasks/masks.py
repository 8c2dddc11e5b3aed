"""Task ``masks``: one image in, one mask out (U-Net, SAM, SAM 2). ComboLoss on patches or whole images, validation
by pooled Dice at 0.5 inside the FOV."""
from __future__ import annotations

from pathlib import Path

import torch

from medtune.config import Config
from medtune.data.datasets import TrainPatchDataset
from medtune.data.types import LoadedSample
from medtune.data.video import VideoSample
from medtune.errors import ConfigError
from medtune.inference import predict_prob
from medtune.losses import ComboLoss
from medtune.metrics import pooled_metrics
from medtune.tasks import mask_eval, mask_predict
from medtune.tasks.base import LossFn, TargetPrediction, Task


def train_dataset(samples: list[LoadedSample], cfg: Config, model) -> TrainPatchDataset:
    if samples and isinstance(samples[0], VideoSample):  # data.layout=auto found videos; the task was chosen unread
        raise ConfigError(f"{cfg.data.path} holds videos: train them with model.family=sam2_video (task video), or "
                          "set task.kind=video; an image model cannot take clips")
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


# ---- after training: shared by every task whose outputs are masks (segvlm takes these too) --------------------------
def evaluate_run(run_dir: Path, split: str = "test", checkpoint: str = "best", device=None,
                 strategy: str | None = None, data_file=None, image_root=None) -> dict:
    return mask_eval.evaluate_run(TASK, run_dir, split, checkpoint, device, strategy, data_file, image_root)


def write_report(run_dir: Path, split: str = "test") -> Path:
    from medtune.report.html import write_report as write_mask_report  # matplotlib: only when a report is asked for

    return write_mask_report(run_dir, split)


def compare(runs: list[Path], out_dir: Path | None = None, split: str = "test", at: str = "cal",
            allow_eval_mismatch: bool = False) -> str:
    from medtune.report.compare import compare_runs

    return compare_runs(runs, out_dir, split, at, allow_eval_mismatch)


TASK = Task(
    name="masks",
    train_dataset=train_dataset,
    make_loss=make_loss,
    validate=validate,
    selection_metric="val_dice",
    evaluate_run=evaluate_run,
    format_summary=mask_eval.format_summary,
    predict=mask_predict.predict_masks,
    predict_image=mask_predict.mask_image,
    prompt_option=mask_predict.mask_prompt_option,
    write_report=write_report,
    compare=compare,
    target_probabilities=target_probabilities,
    mask_targets=mask_targets,
)
