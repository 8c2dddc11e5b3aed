"""Task ``video``: frame sequences in, one mask per frame out, through a model with a memory: family ``sam2_video``,
or a segmenting VLM whose mask head is a SAM 2 video model (Sa2VA's video path).

One flat implementation for both: the model brings the hooks that differ (``clip_encoder``: a clip and its
conversation -> the clip forward's item; ``clip_collate``; ``segment_video``: the answer, if the model answers, and
the propagation through a whole video), and ``takes_question`` says whether a clip is about one referring expression.
The question of a clip or a video is its expression where the data has them (sa2va_video), else ``task.prompt`` with
``task.class_name``; the teacher-forced answer is ``task.answer``. A model without a question ignores both.

Training: clips of ``data.video.clip_length`` frames (``VideoClipDataset``, made the model's items by its
``clip_encoder``) go through the model's clip forward with gradient; the loss (``models.video.clip_objective``:
``clip_loss`` with ``ComboLoss``, plus ``task.lm_weight`` x the LM loss of a model that answers) is on the annotated
frames only: unannotated and padding frames carry the memory and no loss, and a mask-prompted frame, whose output is
the prompt, none either. The supervised recipe (``train/sft.py``) and the RL recipe (``train/rl.py``: the mask policy
on every supervised frame of a clip, ``mask_targets``) run unchanged.

Validation, evaluation and prediction propagate through whole videos (the model's ``segment_video``: a bounded memory
bank; a segmenting VLM first answers the question from its frames, and its [SEG] prompts the memory): each frame
resized to ``data.patch_size`` square as training resized it, the probability map mapped back to the frame's own
size. Prompted runs (``model.prompt=mask|box``) are prompted on the first annotated frame by its ground truth (the
semi-supervised video-object-segmentation protocol); that frame is not scored for a mask prompt. A segmenting VLM's
answers go to per_video.csv (evaluation) and next to the masks (prediction).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from medtune.config import Config
from medtune.data.datasets import mask_box, resize_square
from medtune.data.io import read_mask
from medtune.data.loading import resample_to_native
from medtune.data.run_split import evaluated_split, evaluation_data, load_split_samples, use_recorded_image_max
from medtune.data.types import DataError
from medtune.data.video import (
    FrameReader,
    VideoClipDataset,
    VideoSample,
    open_frames,
    read_video_mask,
)
from medtune.data.video_layouts import video_from_path
from medtune.errors import ConfigError, UserError
from medtune.losses import ComboLoss
from medtune.tasks.base import ImagePrediction, LossFn, PredictRequest, TargetPrediction, Task
from medtune.tasks.mask_predict import calibrated_threshold, overlay
from medtune.tasks.masks import pooled_validation
from medtune.tasks.segvlm import question as target_question
from medtune.tasks.video_eval import calibrate_videos, evaluate_videos, format_summary

log = logging.getLogger("medtune")

# probability maps are written as 16-bit PNGs: 1/65535 steps, exact enough for any threshold a user picks later
PROB_PNG_MAX = 65535
# the overlay video: MPEG-4 Part 2 is in every FFmpeg build PyAV ships (H.264 encoders are not); yuv420p needs even
# sides, so odd frames are padded by one pixel
OVERLAY_CODEC, OVERLAY_PIXEL_FORMAT = "mpeg4", "yuv420p"
OVERLAY_BIT_RATE = 4_000_000
# frame rate of the overlay video when the input carries none (a frame folder without data.video.fps)
DEFAULT_OVERLAY_FPS = 10.0


def _require_clip_model(model, cfg: Config) -> None:
    """The video task trains a model that takes clips (the hooks ``clip_encoder``, ``clip_collate``,
    ``segment_video``: family sam2_video, a segmenting VLM): one line otherwise."""
    if not callable(getattr(model, "clip_encoder", None)):
        raise ConfigError(f"task video trains clips through a model with a memory (model.family=sam2_video, or "
                          f"segvlm with a SAM 2 video mask head); model.family={cfg.model.family} segments single "
                          "images: set model.family=sam2_video, or use an image layout with task.kind=masks")


# the module of SAM 2's mask decoder that decides whether the object is in a frame at all (a hard gate: a frame it
# calls empty gets constant logits)
OBJECT_SCORE_HEAD = "pred_obj_score_head"


def _check_rl(model, cfg: Config) -> None:
    """objective: rl samples each supervised frame's mask from its logits (the mask policy, unchanged). The object-score
    head is no part of that policy, so no policy gradient reaches it: refuse a run that would train it (the default
    lora.modules_to_save holds the whole mask decoder) in one line, before the preflight finds it dead."""
    gate = [n for n, p in model.named_parameters() if p.requires_grad and OBJECT_SCORE_HEAD in n]
    if cfg.objective == "rl" and gate:
        raise ConfigError("objective: rl on video samples each frame's mask from its logits, and no policy gradient "
                          "reaches SAM 2's object-score head (its present/absent gate), which lora.modules_to_save "
                          "trains with the mask decoder: set lora.modules_to_save=[] (LoRA in the encoder and memory "
                          "attention) or a list without mask_decoder")


def clip_question(text: str | None, cfg: Config) -> str:
    """The question of a clip or a video: its referring expression (sa2va_video), else ``task.prompt`` with
    ``task.class_name`` (the image task's rule)."""
    return target_question(text, cfg)


class ModelClipDataset(Dataset):
    """``VideoClipDataset``'s clips as the model's items: ``encode(clip, question, task.answer)`` (the model's
    ``clip_encoder``; a picklable function, for DataLoader workers), batched by ``collate`` (the model's
    ``clip_collate``), which the recipes take from the dataset."""

    def __init__(self, clips: VideoClipDataset, encode, collate, cfg: Config):
        self.clips, self.encode, self.collate = clips, encode, collate
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, key) -> dict:
        clip = self.clips[key]
        return self.encode(clip, clip_question(clip["text"], self.cfg), self.cfg.task.answer)


