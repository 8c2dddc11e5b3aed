"""Task ``instruct``: instruction tuning of a vision-language model on image + conversation samples (llava_json).

Training: the language-model loss on the assistant tokens only (``ChatCodec`` labels), normalised by the number of
supervised tokens in the *global* batch, so 2 processes with half the batch each give the gradient of 1 process
with the whole batch. Building the dataset decodes no image: every training conversation's token count is taken from
its text and its image's size in the file header, and a sample that would need truncation, or whose conversation the
chat template cannot render turn by turn, is refused then, with its id; images are decoded and run through the
processor on access, in the DataLoader's workers.

Validation and evaluation: greedy, batched generation of each sample's last answer from the conversation before it,
parsed into a label (``medtune.answers``): accuracy (``val_accuracy`` picks `best`), macro-F1, per-class
precision / recall / F1, the confusion matrix with its "invalid answer" column, bootstrap CIs, and the majority-class
rate of the training split to read them against. An evaluation or prediction whose answers are all empty is an error
(generation that does not work), never an accuracy of 0; validation logs it and training goes on.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from medtune.answers import INVALID, answer_vocabulary, classification_metrics, format_classification, parse_answer
from medtune.atomic import write_csv_atomic, write_json_atomic
from medtune.config import Config
from medtune.data.conversations import final_answer, question_turns
from medtune.data.layouts import format_problems
from medtune.data.loading import image_size, records
from medtune.data.types import DataError, LoadedSample, Sample
from medtune.errors import UserError
from medtune.models.vlm.model import IGNORE_INDEX, ChatCodec, collate
from medtune.models.vlm.processing import to_pil
from medtune.tasks.base import ImagePrediction, LossFn, PredictRequest, Task

log = logging.getLogger("medtune")

# Without task.labels, distinct reference answers become the label set only when there are this few of them
# (a classification-style data set); free-text answers need task.labels.
MAX_AUTO_LABELS = 20


def _codec(model) -> ChatCodec:
    seg = model.module if hasattr(model, "module") else model
    if not hasattr(seg, "text_codec"):
        raise UserError("task instruct needs a vision-language model family (model.family: vlm)")
    return seg.text_codec()


def require_conversations(samples: Sequence[LoadedSample] | Sequence[Sample]) -> None:
    missing = [s.id for s in samples if not s.conversations]
    if missing:
        raise DataError(f"task instruct needs image + conversation samples (data.layout llava_json); {len(missing)} "
                        f"sample(s) have none, e.g. {missing[0]}")


# ---- training ------------------------------------------------------------------------------------------------------
class InstructDataset(Dataset):
    """Items = ``ChatCodec.encode`` of each sample (tensors only, plus its id); keys may be ``(index, epoch)``.

    Nothing is decoded when it is built: the image is decoded and run through the processor on access (in the
    DataLoader's workers when ``samples`` is a ``LazySamples``), once per item. What can be refused up front is, from
    the conversation's text and the image's size in its file header: a conversation the chat template cannot render
    turn by turn, and one longer than ``model.vlm.max_length`` (only those few are decoded, for the exact message)."""

    def __init__(self, samples: Sequence[LoadedSample], codec: ChatCodec):
        meta = records(samples)
        require_conversations(meta)
        self.samples, self.codec = samples, codec
        problems = []
        for i, s in enumerate(meta):  # refuse now, with every offending id, rather than at step 5000
            try:
                n_tokens = codec.length(s.conversations, image_size(samples, i), s.id)
                if codec.max_length is not None and n_tokens > codec.max_length:
                    codec.encode(s.conversations, to_pil(samples[i].image), s.id)  # raises, naming what is cut
            except DataError as err:
                problems.append(str(err))
        if problems:
            raise DataError(format_problems(problems, f"{len(problems)} of {len(meta)} training conversations"))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> dict:
        s = self.samples[key[0] if isinstance(key, (tuple, list)) else key]
        return self.codec.encode(s.conversations, to_pil(s.image), s.id)


def train_dataset(samples: Sequence[LoadedSample], cfg: Config, model) -> InstructDataset:
    return InstructDataset(samples, _codec(model))


def train_collate(items: list[dict]) -> dict:
    return collate(items, padding_side="right")


def supervised_tokens(batch: dict) -> torch.Tensor:
    """Supervised (shifted) answer tokens in this process's batch: what its loss is the mean over."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum().to(torch.float32)


def make_loss(cfg: Config) -> LossFn:
    def loss(model, batch: dict):
        # the mean over this batch's answer tokens (0, not NaN, when it has none); the recipe weights it by
        # supervised_tokens / the tokens of all micro-batches on all processes, so that accumulated micro-batches and
        # N processes give the gradient of one big batch's token mean (train/sft.py)
        normaliser = supervised_tokens(batch).clamp(min=1)
        out = model(batch={**batch, "num_items_in_batch": normaliser})
        return out.lm_loss, {"lm": float(out.lm_loss.detach())}

    return loss


# ---- answers -------------------------------------------------------------------------------------------------------
def generate_answers(model, samples: list[LoadedSample], cfg: Config, device, desc: str = "answers",
                     batch_size: int | None = None) -> list[str]:
    """Greedy answer to each sample's last question (the conversation before its last answer), in batches."""
    seg = model.module if hasattr(model, "module") else model
    codec = _codec(seg)
    batch_size = batch_size or cfg.data.batch_size
    was_training = seg.training
    seg.eval()
    answers: list[str] = []
    try:
        for start in tqdm(range(0, len(samples), batch_size), desc=desc, unit="batch", leave=False,
                          disable=len(samples) <= batch_size):
            chunk = samples[start:start + batch_size]
            items = [codec.encode(s.conversations, to_pil(s.image), s.id, for_generation=True, check_length=False)
                     for s in chunk]
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collate(items, "left").items()}
            new = seg.generate(batch, max_new_tokens=cfg.task.max_new_tokens)
            answers += [codec.decode(row) for row in new]
    finally:
        seg.train(was_training)
    return answers


