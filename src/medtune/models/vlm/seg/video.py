"""The segmenting VLM on videos: Sa2VA's video path, trained the way it infers.

Sa2VA's video inference (``predict_forward``): the VLM sees a few frames of the video (its first 5) with the
question; the last hidden state at each generated ``[SEG]``, projected, is SAM 2's sparse prompt on each of those
frames (conditioning frames, decoded without memory), and SAM 2's memory carries the mask through the rest of the
video (``propagate_in_video``). Sa2VA trains differently: every sampled frame is decoded from the prompt alone, no
memory; Sa2VA-i reports up to +11.6 J&F on MeViS from training and inferring the memory the same way. Here both run
one composition (``models.video``: ``frame_step`` around transformers' memory bank):

- training, ``forward_clip`` (with gradient): the VLM sees ``model.vlm.video_frames`` frames of the clip
  (``vlm_frame_positions``) and the conversation; its first ``[SEG]`` of the answer, projected, prompts SAM 2 on those
  frames; the clip's other frames are tracked through the memory (forward, then backward from the first conditioning
  frame); mask logits [B, T, 1, H, W] + the LM loss on the answer. The loss on the annotated frames is
  ``models.video.clip_loss`` (``models.video.clip_objective`` adds the LM term).
- inference, ``answer_video`` + ``models.video.propagate``: the answer generated from the same frames of the video,
  the ``[SEG]`` state projected, the conditioning frames decoded first, then streaming through the whole video with
  the bounded memory bank (``segment_video`` does both).

One object per clip: the first ``[SEG]`` of the answer (a training answer with several is refused; a generated one
propagates its first and reports the count).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from medtune.data.video import collate_clips
from medtune.errors import UserError
from medtune.models.video import (
    ClipConditioning,
    VideoModelOutput,
    VideoPrompt,
    clip_objective,
    decode_clips,
    frame_reader,
    propagate,
    upsample_logits,
)
from medtune.models.vlm.model import collate as collate_vlm
from medtune.models.vlm.processing import to_uint8_rgb

VLM_FRAME_CHOICES = ("first", "uniform")
# the clip keys an encoded clip item carries besides the VLM's (VideoClipDataset's, sam_frames for its frames)
CLIP_ITEM_KEYS = ("masks", "annotated", "fov", "frame_index")
# vlm_frames padding of a clip whose VLM saw fewer frames than the batch's longest
NO_FRAME = -1


def vlm_frame_positions(n_frames: int, count: int, choice: str) -> list[int]:
    """The frames (positions in a sequence of ``n_frames``) the VLM sees, at most ``count``: the first ones (Sa2VA's
    inference) or ``uniform``: spread evenly, the first and the last included. The same function picks them in a
    training clip and in a whole video."""
    if n_frames < 1:
        raise ValueError("a sequence without frames has no frame for the VLM")
    k = min(count, n_frames)
    if choice == "first":
        return list(range(k))
    if choice == "uniform":
        return [0] if k == 1 else [round(i * (n_frames - 1) / (k - 1)) for i in range(k)]
    raise UserError(f"model.vlm.video_frame_choice {choice!r} unknown; valid: {', '.join(VLM_FRAME_CHOICES)}")


def clip_item(vlm_item: dict, clip: dict, positions: Sequence[int], sam_image: Callable) -> dict:
    """A VideoClipDataset item made a segmenting-VLM clip item: ``vlm_item`` (``ChatCodec.encode`` of the
    conversation with the frames at ``positions``) + ``sam_frames`` uint8 [T, 3, S, S] (every frame through the mask
    head's input, ``sam_image``: uint8 [H, W, 3] -> [3, S, S]), ``vlm_frames`` long [K] (the positions), and the
    clip's masks / annotated / fov / frame_index. Module-level and picklable (DataLoader workers)."""
    item = dict(vlm_item)
    item["sam_frames"] = torch.stack([sam_image(to_uint8_rgb(frame)) for frame in clip["frames"]])
    item["vlm_frames"] = torch.tensor(list(positions), dtype=torch.long)
    item.update({key: clip[key] for key in CLIP_ITEM_KEYS if key in clip})
    return item


def collate_clip_items(items: list[dict], padding_side: str = "right") -> dict:
    """Encoded clip items -> a batch: the VLM's keys as the plain VLM collates them (padded tokens, the K frames'
    pixels of every clip concatenated), the clip keys as ``collate_clips`` stacks them ([B, T, ...], shorter clips
    padded with their last frame, not annotated), ``sam_frames`` [B, T, 3, S, S] uint8 and ``vlm_frames`` [B, K]
    (padded with ``NO_FRAME``)."""
    clip_keys = {"sam_frames", "vlm_frames", *CLIP_ITEM_KEYS}
    batch = collate_vlm([{k: v for k, v in it.items() if k not in clip_keys} for it in items], padding_side)
    clips = collate_clips([{"frames": it["sam_frames"], **{k: it[k] for k in CLIP_ITEM_KEYS}, "id": it["id"]}
                           for it in items])
    batch["sam_frames"] = clips.pop("frames")
    batch.update({k: clips[k] for k in CLIP_ITEM_KEYS})
    k = max(len(it["vlm_frames"]) for it in items)
    batch["vlm_frames"] = torch.full((len(items), k), NO_FRAME, dtype=torch.long)
    for i, it in enumerate(items):
        batch["vlm_frames"][i, :len(it["vlm_frames"])] = it["vlm_frames"]
    return batch


def forward_clip(seg, batch: dict) -> VideoModelOutput:
    """The segmenting VLM's clip forward (with gradient): a ``collate_clip_items`` batch -> ``VideoModelOutput``
    with ``mask_logits`` [B, T, 1, H, W] (H, W: ``batch["output_size"]``, else the masks' size, else SAM's),
    ``object_score_logits`` [B, T], ``conditioning`` [B, T] (the VLM's frames), ``prompt_frame`` [B] (the first of
    them), and the LM loss / token logits of the conversation."""
    net = seg.base_network
    sam_frames = batch["sam_frames"]
    if sam_frames.ndim != 5:
        raise UserError(f"segvlm clip batch: sam_frames must be uint8 [B, T, 3, S, S], got {tuple(sam_frames.shape)}")
    head = seg.video_head()  # refuses an image-only mask head in one line
    if seg.training and torch.is_grad_enabled() and not seg.clip_training:
        raise UserError("a segmenting VLM trains on clips with its SAM 2 memory frozen (built for image training): "
                         "set data.layout to the video layout (video_frames, sa2va_video or video_files) so the "
                         "memory trains as model.video says")
    b, t = sam_frames.shape[:2]
    device = sam_frames.device
    vlm = seg.vlm_pass(batch, device, b)
    ids = batch.get("ids", [str(i) for i in range(b)])
    counts = vlm.seg_valid.sum(dim=1).tolist()
    for i, count in enumerate(counts):
        if count != 1:
            raise UserError(f"clip {ids[i]}: the answer holds {count} {seg.seg_token}; a video clip is segmented "
                             f"from exactly one (one object per clip)")
    embedding = seg.project(vlm.seg_hidden[:, 0])  # [B, D]
    vision = net.sam.get_image_features(seg._sam_pixels(sam_frames.flatten(0, 1)), return_dict=True)
    feats, pos = list(vision.fpn_hidden_states), list(vision.fpn_position_encoding)  # each [HW, B*T, C]
    positions = batch["vlm_frames"].to(device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, row in enumerate(batch["vlm_frames"].tolist()):  # one host sync for all clips, not one per frame
        frames = tuple(f for f in row if f >= 0)
        if not frames or frames[-1] >= t:
            raise UserError(f"clip {ids[i]}: vlm_frames {frames} do not lie in its {t} frames")
        groups.setdefault(frames, []).append(i)
    conditioned = []
    for frames, rows in groups.items():
        clips = torch.tensor(rows, device=device)
        conditioned.append((clips, ClipConditioning(frames=frames, embedding=embedding[clips])))
    low_res, scores = decode_clips(net.sam, feats, pos, b, t, conditioned)
    size = batch.get("output_size")
    if size is None:
        size = batch["masks"].shape[-2:] if "masks" in batch else (head.image_size, head.image_size)
    h, w = int(size[0]), int(size[1])
    logits = upsample_logits(low_res, (h, w), head.image_size).view(b, t, 1, h, w)
    conditioning = torch.zeros(b, t, dtype=torch.bool, device=device)
    for i in range(b):
        conditioning[i, positions[i][positions[i] >= 0]] = True
    return VideoModelOutput(mask_logits=logits, object_score_logits=scores.view(b, t).float(), lm_loss=vlm.lm_loss,
                            token_logits=vlm.token_logits, logit_positions=vlm.positions,
                            prompt_frame=conditioning.int().argmax(dim=1), conditioning=conditioning)


# --- inference ----------------------------------------------------------------------------------------------------
@dataclass
class VideoAnswer:
    """The VLM's answer about a video: its text, the frames it saw, and the projected state of each [SEG] in it
    (``embeddings`` [K, D], SAM 2's sparse prompt; K = 0: nothing to segment)."""

    answer: str
    vlm_frames: list[int]
    embeddings: torch.Tensor
    notes: list[str] = field(default_factory=list)

    @property
    def n_seg(self) -> int:
        return int(self.embeddings.shape[0])

    def prompt(self) -> VideoPrompt | None:
        """The first [SEG] on the VLM's frames (one object), or None without a [SEG]."""
        if self.embeddings.shape[0] == 0:
            return None
        return VideoPrompt(frame=self.vlm_frames[0], embedding=self.embeddings[0], embedding_frames=self.vlm_frames)


def _random_access(frames) -> tuple[Callable[[int], torch.Tensor], int]:
    read = frame_reader(frames)
    if read is None:
        raise UserError("a segmenting VLM reads its VLM frames before propagating: give the frames with random access "
                        "(a FrameReader, a tensor [T, C, H, W] or a list), not a one-pass iterator")
    return read, len(frames)


def answer_video(seg, frames, question: str, max_new_tokens: int = 32) -> VideoAnswer:
    """The VLM's greedy answer to ``question`` about the video ``frames`` (float [C, H, W] in [0, 1], random
    access), seen through ``vlm_frame_positions`` as in training, and its [SEG] states projected by one
    teacher-forced forward over the generated conversation (the training forward's VLM pass)."""
    read, n = _random_access(frames)
    positions = vlm_frame_positions(n, seg.vcfg.video_frames, seg.vcfg.video_frame_choice)
    device = next(seg.parameters()).device
    item = seg.encode_vlm_frames([read(i) for i in positions], [question], None, "generate")
    answers, counts, generated = seg.generate_conversation(item, [question], max_new_tokens, device,
                                                           images=len(positions))
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collate_vlm([generated]).items()}
    with torch.no_grad():
        vlm = seg.vlm_pass(batch, device, 1)
        embeddings = seg.project(vlm.seg_hidden[0][vlm.seg_valid[0]]).float()
    notes = [] if counts[0] <= 1 else [f"the answer holds {counts[0]} {seg.seg_token}; the first is propagated"]
    return VideoAnswer(answer=answers[0], vlm_frames=positions, embeddings=embeddings, notes=notes)


def segment_video(seg, frames, question: str, *, max_new_tokens: int = 32, memory_frames: int | None = None,
                  after_frame: Callable | None = None) -> tuple[VideoAnswer, Iterator[tuple[int, torch.Tensor]]]:
    """``answer_video`` then ``models.video.propagate`` through the whole video with the answer's first [SEG] on
    the VLM's frames (bounded memory bank). Returns the answer and the iterator of (frame index, probability
    float32 [H, W]); an answer without [SEG] gives probability 0 on every frame."""
    answer = answer_video(seg, frames, question, max_new_tokens)
    prompt = answer.prompt()
    if prompt is None:
        read, n = _random_access(frames)
        return answer, ((i, torch.zeros(read(i).shape[-2:])) for i in range(n))
    return answer, propagate(seg, frames, prompt, memory_frames=memory_frames, after_frame=after_frame)


__all__ = ["VLM_FRAME_CHOICES", "VideoAnswer", "answer_video", "clip_item", "clip_objective",
           "collate_clip_items", "forward_clip", "segment_video", "vlm_frame_positions"]