def train_dataset(videos: list[VideoSample], cfg: Config, model) -> ModelClipDataset:
    _require_clip_model(model, cfg)
    _check_rl(model, cfg)
    clips = VideoClipDataset(videos, cfg.data, seed=cfg.run.seed, per_target=model.takes_question)
    return ModelClipDataset(clips, model.clip_encoder(), model.clip_collate, cfg)


def mask_targets(out, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, target, fov), each [N, 1, H, W] over the N supervised frames of the batch: what the RL recipe's mask
    policy samples from and is rewarded on."""
    from medtune.models.video import supervised_frames

    selected = supervised_frames(out, batch)
    logits = out.mask_logits.flatten(0, 1)[selected]
    target = batch["masks"].flatten(0, 1).to(logits.device)[selected].float()
    fov = batch["fov"].flatten(0, 1).to(logits.device)[selected].float()
    return logits, target, fov


def make_loss(cfg: Config) -> LossFn:
    from medtune.models.video import clip_objective

    combo = ComboLoss(cfg.loss)
    lm_weight = cfg.task.lm_weight

    def loss(model, batch: dict):
        return clip_objective(model(batch=batch), batch, combo, lm_weight)

    return loss


def loss_units(batch: dict) -> torch.Tensor:
    """The annotated frames of a batch: the loss is a mean over them, so gradient accumulation and processes weigh
    micro-batches by them (a mask-prompted frame counts too: one per clip, alike in every micro-batch)."""
    return batch["annotated"].sum().float()


# ---- whole videos: propagation --------------------------------------------------------------------------------------
class ModelFrames(Sequence):
    """A video's frames as the model saw them in training: float [C, S, S] tensors (S = data.patch_size), read one at
    a time from a FrameReader (random access, for propagating back from a later prompt)."""

    def __init__(self, reader: FrameReader, size: int):
        self.reader, self.size = reader, size

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self.reader):
            raise IndexError(i)
        frame = torch.from_numpy(self.reader.read(i))
        return resize_square(frame, frame.new_zeros(1, *frame.shape[-2:]), self.size)[0]


@dataclass
class PromptSpec:
    """What prompts a video's propagation, at the frame's own size: a mask [H, W] or a box (x1, y1, x2, y2) on frame
    ``frame``, or nothing (semantic)."""

    frame: int = 0
    mask: np.ndarray | None = None
    box: tuple[float, float, float, float] | None = None


def ground_truth_prompt(video: VideoSample, cfg: Config) -> PromptSpec | None:
    """Evaluation's prompt: the first annotated frame's ground-truth mask (model.prompt=mask) or its box (box), as
    training prompts every clip; None in semantic mode."""
    if cfg.model.prompt == "none":
        return None
    if not video.annotated:
        raise DataError(f"video {video.id}: no annotated frame to prompt on (model.prompt={cfg.model.prompt}); "
                        "annotate one frame or remove the video")
    first = video.annotated[0]
    mask = read_video_mask(video, first, cfg.data)
    if cfg.model.prompt == "mask":
        return PromptSpec(frame=first, mask=mask)
    return PromptSpec(frame=first, box=tuple(float(v) for v in mask_box(torch.from_numpy(mask))))


def _model_prompt(spec: PromptSpec | None, frame_size: tuple[int, int], size: int):
    """A PromptSpec at the frame's size -> the model's VideoPrompt at the training size S x S."""
    from medtune.models.video import VideoPrompt

    if spec is None:
        return None
    h, w = frame_size
    if spec.mask is not None:
        if tuple(spec.mask.shape) != (h, w):
            raise DataError(f"the mask prompt is {spec.mask.shape[0]}x{spec.mask.shape[1]} but the video's frames are "
                            f"{h}x{w}; give a mask of the frame's size")
        mask = torch.from_numpy(np.ascontiguousarray(spec.mask)).float()[None, None]
        mask = F.interpolate(mask, size=(size, size), mode="nearest-exact")[0, 0]
        return VideoPrompt(frame=spec.frame, mask=mask)
    if spec.box is not None:
        x1, y1, x2, y2 = spec.box
        return VideoPrompt(frame=spec.frame, box=(x1 * size / w, y1 * size / h, x2 * size / w, y2 * size / h))
    return VideoPrompt(frame=spec.frame)


def propagate_video(model, video: VideoSample, cfg: Config, prompt: PromptSpec | None = None,
                    question: str | None = None, on_answer: Callable | None = None, memory: bool = True,
                    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yields (frame index, probability float32 [H, W] at the frame's own size, the frame float32 [C, H, W]) for every
    frame of ``video``, in the order the model propagates (the prompted frame, forward to the end, then back to 0),
    through the model's ``segment_video`` (``question``: what a segmenting VLM is asked; its answer goes to
    ``on_answer`` before the first frame). One frame in memory at a time besides the model's bounded memory bank.
    ``memory=False``: every frame alone (the memory ablation, ``models.video.propagate_without_memory``; semantic
    runs of a model without a question only: a prompt, or a [SEG] answer, reaches the other frames through the
    memory)."""
    from medtune.models.video import propagate_without_memory

    size = cfg.data.patch_size
    with open_frames(video, cfg.data) as reader:
        if prompt is not None and not 0 <= prompt.frame < len(reader):
            raise DataError(f"video {video.id}: the prompt is on frame {prompt.frame} but the video has {len(reader)} "
                            f"frames (0-{len(reader) - 1})")
        first = reader.read(prompt.frame if prompt is not None else 0)
        frame_size = tuple(first.shape[-2:])
        frames = ModelFrames(reader, size)
        if not memory and (prompt is not None or model.takes_question):
            raise ConfigError(f"video {video.id}: the memory carries the prompt to the other frames; only a semantic "
                              "run of the sam2_video family (model.prompt=none) segments without its memory")
        if memory:
            answer, probs = model.segment_video(frames, _model_prompt(prompt, frame_size, size), question,
                                                cfg.task.max_new_tokens)
        else:
            answer, probs = None, propagate_without_memory(model, frames)
        if on_answer is not None:
            on_answer(answer)
        for index, prob in probs:
            native = resample_to_native(prob.numpy().astype(np.float32), frame_size)
            yield index, np.clip(native, 0.0, 1.0), reader.read(index)


