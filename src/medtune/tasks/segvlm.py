"""Task ``segvlm``: a vision-language model answers a question about the image, and each ``[SEG]`` token of its
answer becomes a mask (Sa2VA / LISA style).

Training is teacher-forced: the question (the referring expression, or ``task.prompt`` with ``task.class_name`` for
data without text) and the answer (``task.answer``, "It is [SEG].", once per target) are tokenised by the model's
own text codec, and one forward gives the answer's LM loss and one mask per ``[SEG]``. The loss is ComboLoss on the
masks (default BCE 2 / Dice 0.5, as Sa2VA and LISA use: ``config.SEGVLM_LOSS``, unless the config sets ``loss``)
+ ``task.lm_weight`` x the LM cross-entropy on the answer tokens. Evaluation uses the same teacher-forced prompt,
so the masks are probabilities and calibration, metrics, CIs, reports and compare work as for the other families.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medtune.config import Config
from medtune.data.augment import Augmentation
from medtune.data.datasets import loss_region
from medtune.data.types import DataError, LoadedSample
from medtune.errors import UserError
from medtune.losses import ComboLoss
from medtune.tasks import mask_eval, mask_predict, masks
from medtune.tasks.base import LossFn, TargetPrediction, Task
from medtune.tasks.masks import pooled_validation

IGNORE_INDEX = -100


def conversation(sample_texts: list[str | None], cfg: Config) -> tuple[str, str]:
    """(question, answer) for one image's K targets: one request and one "[SEG]" answer per target, in order."""
    questions, answers = [], []
    for text in sample_texts:
        questions.append(cfg.task.prompt.format(class_name=text if text is not None else cfg.task.class_name))
        answers.append(cfg.task.answer)
    return " ".join(questions), " ".join(answers)


