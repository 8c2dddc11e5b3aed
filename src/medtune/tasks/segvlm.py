"""Task ``segvlm``: a vision-language model answers a question about the image, and each ``[SEG]`` token of its
answer becomes a mask (Sa2VA / LISA style).

Training is teacher-forced: one user turn per target (``task.prompt`` with the target's referring expression, or
with ``task.class_name`` for data without text), each answered by ``task.answer`` ("It is [SEG]."), the image in
the first turn only, as Sa2VA's training data put several expressions of one image; the model's own text codec
tokenises the conversation, and one forward gives the answers' LM loss and one mask per ``[SEG]``. The loss is
ComboLoss on the masks (default BCE 2 / Dice 0.5, as Sa2VA and LISA use: ``config.SEGVLM_LOSS``, unless the config
sets ``loss``) + ``task.lm_weight`` x the LM cross-entropy on the answer tokens.

Evaluation measures both: the teacher-forced conversation (``target_probabilities``: the masks are probabilities,
so calibration, metrics, CIs, reports and compare work as for the other families) and free generation
(``free_generation``: what ``medtune predict`` does; the model answers each turn itself, and a target whose answer
holds no ``[SEG]`` is scored as an empty mask).

Images reach the model at their own resolution, never as a copy shrunk to ``data.patch_size``: the VLM's processor
makes its pixels and image tokens (through the plain VLM's ``ChatCodec``; InternVL's dynamic tiling where its image
processor asks for it), the mask head's SAM input is PIL bicubic uint8 at 1024 (``models.vlm.seg.model.encode_item``).
Masks and losses are computed at ``data.patch_size``
x ``data.patch_size`` (the whole image, squared like SAM's input; Sa2VA computes its loss on the 256 x 256 low-res
logits against the ground truth resized to them: ``data.patch_size=256`` is that); evaluation and prediction
upsample the logits to each image's own size as Sa2VA does (256 -> 1024 -> H x W).
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from medtune.config import Config
from medtune.data.augment import Augmentation
from medtune.data.datasets import loss_region
from medtune.data.loading import records
from medtune.data.types import DataError, LoadedSample, Sample
from medtune.errors import UserError
from medtune.losses import ComboLoss
from medtune.models.vlm.seg.model import collate as collate_items
from medtune.models.vlm.seg.model import encode_item
from medtune.runs.load import load_run
from medtune.tasks import mask_eval, mask_predict, masks
from medtune.tasks.base import ImagePrediction, LossFn, PredictRequest, TargetPrediction, Task
from medtune.tasks.masks import pooled_validation

log = logging.getLogger("medtune")

EXAMPLES_KEPT = 5  # generated conversations kept in summary.json to read


# an article right before {class_name} in task.prompt ("Please segment the {class_name} ..."), and one at the start
# of a referring expression ("the larger lesion"): together they would read "segment the the larger lesion"
_PROMPT_ARTICLE = re.compile(r"\b(?:the|a|an)\s+(?=\{class_name\})", re.IGNORECASE)
_LEADING_ARTICLE = re.compile(r"^(?:the|a|an)\s", re.IGNORECASE)


def question(text: str | None, cfg: Config) -> str:
    """The request for one target: ``task.prompt`` with the referring expression (``task.class_name`` when the
    target has none). An expression that brings its own article replaces the prompt's ("the larger lesion", not
    "the the larger lesion"); a final full stop is dropped, as Sa2VA does, since the prompt goes on after it."""
    name = (text if text is not None else cfg.task.class_name).strip()
    name = name[:-1].rstrip() if name.endswith(".") else name
    template = _PROMPT_ARTICLE.sub("", cfg.task.prompt) if _LEADING_ARTICLE.match(name) else cfg.task.prompt
    return template.format(class_name=name)


def conversation(sample_texts: list[str | None], cfg: Config) -> tuple[list[str], list[str]]:
    """(questions, answers) for one image's K targets: one user turn per target, in order, each answered by
    ``task.answer``. The codec puts the image in the first turn only."""
    return [question(text, cfg) for text in sample_texts], [cfg.task.answer] * len(sample_texts)


def _resize_labels(labels: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Masks [K, H, W] -> float [K, size, size] (nearest): the resolution masks and losses are computed at."""
    lab = labels if torch.is_tensor(labels) else torch.from_numpy(labels.astype(np.float32))
    return F.interpolate(lab.float()[None], size=(size, size), mode="nearest-exact")[0]