@dataclass
class VideoQuery:
    """What one scored sequence of a video is: its id (the video's; ``video#k`` for expression k of a video with
    several), the question asked, and the expression whose masks are its ground truth (None: the union)."""

    id: str
    question: str
    target: int | None = None


def video_queries(video: VideoSample, cfg: Config, takes_question: bool) -> list[VideoQuery]:
    """A model that reads the question is asked about each referring expression of a video that has them, each
    scored on its own masks; otherwise the video is one sequence (the union of its objects)."""
    targets = [k for k, t in enumerate(video.targets) if t.rles] if takes_question else []
    if not targets:
        return [VideoQuery(video.id, clip_question(None, cfg))]
    multi = len(video.targets) > 1
    return [VideoQuery(f"{video.id}#{k}" if multi else video.id, clip_question(video.targets[k].text, cfg), k)
            for k in targets]


def answer_columns(answer) -> dict:
    """A generated answer's columns in per_video.csv (nothing for a model that does not answer)."""
    return {} if answer is None else {"answer": answer.answer, "has_seg": int(answer.n_seg > 0)}


def video_probabilities(model, video: VideoSample, cfg: Config, memory: bool = True,
                        ) -> Iterator[tuple[VideoQuery, dict, dict, set, dict]]:
    """Per query of the video (``video_queries``): (the query, probabilities of every frame, ground truth of its
    annotated frames, frames not to score: the mask-prompted one, the answer's columns), prompted by the ground truth
    as training was, or asked the query's question (``memory``: see ``propagate_video``)."""
    prompt = ground_truth_prompt(video, cfg)
    exclude = {prompt.frame} if prompt is not None and prompt.mask is not None else set()
    for query in video_queries(video, cfg, model.takes_question):
        answers: list = []
        probs = {i: prob for i, prob, _ in propagate_video(model, video, cfg, prompt, query.question,
                                                           answers.append, memory)}
        annotated = video.annotated if query.target is None else sorted(video.targets[query.target].rles)
        gts = {i: read_video_mask(video, i, cfg.data, query.target) for i in annotated}
        yield query, probs, gts, exclude, answer_columns(answers[0])


