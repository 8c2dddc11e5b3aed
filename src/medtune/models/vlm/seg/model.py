"""``SegVLMNet`` (VLM + SAM + projection in one module, so PEFT wraps all of it) and ``SegVLMModel`` (its forward).

The VLM side is the plain VLM's: its processor makes the pixels and the tokens through ``ChatCodec`` (one user turn
per question, the image in the first), ``collate`` batches them, and every processor key reaches the VLM's forward.
The mask head reads its own input (``sam_image``, ``images.SamImagePrep``) and the [SEG] hidden states."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medtune.config import VideoModelCfg, VLMCfg
from medtune.data.conversations import IMAGE_PLACEHOLDER
from medtune.errors import UserError
from medtune.models.base import ModelOutput, SegModel, load_safetensors_folder
from medtune.models.sam import IMAGENET_MEAN, IMAGENET_STD, Sam2SegModel, SamSegModel
from medtune.models.video import (
    MEMORY_SELECTED_BY_PREDICTION,
    Sam2VideoSegModel,
    VideoHead,
    frozen_memory_parts,
)
from medtune.models.vlm.logits import IGNORE_INDEX, forward_logits_at, logit_positions, token_loss
from medtune.models.vlm.model import (
    NON_MODEL_KEYS,
    SEQUENCE_KEYS,
    ChatCodec,
    VLMParts,
    check_lora_placement,
    extend_token_key,
    generation_kwargs,
    lora_target_patterns,
    new_tokens,
    reload_vlm_weights,
)
from medtune.models.vlm.model import collate as collate_vlm
from medtune.models.vlm.processing import UINT8_MAX, save_processor, to_uint8_rgb
from medtune.models.vlm.seg.images import SamImagePrep
from medtune.models.vlm.seg.parts import (
    FORMAT_VERSION,
    PROJECTION_FILE,
    SAM_DIR,
    SAM_MEAN_KEY,
    SAM_STD_KEY,
    SEGVLM_JSON,
    VLM_DIR,
    embeddings_tied,
    is_video_sam,
    module_name,
    sam_kind,
    vision_unused_regex,
)
from medtune.models.vlm.seg.video import clip_item, collate_clip_items, forward_clip, vlm_frame_positions
from medtune.models.vlm.seg.video import segment_video as answer_and_segment_video

# SAM 2's mask decoder makes three masks plus the single-mask head (token 0); the modes that pick one of them.
MASK_OUTPUTS = ("best_iou", "single")
# Batch keys of the mask head (its input, the targets): never passed to the VLM. Stacked per image by ``collate``.
MASK_HEAD_KEYS = frozenset({"sam_image", "image_size", "mask", "fov", "target_valid", "output_size",
                            # a clip batch's (seg/video.py)
                            "sam_frames", "vlm_frames", "masks", "annotated", "frame_index", "frames"})
# the key that makes a batch a clip batch: every frame's mask-head input, uint8 [B, T, 3, S, S]
CLIP_KEY = "sam_frames"
STACKED_KEYS = ("sam_image", "image_size", "fov")


def seg_turns(questions: list[str], answers: list[str], seg_token: str, images: int = 1) -> list[dict[str, str]]:
    """One user turn per question (the image placeholder in the first only, as Sa2VA's data put several referring
    expressions of one image; ``images`` placeholders for the frames of a video), each followed by its answer when
    given: as many answers (teacher forcing) or one fewer (the conversation ends with the question to answer)."""
    if not questions:
        raise UserError("a segvlm conversation needs at least one question")
    if len(answers) not in (len(questions), len(questions) - 1):
        raise ValueError(f"{len(questions)} questions need {len(questions)} answers (teacher forcing) or "
                         f"{len(questions) - 1} (a prompt for the last one), got {len(answers)}")
    for question in questions:
        for token in (IMAGE_PLACEHOLDER, seg_token):
            if token in question:
                raise UserError(f"the question {question!r} contains {token!r}; the codec inserts the image itself "
                                 f"and {seg_token!r} belongs in answers only")
    turns: list[dict[str, str]] = []
    for k, question in enumerate(questions):
        turns.append({"role": "user", "content": (IMAGE_PLACEHOLDER * images if k == 0 else "") + question})
        if k < len(answers):
            if IMAGE_PLACEHOLDER in answers[k]:
                raise UserError(f"the answer {answers[k]!r} contains the image placeholder {IMAGE_PLACEHOLDER!r}")
            turns.append({"role": "assistant", "content": answers[k]})
    return turns


def encode_item(codec: ChatCodec, prep: SamImagePrep, image, questions: list[str], answers: list[str],
                sample_id: str, seg_token: str) -> dict:
    """One sample: ``ChatCodec.encode`` of the conversation with the image (the VLM processor's tokens and pixels,
    its other keys, labels on the answers) + the mask head's ``sam_image`` and the image's ``image_size``. ``image``:
    float [C, H, W] in [0, 1] or uint8, at its own resolution. Module-level and picklable (DataLoader workers)."""
    rgb = to_uint8_rgb(image)
    item = encode_frames(codec, [rgb], questions, answers, sample_id, seg_token)
    item.update(prep(rgb))
    return item


def encode_frames(codec: ChatCodec, frames: list, questions: list[str], answers: list[str], sample_id: str,
                  seg_token: str) -> dict:
    """The VLM's part of a sample: ``ChatCodec.encode`` of the conversation with ``frames`` (images as ``encode_item``
    takes them, or uint8 [H, W, 3] arrays) in its first turn, one image placeholder each."""
    from PIL import Image

    images = [Image.fromarray(f if isinstance(f, np.ndarray) and f.ndim == 3 and f.shape[-1] == 3
                              and f.dtype == np.uint8 else to_uint8_rgb(f)) for f in frames]
    return codec.encode(seg_turns(questions, answers, seg_token, images=len(images)), images, sample_id)


def encode_clip_item(codec: ChatCodec, sam_image, vcfg: VLMCfg, seg_token: str, clip: dict,
                     questions: str | list[str], answers: str | list[str] | None = None) -> dict:
    """One training clip (a ``VideoClipDataset`` item: ``frames`` [T, C, H, W] in [0, 1], masks, annotated ...)
    with its conversation: the VLM sees the clip's frames at ``vlm_frame_positions`` (``model.vlm.video_frames``,
    ``video_frame_choice``), the mask head every frame through ``sam_image`` (``seg/video.py``'s ``clip_item``).
    Module-level and picklable (DataLoader workers)."""
    questions = [questions] if isinstance(questions, str) else list(questions)
    answers = [] if answers is None else [answers] if isinstance(answers, str) else list(answers)
    frames = clip["frames"]
    positions = vlm_frame_positions(len(frames), vcfg.video_frames, vcfg.video_frame_choice)
    vlm_item = encode_frames(codec, [frames[i] for i in positions], questions, answers, str(clip["id"]), seg_token)
    return clip_item(vlm_item, clip, positions, sam_image)


def collate(items: list[dict], padding_side: str = "right") -> dict:
    """The plain VLM's ``collate`` (sequence keys padded, per-image processor keys concatenated) + the mask head's
    keys stacked per image, and the K target ``mask`` [B, K, h, w] with ``target_valid`` [B, K] when items hold
    their targets."""
    head = [{k: it.pop(k) for k in list(it) if k in MASK_HEAD_KEYS} for it in (dict(i) for i in items)]
    batch = collate_vlm([{k: v for k, v in it.items() if k not in MASK_HEAD_KEYS} for it in items], padding_side)
    for key in STACKED_KEYS:
        if key in head[0]:
            batch[key] = torch.stack([h[key] for h in head])
    if "mask" in head[0]:
        k = max(int(h["mask"].shape[0]) for h in head)
        batch["mask"] = torch.zeros(len(head), k, *head[0]["mask"].shape[-2:])
        batch["target_valid"] = torch.zeros(len(head), k, dtype=torch.bool)
        for i, h in enumerate(head):
            batch["mask"][i, :h["mask"].shape[0]] = h["mask"]
            batch["target_valid"][i, :h["mask"].shape[0]] = True
    return batch


@dataclass
class DecodedMasks:
    """What the mask decoder gave for each of the K prompts of B images (``best_iou``: M = 3 candidates; ``single``:
    M = 1). ``low_res`` [B, K, h, w] is the candidate chosen (``index`` [B, K]), at the decoder's resolution."""

    candidates: torch.Tensor  # [B, K, M, h, w]
    iou_scores: torch.Tensor  # [B, K, M]
    index: torch.Tensor  # [B, K] long
    low_res: torch.Tensor  # [B, K, h, w]


@dataclass
class VLMPass:
    """What the VLM's forward gives the mask head: token logits (at ``positions``), the LM loss (None without
    labels), the last hidden state at each [SEG] ``seg_hidden`` [B, K, H] and which slots hold one [B, K]."""

    token_logits: torch.Tensor | None
    lm_loss: torch.Tensor | None
    positions: Any
    seg_hidden: torch.Tensor
    seg_valid: torch.Tensor


@dataclass
class NetConfig:
    """What PEFT reads from the wrapped model's ``config``: whether [SEG]'s input and output rows are one tensor."""

    tie_word_embeddings: bool


class SegVLMNet(nn.Module):
    """The composed network: ``vlm`` (AutoModelForImageTextToText), ``sam`` (SamModel / Sam2Model) and
    ``seg_projection`` (Linear H->H, ReLU, Linear H->SAM prompt size)."""

    # PEFT's trainable-token tying collects the submodules' ``_tied_weights_keys`` (the VLM's lm_head <- embed_tokens)
    # when the wrapped model declares the attribute, so a tied [SEG] row stays one row through training and merging.
    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, vlm: nn.Module, sam: nn.Module, seg_projection: nn.Module):
        super().__init__()
        self.vlm = vlm
        self.sam = sam
        self.seg_projection = seg_projection
        self.config = NetConfig(tie_word_embeddings=embeddings_tied(vlm))

    def get_input_embeddings(self) -> nn.Module:
        return self.vlm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.vlm.get_output_embeddings()