class SegVLMDataset(Dataset):
    """Whole images, encoded at their original resolution by the model's ``encode_item`` (the VLM processor's tokens
    and pixels, the mask head's ``sam_image``), with their K target masks at ``data.patch_size``, keyed by
    ``(index, epoch)`` like the mask datasets so a resumed run replays the same batches. The image is decoded on
    access (a ``LazySamples``: in the DataLoader's workers), once per item; building it decodes nothing.

    Spatial augmentation runs only for class prompts: a flip would turn "the left vessel" into a wrong answer. It
    runs at the image's resolution (before the processor); it keeps the image's size."""

    def __init__(self, samples: Sequence[LoadedSample], cfg: Config, codec, prep, seg_token_id: int):
        if not samples:
            raise UserError("the segvlm task needs at least one training sample")
        self.samples, self.cfg, self.codec, self.prep = samples, cfg, codec, prep  # picklable (DataLoader workers)
        self.seg_token_id = seg_token_id
        self.size = int(cfg.data.patch_size)
        self.seed = int(cfg.run.seed)
        self._augment = Augmentation(cfg.data.augment)
        answer = codec.tokenizer(cfg.task.answer, add_special_tokens=False)["input_ids"]
        for ls in records(samples):  # fails now, naming the sample, from its annotations (no image decoded)
            _check_seg_count(ls, cfg, len(ls.target_texts()) * answer.count(seg_token_id))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> dict:
        index, epoch = (key, 0) if isinstance(key, (int, np.integer)) else key
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        ls = self.samples[int(index) % len(self.samples)]
        targets = ls.target_masks()
        region = loss_region(ls.fov, ls.mask)  # training only: annotated foreground is in view by definition
        image = torch.from_numpy(np.ascontiguousarray(ls.image, dtype=np.float32))
        mask = torch.from_numpy(targets.astype(np.float32))
        fov = torch.from_numpy(region[None].astype(np.float32))
        if all(t is None for t in ls.target_texts()):
            image, mask, fov = self._augment(image, mask, fov, rng)
        item = encode_sample(ls, self.cfg, self.codec, self.prep, self.seg_token_id, image.clamp(0.0, 1.0))
        item["mask"] = (_resize_labels(mask, self.size) > 0.5).float().contiguous()
        item["fov"] = (_resize_labels(fov, self.size) > 0.5).float().contiguous()
        return item


def _check_seg_count(ls: LoadedSample | Sample, cfg: Config, n_seg: int) -> None:
    k = len(ls.target_texts())
    if n_seg != k:
        raise DataError(f"sample {ls.id}: the target answer {cfg.task.answer!r} (one per target) holds {n_seg} "
                        f"{cfg.model.vlm.seg_token} token(s) for {k} target mask(s) in all; task.answer must contain "
                        f"{cfg.model.vlm.seg_token} exactly once (it answers each target's turn)")


def encode_sample(ls: LoadedSample, cfg: Config, codec, prep, seg_token_id: int, image=None) -> dict:
    """The model item of one sample's conversation (``image``: the sample's, possibly augmented)."""
    questions, answers = conversation(ls.target_texts(), cfg)
    item = encode_item(codec, prep, ls.image if image is None else image, questions, answers, ls.id,
                       cfg.model.vlm.seg_token)
    _check_seg_count(ls, cfg, int((item["input_ids"] == seg_token_id).sum()))
    return item


def train_dataset(samples: Sequence[LoadedSample], cfg: Config, model) -> SegVLMDataset:
    return SegVLMDataset(samples, cfg, model.text_codec(), model.image_prep, model.seg_token_id)


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
    """Teacher-forced masks for every target of one image (the training prompt and answer), from the image at its
    own resolution, at the sample's resolution (the model upsamples as Sa2VA does: 256 -> 1024 -> H x W)."""
    targets = sample.target_masks()
    h, w = sample.mask.shape
    item = encode_sample(sample, cfg, model.text_codec(), model.image_prep, model.seg_token_id)
    item.update(mask=torch.zeros(targets.shape[0], 1, 1), fov=torch.ones(1, 1, 1))
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collate([item]).items()}
    batch["output_size"] = (h, w)
    was_training = model.training
    model.eval()
    try:
        out = model(batch=batch)
    finally:
        model.train(was_training)
    probs = torch.sigmoid(out.mask_logits[:, : targets.shape[0]].float())[0].cpu().numpy()
    multi = sample.targets is not None
    return [TargetPrediction(f"{sample.id}#{k}" if multi else sample.id, probs[k], targets[k], sample.fov, sample,
                             k if multi else None) for k in range(targets.shape[0])]