def target_probabilities(model, video: VideoSample, cfg: Config, device) -> list[TargetPrediction]:
    """One prediction per scored annotated frame (id ``video#frame``, ``video#k#frame`` per expression), from
    propagating the whole video: what validation (and RL's validation reward) pool."""
    return [TargetPrediction(f"{query.id}#{i}", probs[i], gts[i], np.ones_like(gts[i]), video, query.target)
            for query, probs, gts, exclude, _ in video_probabilities(model, video, cfg)
            for i in sorted(gts) if i not in exclude]


def validate(model, videos: list[VideoSample], cfg: Config, device) -> dict[str, float]:
    """Pooled Dice / AUC at 0.5 over the annotated frames of the validation videos, each propagated whole."""
    return pooled_validation([p for v in videos for p in target_probabilities(model, v, cfg, device)])


# ---- prediction: a video file or a frame folder -> masks, probabilities, overlay video ------------------------------
def _question_of_request(req: PredictRequest, cfg: Config, prompts: list[str]) -> str:
    """A segmenting VLM's question: ``--prompt TEXT`` (one per video), else task.prompt with task.class_name."""
    if req.box is not None or req.frame is not None:
        option = "--box" if req.box is not None else "--frame"
        raise UserError(f"{option} is for mask- or box-prompted video runs; {req.run_dir} is asked a question: pass "
                        "--prompt TEXT")
    if len(prompts) > 1:
        raise UserError(f"{req.run_dir} segments one object per video from one question: pass one --prompt TEXT")
    if not prompts:
        return clip_question(None, cfg)
    if not prompts[0].strip():
        raise UserError("--prompt is empty: type what to segment (e.g. 'Please segment the vessel.')")
    return prompts[0]


def _prompt_of_request(req: PredictRequest, cfg: Config) -> tuple[PromptSpec | None, str | None]:
    """(the prompt, the question) `medtune predict` was given, checked against what the run was trained with."""
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt or [])
    if cfg.prompt_kind() == "text":
        return None, _question_of_request(req, cfg, prompts)
    return _mask_prompt_of_request(req, cfg, prompts), None