def require_text(answers: list[str], what: str, scored: bool = True, fatal: bool = True) -> None:
    """Refuse an answer set without any text: that is a generation that does not work (a model stopping at once, a
    generate() output read at the wrong place), which scoring would turn into a plausible-looking accuracy of 0.
    ``fatal=False``: the same line as a warning (validation during training, where a model early in training may stop
    at once; predict, whose answers are written, not scored: ``scored=False``)."""
    if answers and not any(a.strip() for a in answers):
        message = (
            f"generation produced no text: all {len(answers)} answers ({what}) are empty"
            + (", so each would be scored as an invalid answer" if scored else "")
            + ". Likely cause: the model ends its turn at once because the generation prompt is not the one it was "
            "trained on (check model.vlm.chat_template and the checkpoint's chat template / stop tokens), or the "
            "model's generate() returns no answer tokens")
        if fatal:
            raise UserError(message)
        log.warning(message)


def resolve_labels(cfg: Config, samples: list[LoadedSample] | list[Sample]) -> list[str]:
    """task.labels, else the samples' class labels (llava_json "label"), else their distinct reference answers when
    there are few of them."""
    if cfg.task.labels:
        return list(cfg.task.labels)
    labels = sorted({s.label for s in samples if s.label})
    if labels:
        return labels
    answers = sorted({" ".join(final_answer(s.conversations).lower().split()) for s in samples if s.conversations})
    if 0 < len(answers) <= MAX_AUTO_LABELS:
        return answers
    raise UserError(f"cannot tell the answer labels: the samples carry no 'label' and have {len(answers)} distinct "
                     "answers; set task.labels (e.g. task.labels=[benign,malignant])")


def reference_label(sample: LoadedSample | Sample, vocab: dict[str, str], labels: list[str]) -> str | None:
    if sample.label in labels:
        return sample.label
    return parse_answer(final_answer(sample.conversations), vocab).label if sample.conversations else None


def score(samples: Sequence[LoadedSample] | Sequence[Sample], answers: list[str], labels: list[str],
          cfg: Config) -> list[dict]:
    """One row per sample: question, reference, answer, their labels and whether the answer is right."""
    vocab = answer_vocabulary(labels, cfg.task.synonyms)
    rows = []
    for s, answer in zip(samples, answers):
        ref = reference_label(s, vocab, labels)
        pred = parse_answer(answer, vocab).label
        question = question_turns(s.conversations)[-1]["content"] if s.conversations else ""
        rows.append({"id": s.id, "question": question.replace("<image>", "").strip(),
                     "reference": final_answer(s.conversations), "answer": answer,
                     "reference_label": ref or "", "answer_label": pred or INVALID,
                     "correct": "" if ref is None else int(pred == ref)})
    return rows


@torch.no_grad()
def teacher_forced_loss(model, samples: list[LoadedSample], cfg: Config, device) -> float:
    """Mean LM loss over the answer tokens of ``samples``: a continuous companion to the accuracy."""
    seg = model.module if hasattr(model, "module") else model
    codec = _codec(seg)
    total, count = 0.0, 0
    was_training = seg.training
    seg.eval()
    try:
        for start in range(0, len(samples), cfg.data.batch_size):
            items = [codec.encode(s.conversations, to_pil(s.image), s.id, check_length=False)
                     for s in samples[start:start + cfg.data.batch_size]]
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in train_collate(items).items()}
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(seg(batch={**batch, "num_items_in_batch": 1.0}).lm_loss)
            count += n
    finally:
        seg.train(was_training)
    return total / max(count, 1)


