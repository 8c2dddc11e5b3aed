"""The task contract: a dataclass of plain functions, no class hierarchy."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from medtune.config import Config
from medtune.data.types import LoadedSample
from medtune.errors import UserError


@dataclass
class TargetPrediction:
    """One evaluated target: a probability map at the sample's (possibly scale-normalised) resolution and its ground
    truth. ``id`` is the sample id, with ``#k`` appended for the k-th referring expression of a multi-target image."""

    id: str
    prob: np.ndarray  # float32 [H, W]
    mask: np.ndarray  # uint8 [H, W]
    fov: np.ndarray  # uint8 [H, W]
    sample: LoadedSample
    target: int | None = None  # index into sample.target_masks(); None: the sample's (union) mask

    def ground_truth(self, sample: LoadedSample) -> np.ndarray:
        """This target's mask in another loading of the same sample (e.g. at native resolution)."""
        return sample.mask if self.target is None else sample.target_masks()[self.target]


@dataclass
class PredictRequest:
    """What `medtune predict` was asked; each task takes the options it understands and refuses the others in one
    line (a --question to a mask run, a --box to an answer run)."""

    run_dir: Path
    images: list[Path]
    out_dir: Path
    checkpoint: str = "best"
    threshold: float | None = None  # mask tasks: None = the run's calibrated threshold
    box: tuple[float, float, float, float] | None = None  # box-prompted mask runs
    prompt: str | list[str] | None = None  # segmenting VLM: the request(s), one turn each (default: task.prompt)
    question: str | None = None  # instruction-tuned VLM: asked about each image
    frame: int | None = None  # video runs: the frame --prompt's mask / --box is drawn on (default 0)

    def refuse(self, task: str, **unsupported: str) -> None:
        """One line for each option this task does not take (``option name -> what it is for``)."""
        for name, purpose in unsupported.items():
            if getattr(self, name) is not None:
                raise UserError(f"--{name} is for {purpose}; {self.run_dir} is a {task} run")


@dataclass
class ImagePrediction:
    """One image's prediction in memory: what `medtune predict` writes to files and `medtune app` shows."""

    image: np.ndarray  # float32 [C, H, W] in [0, 1], as the model read it (native resolution)
    # float32 [K, H, W], zero outside the field of view: K = 1 for a mask run, one map per [SEG] of a segmenting
    # VLM's answers (in order over its turns), K = 0 for a run that answers in words
    probs: np.ndarray
    answer: str | None = None  # the generated text (VLM runs; a segmenting VLM's turns one per line)
    label: str | None = None  # instruction-tuned runs: the label the answer parses to ("" when the run has no labels)
    # segmenting VLM: one (question, answer, number of its maps in probs) per turn asked
    turns: list[tuple[str, str, int]] | None = None


# loss_fn(model, batch) -> (scalar loss, {part: float}); built once per run by Task.make_loss(cfg)
LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Task:
    name: str
    # training data: items are dicts of tensors (never PIL images) plus "id"; collate turns them into one batch
    train_dataset: Callable[[list[LoadedSample], Config, torch.nn.Module], Dataset]
    make_loss: Callable[[Config], LossFn]
    # validation during training: {"val_<metric>": value}; `selection_metric` among them picks `best`
    validate: Callable[[torch.nn.Module, list[LoadedSample], Config, torch.device], dict[str, float]]
    selection_metric: str
    # -- after training: what `medtune eval / predict / report / compare` call, so nothing there asks which task --
    # evaluate_run(run_dir, split, checkpoint, device, strategy, data_file, image_root) -> summary (also written to
    # RUN/eval/<split>/, or RUN/eval/data-<name>/ for another data file)
    evaluate_run: Callable[..., dict]
    # format_summary(summary) -> the text `medtune eval` prints
    format_summary: Callable[[dict], str]
    # predict(PredictRequest) -> lines to print (what was written where)
    predict: Callable[[PredictRequest], list[str]]
    # write_report(run_dir, split) -> the report's path
    write_report: Callable[[Path, str], Path]
    # compare(runs, out_dir, split, threshold_at, allow_eval_mismatch) -> the comparison as text
    compare: Callable[..., str]
    # predict_image(LoadedRun, image path, PredictRequest) -> ImagePrediction: one image in memory, the model loaded
    # once by the caller (`medtune app`); the task's `predict` writes the same computation to files
    predict_image: Callable[..., ImagePrediction] | None = None
    # prompt_option(cfg) -> the PredictRequest option ("box", "prompt", "question") the run needs, or None
    prompt_option: Callable[[Config], str | None] | None = None
    higher_is_better: bool = True
    # batches train_dataset's items (a dataset with its own ``collate`` attribute overrides it: ``collate_for``)
    collate: Callable[[list[dict]], dict] = default_collate
    # loss_units(batch) -> how many supervised units (tokens, pixels) the loss of this process's batch is the mean
    # over, as a float tensor; the recipe weights micro-batches and processes by it so that gradient accumulation and
    # N processes equal one big batch. None: every sample weighs alike (masks of one size).
    loss_units: Callable[[dict], torch.Tensor] | None = None
    # mask tasks: per-target probability maps for calibration / evaluation / RL validation (None: not a mask task)
    target_probabilities: Callable[[torch.nn.Module, LoadedSample, Config, torch.device],
                                   list[TargetPrediction]] | None = None
    # mask tasks: (ModelOutput, batch) -> (logits, target, fov), each [N, 1, H, W] over the N real targets of the
    # batch; what the losses and the RL policy see
    mask_targets: Callable | None = None
    # text-generating mask tasks: what prediction does, measured. (model, sample, cfg, device) -> (per-target
    # predictions as target_probabilities gives, one record per generated answer); evaluation scores them like the
    # teacher-forced ones (same threshold, same metrics and CIs) next to them
    free_generation: Callable[[torch.nn.Module, LoadedSample, Config, torch.device],
                              tuple[list[TargetPrediction], list[dict]]] | None = None
    # (free_generation's records over a split, cfg) -> answer statistics (e.g. the rate of answers without [SEG])
    generation_summary: Callable[[list[dict], Config], dict] | None = None



def collate_for(task: Task, dataset: Dataset) -> Callable[[list[dict]], dict]:
    """How the recipes batch ``task.train_dataset``'s items: the dataset's own ``collate`` when it brings one (the
    video task's items are the model's, batched by the model's ``clip_collate``), else ``task.collate``."""
    return getattr(dataset, "collate", None) or task.collate


def selection(cfg: Config, task: Task) -> tuple[str, bool]:
    """(metric key, higher is better) that picks the `best` checkpoint: ``train.selection_metric`` when set, else the
    objective's own (RL: the validation reward of the run's reward), else the task's."""
    if cfg.train.selection_metric:
        return cfg.train.selection_metric, cfg.train.selection_mode == "max"
    if cfg.objective == "rl" and task.target_probabilities is not None:
        return "val_reward", True
    return task.selection_metric, task.higher_is_better