def _mask_prompt_of_request(req: PredictRequest, cfg: Config, prompts: list[str]) -> PromptSpec | None:
    frame = req.frame if req.frame is not None else 0
    if cfg.model.prompt == "none":
        if prompts or req.box is not None:
            raise UserError(f"{req.run_dir} segments without a prompt (model.prompt=none); drop --prompt / --box")
        return None
    if cfg.model.prompt == "box":
        if prompts:
            raise UserError(f"{req.run_dir} was trained with box prompts: give --box x1,y1,x2,y2 (and --frame N), "
                            "not --prompt")
        if req.box is None:
            raise UserError(f"{req.run_dir} was trained with box prompts: pass --box x1,y1,x2,y2 (pixels of frame "
                            "--frame, default 0)")
        return PromptSpec(frame=frame, box=req.box)
    if req.box is not None or len(prompts) != 1:
        raise UserError(f"{req.run_dir} was trained with mask prompts: pass --prompt MASK.png, one mask of frame "
                        "--frame (default 0) at the frame's size")
    path = Path(prompts[0])
    if not path.is_file():
        raise UserError(f"--prompt {path}: no such mask file (a PNG of the prompted frame, object > 0)")
    mask, _ = read_mask(path, cfg.data.mask_labels)
    if not mask.any():
        raise DataError(f"--prompt {path}: the mask is empty; draw the object on frame {frame}")
    return PromptSpec(frame=frame, mask=mask)


def check_prompt(prompt: PromptSpec | None, video: VideoSample) -> None:
    """The prompt fits the video: its frame exists, a mask has the frame's size (where the size is known)."""
    if prompt is None:
        return
    if not 0 <= prompt.frame < video.n_frames:
        raise UserError(f"--frame {prompt.frame}: video {video.id} has {video.n_frames} frames "
                        f"(0-{video.n_frames - 1})")
    if prompt.mask is not None and video.frame_size is not None and tuple(prompt.mask.shape) != video.frame_size:
        raise UserError(f"--prompt: the mask is {prompt.mask.shape[0]}x{prompt.mask.shape[1]} but video {video.id}'s "
                        f"frames are {video.frame_size[0]}x{video.frame_size[1]}; give a mask of the frame's size")


def _even_rgb(rgb: np.ndarray) -> np.ndarray:
    """Pad an H x W x 3 frame by one edge pixel where a side is odd (yuv420p needs even sides)."""
    pad_h, pad_w = rgb.shape[0] % 2, rgb.shape[1] % 2
    return np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge") if pad_h or pad_w else rgb


class OverlayWriter:
    """The overlay video, written frame by frame with PyAV (frames must arrive in order)."""

    def __init__(self, path: Path, fps: float):
        import av

        self.path = path
        self.container = av.open(str(path), "w")
        rate = Fraction(fps).limit_denominator(1001)
        self.stream = self.container.add_stream(OVERLAY_CODEC, rate=rate)
        self.stream.pix_fmt = OVERLAY_PIXEL_FORMAT
        self.stream.bit_rate = OVERLAY_BIT_RATE
        self.started = False

    def write(self, rgb: np.ndarray) -> None:
        import av

        rgb = _even_rgb(rgb)
        if not self.started:  # the stream takes its size from the first frame (PyAV's default is 640x480)
            self.stream.width, self.stream.height = rgb.shape[1], rgb.shape[0]
            self.started = True
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def predict_video(model, video: VideoSample, cfg: Config, out_dir: Path, threshold: float,
                  prompt: PromptSpec | None, question: str | None = None) -> dict:
    """One video -> ``out_dir/masks/NNNNN.png`` (0/255), ``out_dir/probs/NNNNN.png`` (16-bit, probability x 65535)
    and ``out_dir/overlay.mp4`` (the mask in green over every frame, in frame order), and ``out_dir/answer.txt``
    (a segmenting VLM's answer to ``question``). Frames are written as the model propagates; the overlay, which must
    be in order, is written after (from the masks and frames on disk) when propagation starts past frame 0. Returns
    what was written."""
    mask_dir, prob_dir = out_dir / "masks", out_dir / "probs"
    mask_dir.mkdir(parents=True, exist_ok=True)
    prob_dir.mkdir(parents=True, exist_ok=True)
    fps = video.fps or cfg.data.video.fps or DEFAULT_OVERLAY_FPS
    overlay_path = out_dir / "overlay.mp4"
    writer = OverlayWriter(overlay_path, fps)
    in_order = prompt is None or prompt.frame == 0
    answered: dict = {}

    def write_answer(answer) -> None:
        answered.update(answer_columns(answer))
        if answer is not None:
            (out_dir / "answer.txt").write_text(answer.answer + "\n")
            answered.update(question=question, n_seg=answer.n_seg, answer_file=str(out_dir / "answer.txt"))

    n = 0
    try:
        for index, prob, frame in tqdm(propagate_video(model, video, cfg, prompt, question, write_answer),
                                       total=video.n_frames, desc=video.id, unit="frame", leave=False):
            binary = (prob >= threshold).astype(np.uint8)
            Image.fromarray(binary * 255).save(mask_dir / f"{index:05d}.png")
            Image.fromarray((prob * PROB_PNG_MAX).round().astype(np.uint16)).save(prob_dir / f"{index:05d}.png")
            if in_order:
                writer.write(overlay(frame, binary))
            n += 1
        if not in_order:
            with open_frames(video, cfg.data) as reader:
                for index in range(n):
                    binary = (np.asarray(Image.open(mask_dir / f"{index:05d}.png")) > 0).astype(np.uint8)
                    writer.write(overlay(reader.read(index), binary))
    finally:
        writer.close()
    return {"video": video.id, "frames": n, "masks": str(mask_dir), "probabilities": str(prob_dir),
            "overlay": str(overlay_path), "fps": fps, **answered}