def validate(model, val: Sequence[LoadedSample], cfg: Config, device) -> dict[str, float]:
    """val_accuracy (picks `best`), val_macro_f1, val_invalid_rate from greedy answers; val_lm_loss teacher-forced.
    A lazy ``val`` is decoded twice (generation, teacher forcing), one batch at a time."""
    require_conversations(records(val))
    # the label set of the whole data set, as `medtune eval` uses: a small (or capped) val split may miss a class,
    # and an answer naming it must count as a wrong label, not as an invalid answer
    from medtune.data.layouts import discover

    labels = resolve_labels(cfg, discover(cfg.data))
    answers = generate_answers(model, val, cfg, device, "val answers")
    require_text(answers, "validation", fatal=False)  # training goes on; the log says why
    rows = score(records(val), answers, labels, cfg)
    scored = [r for r in rows if r["reference_label"]]
    out = {"val_lm_loss": teacher_forced_loss(model, val, cfg, device)}
    if scored:
        m = classification_metrics([r["reference_label"] for r in scored],
                                   [None if r["answer_label"] == INVALID else r["answer_label"] for r in scored],
                                   labels, n_boot=1)
        out.update(val_accuracy=m["accuracy"]["mean"], val_macro_f1=m["macro_f1"]["mean"],
                   val_invalid_rate=m["n_invalid"] / m["n"])
    return out


# ---- evaluation of a run -------------------------------------------------------------------------------------------
def evaluate_model(model, cfg: Config, run_dir: Path, split: str = "test", device=None,
                   checkpoint_name: str = "-", data_file: str | Path | None = None,
                   image_root: str | Path | None = None) -> tuple[dict, list[dict]]:
    """Answers to ``split`` of the run's data, or (``data_file``) to every sample of another data file, scored
    against the run's label set (its whole data set's, as in validation)."""
    from medtune.data.run_split import external_data, load_split_samples, prepare_split

    data = prepare_split(cfg, run_dir)
    if data_file is None and not data.split.get(split):
        raise UserError(f"split '{split}' of {run_dir / 'split.json'} is empty; choose one of "
                         f"{[k for k, v in data.split.items() if v]}")
    labels = resolve_labels(cfg, list(data.samples.values()))
    vocab = answer_vocabulary(labels, cfg.task.synonyms)
    train_refs = Counter(reference_label(data.samples[i], vocab, labels) for i in data.split.get("train", []))
    train_refs.pop(None, None)
    majority = min(train_refs, key=lambda k: (-train_refs[k], k)) if train_refs else None

    source = {}
    if data_file is not None:
        cfg, data = external_data(cfg, data, data_file, image_root, run_dir)
        split = next(iter(data.split))
        source = {"data": cfg.data.path}
    samples = load_split_samples(cfg, data, split, run_dir)
    require_conversations(samples)
    answers = generate_answers(model, samples, cfg, device, split)
    require_text(answers, f"split {split!r}")
    rows = score(samples, answers, labels, cfg)
    scored = [r for r in rows if r["reference_label"]]
    metrics = classification_metrics([r["reference_label"] for r in scored],
                                     [None if r["answer_label"] == INVALID else r["answer_label"] for r in scored],
                                     labels, n_boot=cfg.eval.bootstrap, majority_label=majority)
    summary = {"task": "instruct", "run": str(run_dir), "checkpoint": checkpoint_name, "split": split, **source,
               "n_samples": len(rows), "n_without_reference_label": len(rows) - len(scored),
               "generation": {"greedy": True, "max_new_tokens": cfg.task.max_new_tokens},
               "classification": metrics}
    return summary, rows