def _resize(image: np.ndarray, labels: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    lab = torch.from_numpy(labels.astype(np.float32))[None]
    lab = F.interpolate(lab, size=(size, size), mode="nearest-exact")[0]
    return img.clamp(0.0, 1.0), lab


class SegVLMDataset(Dataset):
    """Whole images resized to ``data.patch_size`` with their K target masks and the tokenised conversation, keyed
    by ``(index, epoch)`` like the mask datasets so a resumed run replays the same batches.

    Spatial augmentation runs only for class prompts: a flip would turn "the left vessel" into a wrong answer."""

    def __init__(self, samples: list[LoadedSample], cfg: Config, codec):
        if not samples:
            raise UserError("the segvlm task needs at least one training sample")
        self.samples, self.cfg, self.codec = samples, cfg, codec
        self.size = int(cfg.data.patch_size)
        self.seed = int(cfg.run.seed)
        self._augment = Augmentation(cfg.data.augment)
        self._encoded = [encode_sample(s, cfg, codec) for s in samples]  # fails now, naming the sample

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> dict:
        index, epoch = (key, 0) if isinstance(key, (int, np.integer)) else key
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        ls = self.samples[int(index) % len(self.samples)]
        targets = ls.target_masks()
        region = loss_region(ls.fov, ls.mask)  # training only: annotated foreground is in view by definition
        image, labels = _resize(ls.image, np.concatenate([targets, region[None]]), self.size)
        mask, fov = labels[:-1], labels[-1:]
        if all(t is None for t in ls.target_texts()):
            image, mask, fov = self._augment(image, mask, fov, rng)
        return {"id": ls.id, "image": image.float().clamp(0.0, 1.0).contiguous(),
                "mask": (mask > 0.5).float().contiguous(), "fov": (fov > 0.5).float().contiguous(),
                "pad_token_id": self.codec.pad_token_id, **self._encoded[int(index) % len(self.samples)]}


def encode_sample(ls: LoadedSample, cfg: Config, codec) -> dict[str, torch.Tensor]:
    question, answer = conversation(ls.target_texts(), cfg)
    enc = codec.encode(question, answer)
    n_seg = int((enc["input_ids"] == codec.seg_token_id).sum())
    k = len(ls.target_texts())
    if n_seg != k:
        raise DataError(f"sample {ls.id}: the target answer {answer!r} holds {n_seg} {cfg.model.vlm.seg_token} "
                        f"token(s) for {k} target mask(s); task.answer must contain {cfg.model.vlm.seg_token} "
                        "exactly once (it is repeated once per target)")
    return enc


def train_dataset(samples: list[LoadedSample], cfg: Config, model) -> SegVLMDataset:
    return SegVLMDataset(samples, cfg, model.text_codec())


def make_collate(pad_token_id: int):
    def collate(items: list[dict]) -> dict:
        b = len(items)
        t = max(int(it["input_ids"].shape[0]) for it in items)
        k = max(int(it["mask"].shape[0]) for it in items)
        size = items[0]["image"].shape[-2:]
        batch = {
            "ids": [it["id"] for it in items],
            "image": torch.stack([it["image"] for it in items]),
            "fov": torch.stack([it["fov"] for it in items]),
            "mask": torch.zeros(b, k, *size),
            "target_valid": torch.zeros(b, k, dtype=torch.bool),
            "input_ids": torch.full((b, t), pad_token_id, dtype=torch.long),
            "labels": torch.full((b, t), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros(b, t, dtype=torch.long),
        }
        for i, it in enumerate(items):
            n, kk = int(it["input_ids"].shape[0]), int(it["mask"].shape[0])
            # right padding: the [SEG] positions and causal attention of the real tokens are unchanged
            batch["input_ids"][i, :n] = it["input_ids"]
            batch["labels"][i, :n] = it["labels"]
            batch["attention_mask"][i, :n] = it["attention_mask"]
            batch["mask"][i, :kk] = it["mask"]
            batch["target_valid"][i, :kk] = True
        return batch

    return collate


def mask_targets(out, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's real targets, [N, 1, H, W] each, after checking that every sample's answer produced exactly one
    [SEG] mask per target."""
    predicted = out.mask_valid.sum(dim=1)
    wanted = batch["target_valid"].sum(dim=1)
    if not torch.equal(predicted.cpu(), wanted.cpu()):
        i = int(torch.nonzero(predicted.cpu() != wanted.cpu())[0])
        raise UserError(f"sample {batch['ids'][i]}: {int(predicted[i])} [SEG] token(s) in its tokens but "
                         f"{int(wanted[i])} target mask(s); every target needs exactly one [SEG] in the answer")
    k = batch["target_valid"].shape[1]
    logits = out.mask_logits[:, :k][batch["target_valid"]][:, None]
    target = batch["mask"][batch["target_valid"]][:, None]
    fov = batch["fov"][:, None].expand(-1, k, -1, -1, -1)[batch["target_valid"]]
    return logits, target, fov


def make_loss(cfg: Config) -> LossFn:
    combo = ComboLoss(cfg.loss)  # Sa2VA's BCE 2 / Dice 0.5 unless the config sets `loss`
    lm_weight = cfg.task.lm_weight

    def loss(model, batch: dict):
        out = model(batch=batch)
        mask_loss, parts = combo(*mask_targets(out, batch))
        total = mask_loss
        if lm_weight > 0:
            if out.lm_loss is None:
                raise UserError("task.lm_weight > 0 but the model returned no LM loss (no labels in the batch?)")
            total = total + lm_weight * out.lm_loss
        if out.lm_loss is not None:
            parts = {**parts, "lm": float(out.lm_loss.detach())}
        return total, parts

    return loss


@torch.no_grad()
def target_probabilities(model, sample: LoadedSample, cfg: Config, device) -> list[TargetPrediction]:
    """Teacher-forced masks for every target of one image (the training prompt and answer), upsampled to the
    sample's resolution."""
    codec = model.text_codec()
    size = int(cfg.data.patch_size)
    targets = sample.target_masks()
    image, _ = _resize(sample.image, targets[:1], size)
    item = {"id": sample.id, "pad_token_id": codec.pad_token_id, "image": image,
            "mask": torch.zeros(targets.shape[0], size, size), "fov": torch.ones(1, size, size),
            **encode_sample(sample, cfg, codec)}
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collate([item]).items()}
    was_training = model.training
    model.eval()
    try:
        out = model(batch=batch)
    finally:
        model.train(was_training)
    h, w = sample.mask.shape
    logits = F.interpolate(out.mask_logits[:, : targets.shape[0]].float(), size=(h, w), mode="bilinear",
                           align_corners=False)
    probs = torch.sigmoid(logits)[0].cpu().numpy()
    multi = sample.targets is not None
    return [TargetPrediction(f"{sample.id}#{k}" if multi else sample.id, probs[k], targets[k], sample.fov, sample,
                             k if multi else None) for k in range(targets.shape[0])]


@torch.no_grad()
def generation_metrics(model, samples: list[LoadedSample], cfg: Config, device) -> dict:
    """Free generation on the split (greedy, the training question): how often the answer holds no [SEG] at all
    (the most common complaint after fine-tuning a LISA/Sa2VA model) or a wrong number of them."""
    codec = model.text_codec()
    size = int(cfg.data.patch_size)
    no_seg = wrong_count = 0
    examples = []
    for s in samples:
        question, _ = conversation(s.target_texts(), cfg)
        image, _ = _resize(s.image, s.fov[None], size)
        answer, logits = model.generate_masks(image[None].to(device), question, max_new_tokens=cfg.task.max_new_tokens)
        k = int(logits.shape[0])
        no_seg += k == 0
        wrong_count += k != len(s.target_texts())
        if len(examples) < 5:
            examples.append({"id": s.id, "question": question, "answer": answer})
    n = max(len(samples), 1)
    return {"n": len(samples), "no_seg_rate": no_seg / n, "wrong_seg_count_rate": wrong_count / n,
            "seg_token": codec.decode([codec.seg_token_id]), "examples": examples}


def validate(model, val: list[LoadedSample], cfg: Config, device) -> dict[str, float]:
    return pooled_validation([p for s in val for p in target_probabilities(model, s, cfg, device)])


def collate(items: list[dict]) -> dict:
    """Pads with the pad id each item carries (the model's own: an arbitrary id could be an image token)."""
    return make_collate(int(items[0]["pad_token_id"]))(items)


def evaluate_run(run_dir, split: str = "test", checkpoint: str = "best", device=None,
                 strategy: str | None = None) -> dict:
    return mask_eval.evaluate_run(TASK, run_dir, split, checkpoint, device, strategy)


TASK = Task(
    name="segvlm",
    train_dataset=train_dataset,
    make_loss=make_loss,
    validate=validate,
    selection_metric="val_dice",
    evaluate_run=evaluate_run,
    format_summary=mask_eval.format_summary,
    predict=mask_predict.predict_segvlm,
    predict_image=mask_predict.segvlm_image,
    prompt_option=mask_predict.segvlm_prompt_option,
    write_report=masks.write_report,
    compare=masks.compare,
    collate=collate,
    target_probabilities=target_probabilities,
    mask_targets=mask_targets,
    generation_metrics=generation_metrics,
)