def predict(req: PredictRequest) -> list[str]:
    """`medtune predict RUN VIDEO.mp4 | FRAME_FOLDER/ ...`: per input, ``OUT/<name>/{masks,probs}/NNNNN.png`` and
    ``OUT/<name>/overlay.mp4``, and ``OUT/predict.json``; at the run's calibrated threshold unless --threshold."""
    from medtune.runs.files import load_run_config
    from medtune.runs.load import load_run

    req.refuse("video", question="instruction-tuned VLM runs")
    cfg = load_run_config(req.run_dir)
    prompt, question = _prompt_of_request(req, cfg)
    videos = [video_from_path(p, cfg.data) for p in req.images]  # every input checked before the model loads
    names = [v.id for v in videos]
    if len(set(names)) != len(names):
        raise UserError(f"two inputs are named {max(names, key=names.count)!r}; their outputs would share "
                        f"{req.out_dir}/<name>/: rename one")
    for video in videos:
        check_prompt(prompt, video)
    run = load_run(req.run_dir, req.checkpoint)
    cfg = run.cfg
    use_recorded_image_max(cfg, req.run_dir)  # 16-bit frames scaled like the training data
    thr, source = (req.threshold, "given") if req.threshold is not None else calibrated_threshold(req.run_dir)
    req.out_dir.mkdir(parents=True, exist_ok=True)
    written = [predict_video(run.model, v, cfg, req.out_dir / v.id, thr, prompt, question) for v in videos]
    (req.out_dir / "predict.json").write_text(json.dumps({
        "run": str(req.run_dir), "threshold": thr, "threshold_source": source,
        "prompt": None if prompt is None else {"frame": prompt.frame, "kind": "mask" if prompt.mask is not None
                                               else "box", "box": prompt.box},
        "question": question, "inputs": [str(p) for p in req.images], "videos": written}, indent=2))
    answers = [f"{w['video']}: {w['answer']}" for w in written if "answer" in w]
    return answers + [f"{w['video']}: {w['frames']} masks and probability maps in {req.out_dir / w['video']}, overlay "
                      f"{w['overlay']}" for w in written] + [f"threshold {thr:.3f}: {source}"]


def predict_image(run, path: Path, req: PredictRequest) -> ImagePrediction:
    """One image as a one-frame video (what `medtune app` shows): the model with nothing in its memory yet, at the
    image's own size (probs [1, H, W])."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such image file")
    use_recorded_image_max(run.cfg, run.run_dir)
    video = VideoSample(id=Path(path).stem, frames=[Path(path)], n_frames=1)
    prompt, question = _prompt_of_request(req, run.cfg)
    if prompt is not None and prompt.frame != 0:
        raise UserError(f"--frame {prompt.frame}: a single image is frame 0")
    answers: list = []
    ((_, prob, image),) = list(propagate_video(run.model, video, run.cfg, prompt, question, answers.append))
    answer = answers[0]
    return ImagePrediction(image=image, probs=prob[None].astype(np.float32),
                           answer=None if answer is None else answer.answer,
                           turns=None if answer is None else [(question, answer.answer, 1)])


def prompt_option(cfg: Config) -> str | None:
    return {"box": "box", "mask": "prompt", "text": "prompt"}.get(cfg.prompt_kind())


# ---- after training: evaluation, report, compare -------------------------------------------------------------------
def prompt_frames(videos: Sequence[VideoSample], cfg: Config) -> dict[str, set[int]] | None:
    """The frames scored nowhere: each video's first annotated frame when its ground-truth mask prompts the model."""
    if cfg.model.prompt != "mask":
        return None
    return {v.id: {v.annotated[0]} for v in videos if v.annotated}