@torch.no_grad()
def free_generation(model, sample: LoadedSample, cfg: Config, device) -> tuple[list[TargetPrediction], list[dict]]:
    """What ``medtune predict`` does, scored: the model answers the conversation's questions itself (greedy, turn by
    turn, each answer kept in the history); target k's mask is the first [SEG] of answer k, and an answer without
    [SEG] is an empty mask (probability 0 everywhere), scored against the target like any other prediction.
    Returns the predictions (ids as ``target_probabilities``) and one record per answer (question, answer, its
    [SEG] count)."""
    targets = sample.target_masks()
    questions, _ = conversation(sample.target_texts(), cfg)
    image = torch.from_numpy(np.ascontiguousarray(sample.image, dtype=np.float32))  # its own resolution
    was_training = model.training
    model.eval()
    try:
        answers, masks = model.generate_turns(image[None].to(device), questions,
                                              max_new_tokens=cfg.task.max_new_tokens)
    finally:
        model.train(was_training)
    h, w = sample.mask.shape
    multi = sample.targets is not None
    preds, records = [], []
    for k, (answer, logits) in enumerate(zip(answers, masks)):
        if logits.shape[0]:  # the model returns the logits at the image's own size
            prob = torch.sigmoid(logits[0].float()).cpu().numpy()
        else:
            prob = np.zeros((h, w), dtype=np.float32)
        pid = f"{sample.id}#{k}" if multi else sample.id
        preds.append(TargetPrediction(pid, prob, targets[k], sample.fov, sample, k if multi else None))
        records.append({"id": pid, "sample": sample.id, "question": questions[k], "answer": answer,
                        "n_seg": int(logits.shape[0])})
    return preds, records


def generation_summary(records: list[dict], cfg: Config) -> dict:
    """Answer statistics of free generation over a split's images (records from ``free_generation``): how often an
    image's answers hold no [SEG] at all (the most common complaint after fine-tuning a LISA/Sa2VA model), and how
    often an image has an answer with other than exactly one."""
    by_image: dict[str, list[dict]] = {}
    for r in records:
        by_image.setdefault(r["sample"], []).append(r)
    n = max(len(by_image), 1)
    no_seg = sum(all(r["n_seg"] == 0 for r in rs) for rs in by_image.values())
    wrong = sum(any(r["n_seg"] != 1 for r in rs) for rs in by_image.values())
    examples = [{"id": sid, "questions": [r["question"] for r in rs], "answers": [r["answer"] for r in rs]}
                for sid, rs in list(by_image.items())[:EXAMPLES_KEPT]]
    return {"n": len(by_image), "n_answers": len(records), "no_seg_rate": no_seg / n,
            "wrong_seg_count_rate": wrong / n,
            "answers_without_seg_rate": sum(r["n_seg"] == 0 for r in records) / max(len(records), 1),
            "seg_token": cfg.model.vlm.seg_token, "max_new_tokens": cfg.task.max_new_tokens, "examples": examples}


def validate(model, val: list[LoadedSample], cfg: Config, device) -> dict[str, float]:
    return pooled_validation([p for s in val for p in target_probabilities(model, s, cfg, device)])


def collate(items: list[dict]) -> dict:
    """The segmenting VLM's ``collate``: the plain VLM's padding (with the model's own pad id: an arbitrary id could
    be an image token) and per-image processor keys, the mask head's inputs and the K targets per image."""
    return collate_items(items)