def new_projection(hidden_size: int, prompt_size: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, prompt_size))


def resolve_mask_output(choice: str, kind: str) -> str:
    """``model.vlm.mask_output``: ``auto`` = ``best_iou`` for SAM 2 (Sa2VA asks the decoder for three masks and keeps
    the best predicted IoU, in training and inference) and ``single`` for SAM (LISA decodes with
    multimask_output=False: the single-mask head)."""
    if choice == "auto":
        return "best_iou" if kind == "sam2" else "single"
    if choice not in MASK_OUTPUTS:
        raise UserError(f"model.vlm.mask_output {choice!r} unknown; valid: auto, {', '.join(MASK_OUTPUTS)}")
    return choice


def _square(size) -> tuple[int, int]:
    return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))


class SegVLMModel(SegModel):
    family = "segvlm"
    takes_question = True

    def __init__(self, net: SegVLMNet, in_channels: int, processor, codec: ChatCodec, vcfg: VLMCfg,
                 seg_token_id: int, sam_image_mean=IMAGENET_MEAN, sam_image_std=IMAGENET_STD):
        super().__init__(net, in_channels)
        self.processor = processor
        self.codec = codec
        self.vcfg = vcfg
        self.seg_token = vcfg.seg_token
        self.seg_token_id = seg_token_id
        self.parts = VLMParts.find(net.vlm)  # names inside the VLM; under "vlm." in the composed network
        # set by the builder from task.lm_weight: whether any loss reaches the VLM's output head
        self.lm_loss_trained = True
        # set by the builder: the memory settings of a SAM 2 video mask head, and whether the run trains on clips
        self.video = VideoModelCfg()
        self.clip_training = False
        self.sam_kind = sam_kind(net.sam)
        self.mask_output = resolve_mask_output(vcfg.mask_output, self.sam_kind)
        self.image_prep = SamImagePrep(sam_size=_square(net.sam.config.prompt_encoder_config.image_size))
        self.sam_image_mean, self.sam_image_std = [float(v) for v in sam_image_mean], [float(v) for v in sam_image_std]
        self.register_buffer("sam_mean", torch.tensor(self.sam_image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("sam_std", torch.tensor(self.sam_image_std).view(1, 3, 1, 1), persistent=False)

    # --- the contract ---------------------------------------------------------------------------------------------
    def text_codec(self) -> ChatCodec:
        return self.codec

    def forward_logits(self, image: torch.Tensor, box: torch.Tensor | None = None) -> torch.Tensor:
        raise UserError("segvlm segments from text: call forward_batch with a batch of model.encode items "
                         "(task.kind segvlm), or generate_masks / teacher_forced_masks")

    def encode(self, image, questions: str | list[str], answers: str | list[str] | None = None,
               sample_id: str = "sample") -> dict:
        """One sample's item (``encode_item``): one question (a string) or several, as many answers or one fewer."""
        questions = [questions] if isinstance(questions, str) else list(questions)
        answers = [] if answers is None else [answers] if isinstance(answers, str) else list(answers)
        return encode_item(self.codec, self.image_prep, image, questions, answers, sample_id, self.seg_token)

    def encode_vlm_frames(self, frames: list, questions: str | list[str], answers: str | list[str] | None = None,
                          sample_id: str = "sample") -> dict:
        """The VLM's part of a sample seeing several ``frames`` (``encode_frames``): no mask-head input."""
        questions = [questions] if isinstance(questions, str) else list(questions)
        answers = [] if answers is None else [answers] if isinstance(answers, str) else list(answers)
        return encode_frames(self.codec, frames, questions, answers, sample_id, self.seg_token)

    def encode_clip(self, clip: dict, questions: str | list[str], answers: str | list[str] | None = None) -> dict:
        """One training clip (a ``VideoClipDataset`` item: ``frames`` [T, C, H, W] in [0, 1], masks, annotated ...)
        with its conversation: the VLM sees the clip's frames at ``vlm_frame_positions`` (``model.vlm.video_frames``,
        ``video_frame_choice``), the mask head every frame (``seg/video.py``'s ``clip_item``). Batch the items with
        ``seg/video.py``'s ``collate_clip_items``; ``model(batch=...)`` runs the clip forward."""
        return self.clip_encoder()(clip, questions, answers)

    # --- the video task's hooks (tasks/video.py), alike for every model that takes clips ---------------------------
    def clip_encoder(self):
        """(clip, question, answer) -> the clip forward's item (``encode_clip_item``), picklable."""
        return partial(encode_clip_item, self.codec, self.image_prep.sam_image, self.vcfg, self.seg_token)

    clip_collate = staticmethod(collate_clip_items)

    def segment_video(self, frames, prompt=None, question: str | None = None, max_new_tokens: int = 32):
        """(the VLM's answer to ``question`` about the video, the iterator of (frame index, probability [H, W]))
        (``seg/video.py``'s ``segment_video``): a segmenting VLM is prompted by the question alone."""
        if prompt is not None:
            raise UserError("a segmenting VLM is prompted by a question (--prompt TEXT), not by a mask or a box")
        if not question or not question.strip():
            raise UserError("the question is empty: type what to segment (e.g. 'Please segment the vessel.')")
        return answer_and_segment_video(self, frames, question, max_new_tokens=max_new_tokens)

    @property
    def video_capable(self) -> bool:
        return is_video_sam(self.base_network.sam)

    def video_head(self) -> VideoHead:
        """The SAM 2 video mask head for ``models.video.propagate``: frames go through the mask head's own input
        (``images.SamImagePrep``: uint8, PIL bicubic to SAM's size) as in the clip forward."""
        sam = self.base_network.sam
        if not self.video_capable:
            raise UserError(f"this segmenting VLM's mask head is a {type(sam).__name__}, which has no memory to run a "
                             "video with; set model.vlm.sam_path to a SAM 2 video checkpoint (model_type sam2_video) "
                             "or model.config.sam: sam2_video")

        def pixels(frame: torch.Tensor) -> torch.Tensor:
            return self._sam_pixels(self.image_prep.sam_image(to_uint8_rgb(frame))[None].to(self.sam_mean.device))

        return VideoHead(net=sam, module=self, pixels=pixels, image_size=self.image_prep.sam_size[0],
                         in_channels=self.in_channels, memory_frames=self.video.memory_frames,
                         dtype=_floating_dtype(sam.vision_encoder))

    def model_inputs(self, batch: dict) -> dict:
        """Every key of the batch the VLM takes: all processor outputs (pixel_values, image_grid_thw, ...)."""
        return {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS and k not in MASK_HEAD_KEYS}

    def forward_batch(self, batch: dict) -> ModelOutput:
        """Teacher-forced forward of a ``collate``d batch of ``encode`` items: the VLM on its processor's inputs
        (``input_ids`` [B, T], ``attention_mask``, ``labels`` (-100 = not supervised), pixel keys ...), the mask head
        on ``sam_image`` uint8 [B, 3, S, S]. The mask logits come at ``output_size`` (H, W): given, else that of
        ``mask``, else the (common) size of the images."""
        if CLIP_KEY in batch:  # a clip batch (seg/video.py's collate_clip_items): through SAM 2's memory
            return forward_clip(self, batch)
        missing = [k for k in ("input_ids", "sam_image") if k not in batch]
        if missing:
            raise UserError(f"segvlm batch lacks {missing}: it needs a collated batch of model.encode(image, "
                             "questions, answers) items (task.kind segvlm)")
        size = batch.get("output_size")
        if size is None:
            size = batch["mask"].shape[-2:] if "mask" in batch else self._common_size(batch["image_size"])
        return self._forward(batch, (int(size[0]), int(size[1])))

    @staticmethod
    def _common_size(image_size: torch.Tensor) -> tuple[int, int]:
        sizes = {tuple(int(v) for v in s) for s in image_size}
        if len(sizes) != 1:
            raise UserError(f"images of several sizes {sorted(sizes)} in one batch: give output_size (H, W)")
        return next(iter(sizes))

    def _forward(self, batch: dict, output_size: tuple[int, int]) -> ModelOutput:
        """The VLM's token logits are computed where ``batch[LOGITS_AT]`` says (``models.vlm.logits``); by default
        where the LM loss reads them, and nowhere without labels: the masks need only the hidden states."""
        net = self.base_network
        sam_image = batch["sam_image"]
        device = sam_image.device
        vlm = self.vlm_pass(batch, device, sam_image.shape[0])
        prompts, valid, b = vlm.seg_hidden, vlm.seg_valid, sam_image.shape[0]
        if prompts.shape[1] == 0:
            mask_logits = torch.zeros(b, 0, *output_size, device=device, dtype=torch.float32)
        else:
            features = self._sam_features(net.sam, self._sam_pixels(sam_image))
            low = self._decode_masks(net.sam, features, self.project(prompts)).low_res
            mask_logits = self.upsample(low, output_size)
            mask_logits = torch.where(valid[:, :, None, None], mask_logits, torch.zeros_like(mask_logits))
        return ModelOutput(mask_logits=mask_logits, lm_loss=vlm.lm_loss, token_logits=vlm.token_logits,
                           mask_valid=valid, logit_positions=vlm.positions)

    def vlm_pass(self, batch: dict, device, b: int) -> "VLMPass":
        """The VLM on the batch's processor inputs (``input_ids`` [B, T], ``attention_mask``, ``labels``, pixel keys
        ...): token logits where ``logit_positions`` puts them, the LM loss (with labels), and the last hidden state
        at each [SEG]. Shared by the image forward and the clip forward (``seg/video.py``)."""
        net = self.base_network
        inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.model_inputs(batch).items()}
        input_ids = inputs["input_ids"]
        if input_ids.ndim != 2 or input_ids.shape[0] != b:
            raise UserError(f"input_ids must be [B={b}, T], got {tuple(input_ids.shape)}")
        if inputs.get("attention_mask") is None:
            inputs["attention_mask"] = torch.ones_like(input_ids)
        labels = batch.get("labels")
        labels = labels.to(device) if labels is not None else None
        positions = logit_positions(batch, labels, device)
        out, logits = forward_logits_at(partial(net.vlm, output_hidden_states=True, use_cache=False,
                                                return_dict=True), net.vlm, inputs, positions)
        lm_loss = None
        if labels is not None:
            supervised = bool((labels != IGNORE_INDEX).any())
            # the mean over the supervised tokens (what the VLM's own loss gives); nothing supervised: a zero that is
            # still part of the graph, not 0/0
            lm_loss = token_loss(logits, labels, None, positions) if supervised else logits.sum() * 0.0
        # hidden_states[-1] is the final-norm output, the lm_head input: the [SEG] token's own last hidden state
        prompts, valid = self._seg_hidden(out.hidden_states[-1], input_ids, inputs["attention_mask"])
        return VLMPass(token_logits=logits, lm_loss=lm_loss, positions=positions, seg_hidden=prompts, seg_valid=valid)

    def project(self, seg_hidden: torch.Tensor) -> torch.Tensor:
        """[SEG] hidden states [..., H] -> SAM's sparse prompt embeddings [..., D] (``seg_projection``)."""
        projection = self.base_network.seg_projection
        return projection(seg_hidden.to(next(projection.parameters()).dtype))

    def upsample(self, low: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
        """Low-res logits [B, K, h, w] -> [B, K, H, W] as Sa2VA: bilinear to SAM's input size (SAM 2's video
        size), then bilinear to the output size; float32."""
        x = F.interpolate(low.float(), size=self.image_prep.sam_size, mode="bilinear", align_corners=False)
        if tuple(output_size) == tuple(x.shape[-2:]):
            return x
        return F.interpolate(x, size=tuple(output_size), mode="bilinear", align_corners=False)

    def _seg_hidden(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """[B, K, H] hidden states at the [SEG] positions (K = most [SEG] in one sequence) and the [B, K] valid mask."""
        is_seg = (input_ids == self.seg_token_id) & attention_mask.bool()
        k = int(is_seg.sum(1).max()) if is_seg.numel() else 0
        rows, cols = is_seg.nonzero(as_tuple=True)
        slots = (is_seg.long().cumsum(1) - 1)[rows, cols]
        # index_put on a fresh tensor (out of place): no write into a view of anything autograd tracks
        prompts = hidden.new_zeros(hidden.shape[0], k, hidden.shape[-1]).index_put((rows, slots), hidden[rows, cols])
        valid = torch.zeros(hidden.shape[0], k, dtype=torch.bool, device=hidden.device)
        valid[rows, slots] = True
        return prompts, valid

    def _sam_features(self, sam: nn.Module, pixels: torch.Tensor) -> dict[str, Any]:
        """SAM's image embedding (SAM 2: FPN top level + ``no_memory_embedding``, Sa2VA's first conditioning frame,
        [B, C, 64, 64]) and SAM 2's two high-resolution feature maps for the decoder's upscaling."""
        b = pixels.shape[0]
        if self.sam_kind != "sam2":
            return {"image_embedding": sam.vision_encoder(pixels).last_hidden_state, "high_res": None}
        features = sam.get_image_features(pixels, return_dict=True)
        maps = list(features.fpn_hidden_states)
        maps[-1] = maps[-1] + sam.no_memory_embedding
        embeddings = [f.permute(1, 2, 0).reshape(b, -1, *size) for f, size in zip(maps, sam.backbone_feature_sizes)]
        return {"image_embedding": embeddings[-1], "high_res": embeddings[:-1]}

    def _decode_masks(self, sam: nn.Module, features: dict[str, Any], prompts: torch.Tensor) -> DecodedMasks:
        """The mask decoder on the K prompt embeddings [B, K, D] of each image.

        The prompt encoder and mask decoder are called directly: ``SamModel.forward`` takes no custom sparse
        embeddings and ``get_image_embeddings`` is ``no_grad``. SAM 2 (as in Sa2VA): sparse prompt = the prompt
        encoder's padding point (label -1 -> ``not_a_point_embed``) followed by the [SEG] embedding, plus the
        high-resolution features; SAM: the [SEG] embedding alone. Dense prompt: the no-mask embedding. No
        object-score gating (Sa2VA keeps the logits). ``mask_output`` ``best_iou`` (Sa2VA, training and inference):
        the three multimask outputs, keeping per prompt the one with the highest predicted IoU; ``single``: the
        single-mask head (token 0; LISA's multimask_output=False).
        """
        b, k = prompts.shape[:2]
        positional = sam.get_image_wide_positional_embeddings().repeat(b, 1, 1, 1)
        multimask = self.mask_output == "best_iou"
        if self.sam_kind == "sam2":
            points = prompts.new_zeros(b, k, 1, 2)
            point_labels = -torch.ones(b, k, 1, dtype=torch.int32, device=prompts.device)
            sparse, dense = sam.prompt_encoder(input_points=points, input_labels=point_labels, input_boxes=None,
                                               input_masks=None)
            sparse = torch.cat([sparse, prompts[:, :, None].to(sparse.dtype)], dim=2)
            masks, iou = sam.mask_decoder(image_embeddings=features["image_embedding"],
                                          image_positional_embeddings=positional, sparse_prompt_embeddings=sparse,
                                          dense_prompt_embeddings=dense, multimask_output=multimask,
                                          high_resolution_features=features["high_res"])[:2]
        else:
            _, dense = sam.prompt_encoder(input_points=None, input_labels=None, input_boxes=None, input_masks=None)
            masks, iou = sam.mask_decoder(image_embeddings=features["image_embedding"],
                                          image_positional_embeddings=positional,
                                          sparse_prompt_embeddings=prompts[:, :, None],
                                          dense_prompt_embeddings=dense.expand(b, -1, -1, -1),
                                          multimask_output=multimask)[:2]
        # the choice is not differentiable (argmax), so the IoU head learns nothing from the mask loss: as in Sa2VA
        index = iou.argmax(dim=-1)
        low = torch.gather(masks, 2, index[:, :, None, None, None].expand(-1, -1, 1, *masks.shape[-2:]))[:, :, 0]
        return DecodedMasks(candidates=masks, iou_scores=iou, index=index, low_res=low)

    # --- the mask head's input ------------------------------------------------------------------------------------
    def _sam_pixels(self, sam_image: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] -> /255, (x - mean) / std in float32 with the folder's SAM mean/std."""
        x = (sam_image.float() / UINT8_MAX - self.sam_mean) / self.sam_std
        return x.to(_floating_dtype(self.base_network.sam.vision_encoder))

    # --- generation and evaluation -----------------------------------------------------------------------------------
    @staticmethod
    def _one_image(image, caller: str):
        if image.ndim != 4 or image.shape[0] != 1:
            raise UserError(f"{caller} takes one image [1, C, H, W] (its original resolution), got {tuple(image.shape)}")
        return image[0]

    def generate_masks(self, image: torch.Tensor, question: str, max_new_tokens: int = 32
                       ) -> tuple[str, torch.Tensor]:
        """Greedy answer to ``question`` about ``image`` [1, C, H, W], and one mask per [SEG] in it: (answer text,
        mask logits [K, H, W]); K = number of [SEG] in the answer, possibly 0. One turn of ``generate_turns``."""
        answers, masks = self.generate_turns(image, [question], max_new_tokens)
        return answers[0], masks[0]

    def generate_turns(self, image: torch.Tensor, questions: list[str], max_new_tokens: int = 32
                       ) -> tuple[list[str], list[torch.Tensor]]:
        """A conversation about ``image`` [1, C, H, W], one greedy answer per question, each turn continuing the
        previous turns' generated tokens (``ChatCodec.continuation_ids``; the image in the first turn only, as in
        training). Returns the answers and, per answer, the mask logits [K_k, H, W] of its [SEG] tokens.

        ``generate()`` runs under no_grad; the masks come from ONE teacher-forced forward over the whole generated
        conversation (the training forward), so they are differentiable w.r.t. the mask path for the caller who
        wants that.
        """
        x = self._one_image(image, "generate_turns")
        item = self.encode(x, questions[:1], None, "generate")
        answers, seg_counts, generated = self.generate_conversation(item, questions, max_new_tokens, image.device)
        batch = collate([generated])
        batch = {key: (v.to(image.device) if torch.is_tensor(v) else v) for key, v in batch.items()}
        out = self._forward(batch, tuple(image.shape[-2:]))
        return answers, list(torch.split(out.mask_logits[0], seg_counts))

    def generate_conversation(self, item: dict, questions: list[str], max_new_tokens: int, device,
                              images: int = 1) -> tuple[list[str], list[int], dict]:
        """Greedy answers to ``questions`` (``item``: the encoded first question with its ``images`` images, for
        generation), each turn continuing the previous turns' generated tokens. Returns the answers, the [SEG]
        count of each, and ``item`` holding the whole generated conversation (no labels) for one teacher-forced
        forward (the image forward's or the clip forward's)."""
        codec = self.codec
        stops = set(codec.stop_ids)
        close = codec.end_of_turn_id if codec.end_of_turn_id is not None else codec.stop_ids[0]
        sequence: list[int] = item["input_ids"].tolist()
        answers: list[str] = []
        seg_counts: list[int] = []
        for k in range(len(questions)):
            if k:
                turns = seg_turns(questions[:k + 1], answers, self.seg_token, images)
                sequence += codec.continuation_ids(turns, "generate")
            batch = collate([_with_ids(item, sequence)])
            inputs = {key: (v.to(device) if torch.is_tensor(v) else v) for key, v in self.model_inputs(batch).items()}
            with torch.no_grad():
                out = self.base_network.vlm.generate(**inputs, **generation_kwargs(codec, max_new_tokens), num_beams=1)
            new = new_tokens(out, inputs["input_ids"], max_new_tokens, type(self.base_network.vlm).__name__)
            new = new[0].tolist()
            end = next((i + 1 for i, t in enumerate(new) if t in stops), len(new))
            new = new[:end]
            answers.append(codec.decode(new))
            seg_counts.append(sum(t == self.seg_token_id for t in new))
            # an answer cut by max_new_tokens is closed as training closes every answer, before the next turn
            sequence += new if new and new[-1] in stops else new + [close]
        return answers, seg_counts, _with_ids(item, sequence)

    def teacher_forced_masks(self, image: torch.Tensor, question: str | list[str], answer: str | list[str]
                             ) -> torch.Tensor:
        """Mask logits [K, H, W] for given answers (K = their [SEG] count): the training forward on one image
        [1, C, H, W] at its original resolution. Lists: one turn per question."""
        x = self._one_image(image, "teacher_forced_masks")
        batch = collate([self.encode(x, question, answer, "teacher-forced")])
        batch = {k: (v.to(image.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        batch.pop("labels")
        return self._forward(batch, tuple(image.shape[-2:])).mask_logits[0]

    # --- family hooks: LoRA placement is the plain VLM's, under "vlm." ---------------------------------------------
    def _sam_encoder_targets(self) -> str:
        own = (Sam2SegModel if self.sam_kind == "sam2" else SamSegModel).DEFAULT_TARGETS
        return r"sam\." + own.removeprefix("^").removesuffix("$")

    def default_lora_targets(self) -> str:
        """The plain VLM's targets (``lora_target_patterns``: every linear of the language model by anchored full
        names, the vision tower's with ``model.vlm.vision_lora``) under ``vlm.``, plus SAM's image-encoder attention
        with ``sam_encoder_lora``."""
        parts = lora_target_patterns(self.base_network.vlm, self.parts, self.vcfg.vision_lora, prefix=f"{VLM_DIR}.")
        if self.vcfg.sam_encoder_lora:
            parts.append(self._sam_encoder_targets())
        if self._memory_trains("memory_attention"):
            parts.append(r"sam\." + Sam2VideoSegModel.MEMORY_ATTENTION_TARGETS.removeprefix("^").removesuffix("$"))
        return "^(?:" + "|".join(parts) + ")$"

    def _memory_trains(self, part: str) -> bool:
        """Whether a memory part (``model.video``'s memory_attention / memory_encoder / object_pointers) trains:
        only a video mask head trained on clips."""
        return self.clip_training and self.video_capable and getattr(self.video, part) == "train"

    def default_modules_to_save(self) -> list[str] | None:
        if self.vcfg.train_projector and self.parts.projector is None:
            raise UserError(f"model.vlm.train_projector: no projector found in {type(self.base_network.vlm).__name__}"
                             "; list it in lora.modules_to_save")
        extra = [f"{VLM_DIR}.{self.parts.projector}"] if self.vcfg.train_projector else []
        if self._memory_trains("memory_encoder"):
            extra.append("memory_encoder")
        if self._memory_trains("object_pointers"):
            extra += ["object_pointer_proj", "temporal_positional_encoding_projection_layer"]
        return ["mask_decoder", "seg_projection", *extra]

    def default_trainable_tokens(self) -> dict[str, list[int]] | None:
        """[SEG]'s embedding row (and, untied, its lm_head row) as PEFT trainable tokens: see the package docstring."""
        net = self.base_network
        tokens = {module_name(net, net.vlm.get_input_embeddings()): [self.seg_token_id]}
        out = net.vlm.get_output_embeddings()
        # untied, the lm_head row learns only from the LM loss: with task.lm_weight=0 it would be dead weight
        if out is not None and not embeddings_tied(net.vlm) and self.lm_loss_trained:
            tokens[module_name(net, out)] = [self.seg_token_id]
        return tokens

    def after_lora(self) -> None:
        """The plain VLM's checks on the VLM (``check_lora_placement``), and no adapter outside it but in SAM's image
        encoder with ``sam_encoder_lora``: a user ``lora.target_modules`` that reaches elsewhere is refused here
        rather than found out after training."""
        from peft.tuners.lora import LoraLayer

        base = self.base_network
        check_lora_placement(base.vlm, self.parts, self.vcfg.vision_lora, self.vcfg.train_projector)
        allowed = [f"{VLM_DIR}."] + (["sam.vision_encoder."] if self.vcfg.sam_encoder_lora else []) \
            + (["sam.memory_attention."] if self._memory_trains("memory_attention") else [])
        stray = [n for n, m in base.named_modules()
                 if isinstance(m, LoraLayer) and not any(n.startswith(a) for a in allowed)]
        if stray:
            raise UserError(
                f"LoRA landed outside the VLM: {stray[:6]}{' ...' if len(stray) > 6 else ''}. Set "
                "model.vlm.sam_encoder_lora=true for SAM's image encoder, or narrow lora.target_modules (the mask "
                "decoder and the projection train fully)")

    def frozen_by_design(self) -> str | None:
        # SAM parts that cannot reach the chosen mask logits prompted by an embedding: the IoU / object-score heads
        # (the best-IoU choice is an argmax: no gradient reaches the IoU head, as in Sa2VA), the hypernetworks of the
        # mask tokens never output (single: 1..3, the multimask ones; best_iou: 0, the single-mask head), the
        # mask-prompt encoder, the point-label embeddings (SAM 2's padding points are label -1: not_a_point_embed,
        # which SAM without points never uses). And the VLM vision layers after the feature layer (LLaVA reads the
        # second-to-last CLIP layer).
        hyper = r"output_hypernetworks_mlps\.[1-9]" if self.mask_output == "single" else r"output_hypernetworks_mlps\.0\."
        if self.clip_training and self.video_capable:
            # on clips SAM 2's own rule decides: with its default config every frame decodes three masks
            c = self.base_network.sam.config
            every_multimask = (c.multimask_output_in_sam and c.multimask_output_for_tracking
                               and c.multimask_min_pt_num <= 0 <= c.multimask_max_pt_num)
            hyper = r"output_hypernetworks_mlps\.0\." if every_multimask else None
        unused = [r"iou_prediction_head\.", r"sam\.prompt_encoder\.mask_embed\.", r"sam\.prompt_encoder\.point_embed\."]
        if hyper:
            unused.append(hyper)
        if self.video_capable:
            unused += self._video_frozen_by_design()
        else:
            unused.append(r"pred_obj_score_head\.")
        if self.sam_kind == "sam":
            unused.append(r"sam\.prompt_encoder\.not_a_point_embed\.")
        out = self.base_network.vlm.get_output_embeddings()
        if not self.lm_loss_trained and out is not None and not embeddings_tied(self.base_network.vlm):
            # without the LM loss (task.lm_weight=0) nothing reaches an untied output head
            unused.append(re.escape(module_name(self.base_network, out)) + r"\.")
        vision = vision_unused_regex(self.base_network.vlm, self.parts.vision, f"{VLM_DIR}.")
        if vision:
            unused.append(vision)
        return "|".join(unused)

    def _video_frozen_by_design(self) -> list[str]:
        """A SAM 2 video mask head: trained on images, none of its memory reaches a loss, nor its object-score head
        (the image path does not gate by it); trained on clips, the memory parts ``model.video`` freezes, the mask
        prompt's downsampler (no mask prompts) and the unused no-memory position encoding, while the object-score
        head trains (the clip loss's presence term, SAM 2's gating on every frame)."""
        sam = r"sam\."
        if not self.clip_training:
            return [r"pred_obj_score_head\.", r"sam\.no_memory_positional_encoding$"] + [
                sam + part.removeprefix(r"(^|\.)") for part in frozen_memory_parts(self.video, all_parts=True)]
        return [r"sam\.no_memory_positional_encoding$", r"sam\.mask_downsample\."] + [
            sam + part.removeprefix(r"(^|\.)") for part in frozen_memory_parts(self.video)]

    def selected_by_prediction(self) -> str | None:
        """Regex of parameters that reach the loss only for the samples whose prediction selects them: with
        ``best_iou`` the hypernetworks of the three candidate masks, of which each prompt keeps one. The preflight
        does not call them dead when a few steps happen to pick the same candidate. On clips also the "no object"
        pointer and occlusion embedding (frames the model calls empty)."""
        if self.clip_training and self.video_capable:
            return MEMORY_SELECTED_BY_PREDICTION
        return r"output_hypernetworks_mlps\.[1-9]" if self.mask_output == "best_iou" else None

    def save_base(self, out_dir: str | Path) -> Path:
        """One folder ``model.path`` loads back: ``vlm/`` (merged VLM + processor/tokenizer with [SEG] and the chat
        template), ``sam/``, ``projection.safetensors``, ``segvlm.json``. Merges a copy; the live model keeps its
        adapters."""
        from safetensors.torch import save_file

        from medtune.models.lora import merged_copy

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        net = merged_copy(self.net)
        net.vlm.save_pretrained(str(out_dir / VLM_DIR))
        self.processor.chat_template = self.codec.template
        save_processor(self.processor, out_dir / VLM_DIR)
        net.sam.save_pretrained(str(out_dir / SAM_DIR))
        save_file({k: v.detach().contiguous().cpu() for k, v in net.seg_projection.state_dict().items()},
                  str(out_dir / PROJECTION_FILE))
        meta = {"format": FORMAT_VERSION, "seg_token": self.seg_token, "seg_token_id": self.seg_token_id,
                "vlm_model_type": net.vlm.config.model_type, "sam_model_type": net.sam.config.model_type,
                "hidden_size": net.seg_projection[0].in_features, "prompt_size": net.seg_projection[-1].out_features,
                SAM_MEAN_KEY: self.sam_image_mean, SAM_STD_KEY: self.sam_image_std}
        (out_dir / SEGVLM_JSON).write_text(json.dumps(meta, indent=2))
        return out_dir

    def load_base_weights(self, folder: str | Path) -> None:
        from safetensors.torch import load_file

        folder, net = Path(folder), self.base_network
        reload_vlm_weights(net.vlm, folder / VLM_DIR)  # the plain VLM's reload: any VLM the family loads
        load_safetensors_folder(net.sam, folder / SAM_DIR)
        net.seg_projection.load_state_dict(load_file(str(folder / PROJECTION_FILE)))


def _with_ids(item: dict, ids: list[int]) -> dict:
    """``item`` with the token sequence ``ids`` (a prompt grown by generated turns), no labels; its other per-token
    keys extended as ``ChatCodec.encode`` extends them (attention 1, others 0)."""
    out = {k: v for k, v in item.items() if k != "labels"}
    out["input_ids"] = torch.tensor(ids, dtype=torch.long)
    for key in item[SEQUENCE_KEYS]:
        if key not in ("input_ids", "labels"):
            out[key] = extend_token_key(key, item[key][:len(ids)], len(ids))
    out[SEQUENCE_KEYS] = tuple(k for k in item[SEQUENCE_KEYS] if k != "labels")
    return out


def _floating_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