def video_predictions(model, videos: Sequence[VideoSample], cfg: Config, desc: str, memory: bool = True,
                      ) -> Iterator[tuple]:
    """(id, probabilities of every frame, ground truth of the annotated frames, FOV None, the answer's columns) per
    video (per expression: ``video_queries``), one video in memory at a time: what ``video_eval`` scores and
    calibrates on."""
    for video in tqdm(list(videos), desc=desc, unit="video", leave=False):
        for query, probs, gts, _, answer in video_probabilities(model, video, cfg, memory):
            yield query.id, probs, gts, None, answer


def evaluate_model(model, cfg: Config, run_dir: Path, split: str = "test", strategy: str | None = None,
                   checkpoint_name: str = "-", data_file=None, image_root=None, out_dir: Path | None = None,
                   memory: bool = True) -> dict:
    """Calibrate the threshold on the validation videos, then measure ``split`` (or every video of another data
    folder, ``data_file``) at 0.5 and at it; writes summary.json, per_video.csv, per_frame.csv and calibration.json
    to ``out_dir`` (default RUN/eval/<split>/). ``memory=False``: the memory ablation, calibrated and measured with
    every frame segmented alone (``propagate_video``). Returns the summary."""
    strategy = strategy or cfg.eval.calibration
    data, external = evaluation_data(cfg, run_dir, split, data_file, image_root)
    val = load_split_samples(cfg, data, "val", run_dir)
    if val and split != "val":
        calib = calibrate_videos(video_predictions(model, val, cfg, "val", memory), strategy=strategy, beta=cfg.eval.beta,
                                 target_recall=cfg.eval.target_recall, prompt_frames=prompt_frames(val, cfg))
    else:
        calib = {"threshold": 0.5, "strategy": "none", "note": "no validation videos: threshold 0.5"}
        log.warning("no validation videos: the calibrated threshold is 0.5")
    cfg, data, split, source = evaluated_split(cfg, data, split, external)
    videos = load_split_samples(cfg, data, split, run_dir)
    meta = {"task": TASK.name, "run": str(run_dir), "checkpoint": checkpoint_name, "split": split, "memory": memory,
            **source}
    return evaluate_videos(video_predictions(model, videos, cfg, split, memory), float(calib["threshold"]),
                           out_dir or run_dir / "eval" / split, calibration=calib, n_boot=cfg.eval.bootstrap,
                           seed=cfg.run.seed, prompt_frames=prompt_frames(videos, cfg), meta=meta)


def evaluate_run(run_dir: Path, split: str = "test", checkpoint: str = "best", device=None,
                 strategy: str | None = None, data_file=None, image_root=None) -> dict:
    from medtune.runs.load import load_run_model

    run_dir = Path(run_dir)
    cfg, model, ckpt = load_run_model(run_dir, checkpoint, device)
    return evaluate_model(model, cfg, run_dir, split, strategy, ckpt.name, data_file, image_root)


def write_report(run_dir: Path, split: str = "test") -> Path:
    from medtune.report.video import write_video_report  # matplotlib: only when a report is asked for

    return write_video_report(run_dir, split)


def compare(runs: list[Path], out_dir: Path | None = None, split: str = "test", at: str = "cal",
            allow_eval_mismatch: bool = False) -> str:
    from medtune.report.compare import compare_video_runs

    return compare_video_runs(runs, out_dir, split, at, allow_eval_mismatch)


TASK = Task(
    name="video",
    train_dataset=train_dataset,
    make_loss=make_loss,
    validate=validate,
    selection_metric="val_dice",
    evaluate_run=evaluate_run,
    format_summary=format_summary,
    predict=predict,
    predict_image=predict_image,
    write_report=write_report,
    compare=compare,
    prompt_option=prompt_option,
    loss_units=loss_units,
    target_probabilities=target_probabilities,
    mask_targets=mask_targets,
)