# ---- prediction (`medtune predict`) ----------------------------------------------------------------------------------
def generated_masks(model, cfg, image: np.ndarray, questions: list[str], device
                    ) -> tuple[list[str], list[np.ndarray]]:
    """(answers, per answer the probabilities [K_k, H, W] at the image's resolution): greedy generation turn by turn
    (one question per turn, the image in the first), then one mask per [SEG] of the generated answers, decoded from
    the hidden states of a forward over the generated conversation. The model preprocesses the image at its own
    resolution and returns the logits at it."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    with torch.no_grad():  # inference: the model's own mask forward is differentiable for training's sake
        answers, logits = model.generate_turns(x, questions, max_new_tokens=cfg.task.max_new_tokens)
    return answers, [torch.sigmoid(turn.float()).cpu().numpy() for turn in logits]


def prompt_questions(prompt: str | list[str] | None, cfg: Config) -> list[str]:
    """The requests asked, one turn each: the given prompt(s), else the run's task.prompt with task.class_name. An
    empty request is refused (a model asked nothing answers anything)."""
    if prompt is None:
        return [question(None, cfg)]
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(p.strip() for p in prompts):
        raise DataError("the prompt is empty: type what to segment (e.g. 'Please segment the lesion.')")
    return prompts


def segvlm_image(run, path: Path, req: PredictRequest) -> ImagePrediction:
    """One image's conversation (``req.prompt``: one turn per request) and one probability map per [SEG] of the
    answers, in order over the turns (probs [K, H, W] at the image's resolution, zero outside the field of view);
    ``run`` is a ``LoadedRun``. `medtune predict` writes it to files, `medtune app` shows it."""
    questions = prompt_questions(req.prompt, run.cfg)
    sample = mask_predict.read_input(run, path)
    answers, turn_probs = generated_masks(run.model, run.cfg, sample.image, questions, run.device)
    h, w = sample.image.shape[-2:]
    probs = np.concatenate([p.reshape(-1, h, w) for p in turn_probs]) if turn_probs else np.zeros((0, h, w))
    return ImagePrediction(image=sample.image, probs=(probs * sample.fov).astype(np.float32),  # nothing outside FOV
                           answer="\n".join(answers),
                           turns=[(q, a, p.shape[0]) for q, a, p in zip(questions, answers, turn_probs)])


def segvlm_prompt_option(cfg: Config) -> str:
    return "prompt"


def predict_segvlm(req: PredictRequest) -> list[str]:
    """Generated answers with one mask per [SEG] (task ``segvlm``): `STEM_answer.txt`,
    `STEM_seg{k}_{mask,prob,overlay}.png` (k counts the [SEG] of all answers in order), and predict.json listing
    every answer and the images whose answers held no [SEG]. Several prompts (``--prompt`` repeated) are asked in
    one conversation, one turn each (as the model was trained on several referring expressions of one image)."""
    req.refuse("segmenting VLM", box="box-prompted mask runs", question="instruction-tuned VLM runs (family vlm)",
               frame="video runs (family sam2_video)")
    run_dir, out_dir = Path(req.run_dir), Path(req.out_dir)
    run = load_run(run_dir, req.checkpoint)
    thr, source = (req.threshold, "given") if req.threshold is not None else mask_predict.calibrated_threshold(run_dir)
    questions = prompt_questions(req.prompt, run.cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, answers, turns, without_seg = [], {}, {}, []
    for path in tqdm([Path(p) for p in req.images], desc="predict", unit="img"):
        pred = segvlm_image(run, path, req)
        answers[str(path)] = pred.answer
        stem = out_dir / path.stem
        Path(f"{stem}_answer.txt").write_text(pred.answer + "\n")
        k = 0
        turns[str(path)] = []
        for q, answer, n_maps in pred.turns:
            files = []
            for prob in pred.probs[k:k + n_maps]:
                written.append(mask_predict.write_maps(f"{stem}_seg{k}", pred.image, prob, thr))
                files.append(f"{path.stem}_seg{k}_mask.png")
                k += 1
            turns[str(path)].append({"question": q, "answer": answer, "masks": files})
        if k == 0:
            without_seg.append(str(path))
    if without_seg:
        log.warning("%d of %d images got answers without %s, so no mask: %s", len(without_seg), len(answers),
                    run.cfg.model.vlm.seg_token, without_seg[:5])
    (out_dir / "predict.json").write_text(json.dumps({
        "run": str(run_dir), "question": questions[0] if len(questions) == 1 else questions, "threshold": thr,
        "threshold_source": source, "answers": answers, "turns": turns, "answers_without_seg": without_seg,
        "no_seg_rate": len(without_seg) / max(len(answers), 1)}, indent=2))
    return [f"{path}: {answer}" for path, answer in answers.items()] + [
        f"{len(written)} masks (+ probability maps, overlays) written to {out_dir} (threshold {thr:.3f}: {source})"]


def evaluate_run(run_dir, split: str = "test", checkpoint: str = "best", device=None,
                 strategy: str | None = None, data_file=None, image_root=None) -> dict:
    return mask_eval.evaluate_run(TASK, run_dir, split, checkpoint, device, strategy, data_file, image_root)


TASK = Task(
    name="segvlm",
    train_dataset=train_dataset,
    make_loss=make_loss,
    validate=validate,
    selection_metric="val_dice",
    evaluate_run=evaluate_run,
    format_summary=mask_eval.format_summary,
    predict=predict_segvlm,
    predict_image=segvlm_image,
    prompt_option=segvlm_prompt_option,
    write_report=masks.write_report,
    compare=masks.compare,
    collate=collate,
    target_probabilities=target_probabilities,
    mask_targets=mask_targets,
    free_generation=free_generation,
    generation_summary=generation_summary,
)