def evaluate_run(run_dir: str | Path, split: str = "test", checkpoint: str = "best", device=None,
                 strategy: str | None = None, data_file: str | Path | None = None,
                 image_root: str | Path | None = None) -> dict:
    """RUN/eval/<split>/{answers.csv, per_image.csv (id, correct), summary.json}; with ``data_file``, every sample
    of that file in RUN/eval/data-<its name>/ (the run's own evaluations stay)."""
    from medtune.runs.load import default_device, load_run_model

    if strategy is not None:
        raise UserError("--calibration sets how a mask threshold is fitted; answers have no threshold (instruct run)")
    run_dir = Path(run_dir)
    device = device or default_device()
    cfg, model, ckpt = load_run_model(run_dir, checkpoint, device)
    summary, rows = evaluate_model(model, cfg, run_dir, split, device, ckpt.name, data_file, image_root)
    out = run_dir / "eval" / summary["split"]
    out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out / "answers.csv", rows)
    # the per-sample score, paired by id in `medtune compare`
    write_csv_atomic(out / "per_image.csv", [{"id": r["id"], "correct": r["correct"]} for r in rows])
    write_json_atomic(out / "summary.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    head = (f"{summary['run']}  [{summary['split']}, {summary['n_samples']} samples, checkpoint "
            f"{summary['checkpoint']}, greedy answers]")
    lines = [head] + ([f"  data: {summary['data']}"] if summary.get("data") else [])
    lines += format_classification(summary["classification"])
    if summary.get("n_without_reference_label"):
        lines.append(f"  {summary['n_without_reference_label']} sample(s) whose reference answer names no label were "
                     "not scored")
    return "\n".join(lines)


def _evaluated_labels(run_dir: Path) -> list[str] | None:
    """The label set an earlier `medtune eval` of the run resolved, if any."""
    for summary in sorted(run_dir.glob("eval/*/summary.json")):
        labels = json.loads(summary.read_text()).get("classification", {}).get("labels")
        if labels:
            return labels
    return None


def _require_question(req: PredictRequest) -> str:
    if req.question is None or not req.question.strip():
        raise UserError(f"{req.run_dir} is an instruction-tuned VLM run: pass --question \"...\" (asked about each "
                        "image)")
    return req.question


def answer_images(run, images: list[Path], question: str, desc: str = "predict") -> list[ImagePrediction]:
    """The greedy answer to ``question`` about each image (batched) and the label it parses to ("" when the run has
    no label set); ``run`` is a ``LoadedRun``."""
    from medtune.data.io import read_image

    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise DataError(f"{missing[0]}: no such image file" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                               else ""))
    cfg = run.cfg
    text = question if "<image>" in question else "<image>\n" + question
    samples = [LoadedSample(id=Path(p).stem, image=read_image(Path(p), cfg.data.channels), mask=None, fov=None,
                            conversations=[{"role": "user", "content": text}]) for p in images]
    answers = generate_answers(run.model, samples, cfg, run.device, desc)
    require_text(answers, desc, scored=False, fatal=False)
    labels = cfg.task.labels or _evaluated_labels(run.run_dir)
    vocab = answer_vocabulary(labels, cfg.task.synonyms) if labels else None
    return [ImagePrediction(image=s.image, probs=np.zeros((0, *s.image.shape[-2:]), np.float32), answer=a,
                            label=(parse_answer(a, vocab).label or INVALID) if vocab else "")
            for s, a in zip(samples, answers)]


def answer_image(run, path: Path, req: PredictRequest) -> ImagePrediction:
    return answer_images(run, [Path(path)], _require_question(req), "answer")[0]


def question_option(cfg: Config) -> str:
    return "question"


def predict_answers(req: PredictRequest, device=None) -> list[dict]:
    """`medtune predict RUN IMAGES --question "..."`: the greedy answer (and its label) for each image, saved to
    OUT/answers.json and OUT/answers.csv."""
    from medtune.runs.load import load_run

    req.refuse("instruction-tuned VLM", box="box-prompted mask runs", prompt="segmenting VLM runs (family segvlm)",
               threshold="mask runs", frame="video runs (family sam2_video)")
    question = _require_question(req)
    run_dir, out_dir, images = Path(req.run_dir), Path(req.out_dir), req.images
    run = load_run(run_dir, req.checkpoint, device)
    preds = answer_images(run, [Path(p) for p in images], question)
    rows = [{"image": str(p), "question": question, "answer": pred.answer, "label": pred.label}
            for p, pred in zip(images, preds)]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "answers.json").write_text(json.dumps({"run": str(run_dir), "checkpoint": str(run.checkpoint),
                                                      "answers": rows}, indent=2) + "\n")
    write_csv_atomic(out_dir / "answers.csv", rows)
    return rows


def predict(req: PredictRequest) -> list[str]:
    rows = predict_answers(req)
    return [f"{row['image']}: {row['answer']}" + (f"  [{row['label']}]" if row["label"] else "") for row in rows] + [
        f"answers written to {Path(req.out_dir) / 'answers.json'} and answers.csv"]


def write_report(run_dir: Path, split: str = "test") -> Path:
    from medtune.report.answers import write_answers_report

    return write_answers_report(run_dir, split)


def compare(runs: list[Path], out_dir: Path | None = None, split: str = "test", at: str = "cal",
            allow_eval_mismatch: bool = False) -> str:
    """Answers paired by sample id (paired bootstrap, McNemar); no threshold, so ``at`` does not apply."""
    from medtune.report.answers import compare_answer_runs

    return compare_answer_runs(runs, out_dir, split)


TASK = Task(
    name="instruct",
    train_dataset=train_dataset,
    make_loss=make_loss,
    loss_units=supervised_tokens,
    validate=validate,
    selection_metric="val_accuracy",
    evaluate_run=evaluate_run,
    format_summary=format_summary,
    predict=predict,
    write_report=write_report,
    compare=compare,
    predict_image=answer_image,
    prompt_option=question_option,
    collate=train_collate,
)
