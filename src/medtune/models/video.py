"""Family ``sam2_video``: SAM 2 on frame sequences (transformers ``Sam2VideoModel``), trained through its memory.

Training (``seg(batch=clip_batch)``) runs a clip the way ``Sam2VideoModel`` runs a video at inference, but with
gradient: transformers' ``forward`` / ``propagate_in_video_iterator`` run under ``torch.inference_mode()`` and
``get_image_embeddings`` under ``no_grad``, so the clip forward is composed from the network's own per-frame steps
(none of which disables gradient) around transformers' memory bank, a ``Sam2VideoInferenceSession`` used as a plain
container of per-frame outputs:

- every frame of every clip goes through the vision encoder in one batch (``get_image_features``);
- the prompted frame (``model.prompt``: the first annotated frame of the clip for ``mask`` / ``box``, frame 0 for
  ``none``) is the conditioning frame: a mask prompt is taken as that frame's output (``_use_mask_as_output``), a box
  is encoded as SAM 2's two box-corner points, no prompt decodes from the frame alone (``no_memory_embedding``);
- the frames after it are tracked forward, the frames before it backward (``reverse``), as SAM 2 propagates: each
  tracked frame attends to the bank's memories (``memory_attention``) and object pointers, the mask decoder decodes,
  and the memory encoder turns the frame and its predicted mask into the frame's memory (``_encode_new_memory``);
- the bank is read with transformers' own selection (``_gather_memory_frame_outputs``, ``_get_object_pointers`` in
  streaming mode, which is what a long video gets), batched over the clips that share a prompted frame.

Inference (``propagate``) streams frames through the session API itself under inference mode, trimming the bank after
every frame to what the model can still read (``model.video.memory_frames``), so memory stays flat in the length of
the video. A test checks that both give the same masks on a clip.

The clip's loss (``clip_loss``) is SAM 2's: a mask loss on the annotated frames (not on a mask-prompted frame, whose
output is the prompt) plus the object-score loss that trains the head deciding whether the object is in the frame
(a frame it calls empty gets the constant -1024 logits and no mask gradient).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medtune.config import Config, VideoModelCfg, deep_merge
from medtune.data.datasets import mask_box
from medtune.data.video import collate_clips
from medtune.errors import ConfigError
from medtune.models.base import ModelOutput
from medtune.models.sam import Sam2SegModel, build_sam_network, tiny_sam2_config_dict

log = logging.getLogger(__name__)

# the one object a clip tracks, by the session's (arbitrary) object id
OBJECT_ID = 1
# SAM 2's box prompt: its two corners as points with these labels (Sam2VideoProcessor's encoding)
BOX_CORNER_LABELS = (2, 3)
# transformers' memory attention reads memories of this many channels (its cross-attention key size is fixed)
MEMORY_CHANNELS = 64
# tiny test model: fpn / decoder width. SAM 2 splits each object pointer into memory-sized tokens, which needs a width
# that is a multiple of MEMORY_CHANNELS and larger than it.
TINY_HIDDEN = 2 * MEMORY_CHANNELS
# tiny model's memory-fuser layer scale. transformers initialises it to 0, which leaves the fuser's convolutions
# without gradient on a model built from a config; pretrained SAM 2 checkpoints carry learnt values.
TINY_FUSER_LAYER_SCALE = 0.1
# object-score head bias of a model built from a config (init_from_config)
OBJECT_SCORE_PRIOR = 1.0
# SAM 2's object-score loss weight next to the mask loss (its training recipe's loss_class weight)
PRESENCE_WEIGHT = 1.0


def tiny_sam2_video_config_dict() -> dict[str, Any]:
    """models/sam.py's tiny SAM 2 (64x64 input, Hiera sizes) widened to SAM 2's memory layout, with a one-layer memory
    attention and memory fuser."""
    base = tiny_sam2_config_dict()
    size = base["prompt_encoder_config"]["image_size"]
    top = base["vision_config"]["backbone_feature_sizes"][-1]
    return deep_merge(base, {
        "vision_config": {"fpn_hidden_size": TINY_HIDDEN},
        # SAM 2's mask-prompt width (models/sam.py's 4 leaves its first layer norm one channel wide: constant)
        "prompt_encoder_config": {"hidden_size": TINY_HIDDEN, "mask_input_channels": 16},
        "mask_decoder_config": {"hidden_size": TINY_HIDDEN},
        "image_size": size,
        "memory_attention_hidden_size": TINY_HIDDEN, "memory_attention_num_layers": 1,
        "memory_attention_feed_forward_hidden_size": TINY_HIDDEN, "memory_attention_rope_feat_sizes": list(top),
        "memory_encoder_hidden_size": TINY_HIDDEN, "memory_encoder_output_channels": MEMORY_CHANNELS,
        "mask_downsampler_embed_dim": TINY_HIDDEN, "memory_fuser_embed_dim": TINY_HIDDEN,
        "memory_fuser_intermediate_dim": TINY_HIDDEN, "memory_fuser_num_layers": 1,
        "memory_fuser_layer_scale_init_value": TINY_FUSER_LAYER_SCALE,
    })


def tiny_sam2_video_config(**overrides: Any):
    """A ~1.3M-parameter Sam2VideoConfig (64x64 input) for tests and the demo."""
    from transformers import Sam2VideoConfig

    return Sam2VideoConfig(**deep_merge(tiny_sam2_video_config_dict(), overrides))


@dataclass
class VideoModelOutput(ModelOutput):
    """``mask_logits`` [B, T, 1, H, W] at the input size; ``object_score_logits`` [B, T] (> 0: the model sees the
    object in the frame); ``mask_prompted`` [B, T] bool: the frame whose output is the mask prompt itself (no loss
    there); ``prompt_frame`` [B] long: each clip's (first) conditioning frame; ``conditioning`` [B, T] bool: the
    frames decoded from the prompt without memory (the segmenting VLM: the frames the VLM saw)."""

    object_score_logits: torch.Tensor | None = None
    mask_prompted: torch.Tensor | None = None
    prompt_frame: torch.Tensor | None = None
    conditioning: torch.Tensor | None = None


@dataclass
class VideoPrompt:
    """What prompts propagation on frame ``frame``: a ``mask`` [H, W] (1 = object) or a ``box`` (x1, y1, x2, y2 in
    the frame's pixels), or neither (semantic: the model decodes that frame alone); or a sparse prompt
    ``embedding`` [D] (the segmenting VLM's projected [SEG]) on each of ``embedding_frames`` (default: ``frame``),
    all decoded without memory before propagation starts at the first of them (Sa2VA's video inference)."""

    frame: int = 0
    mask: torch.Tensor | None = None
    box: Sequence[float] | None = None
    embedding: torch.Tensor | None = None
    embedding_frames: Sequence[int] | None = None

    def conditioning_frames(self) -> tuple[int, ...]:
        if self.embedding is not None and self.embedding_frames:
            return tuple(sorted(set(int(f) for f in self.embedding_frames)))
        return (int(self.frame),)


@dataclass
class VideoHead:
    """What ``propagate`` needs of a model whose mask head is a ``Sam2VideoModel`` (``model.video_head()``): the
    network, the module switched to eval mode while propagating, the frame -> encoder input function (a frame
    float [C, H, W] in [0, 1] -> [1, 3, S, S]), and the memory bank bound."""

    net: nn.Module
    module: nn.Module
    pixels: Callable[[torch.Tensor], torch.Tensor]
    image_size: int
    in_channels: int
    memory_frames: int | None
    dtype: torch.dtype


class Sam2VideoSegModel(Sam2SegModel):
    family = "sam2_video"
    model_type = "sam2_video"
    supports_feature_cache = False  # a clip's frames are encoded together inside the clip forward
    takes_mask_prompt = True
    MEMORY_ATTENTION_TARGETS = r"^memory_attention\.layers\.\d+\.(?:self_attn|cross_attn_image)\.[qkvo]_proj$"
    # everything that may train fully under LoRA: also the modules QLoRA leaves unquantised
    DEFAULT_MODULES_TO_SAVE = ["mask_decoder", "memory_encoder", "object_pointer_proj",
                               "temporal_positional_encoding_projection_layer", "mask_downsample"]

    def __init__(self, net: nn.Module, in_channels: int, prompt: str, video: VideoModelCfg | None = None):
        super().__init__(net, in_channels, prompt)
        self.video = video or VideoModelCfg()

    @staticmethod
    def transformers_classes():
        from transformers import Sam2VideoConfig, Sam2VideoModel

        return Sam2VideoModel, Sam2VideoConfig

    @staticmethod
    def tiny_config_dict() -> dict[str, Any]:
        return tiny_sam2_video_config_dict()

    @staticmethod
    def load_network(loader, path, **kwargs) -> nn.Module:
        return load_sam2_video(path, **kwargs)  # memories of any width (a shrunk Sa2VA import: 16)

    # --- training forward -----------------------------------------------------------------------------------------
    def forward_batch(self, batch: dict) -> VideoModelOutput:
        """A collated clip batch: ``frames`` [B, T, C, H, W] in [0, 1], ``masks`` [B, T, 1, H, W], ``annotated``
        [B, T] bool; ``box`` [B, 4] (optional, input pixels) overrides the box of the prompted frame's mask."""
        return self.forward_clip(batch["frames"], batch.get("annotated"), batch.get("masks"), batch.get("box"))

    def forward_logits(self, image: torch.Tensor, box: torch.Tensor | None = None) -> torch.Tensor:
        """One image as a one-frame clip (semantic or box-prompted): mask logits [B, 1, H, W]."""
        if self.prompt == "mask":
            raise ValueError("model.prompt=mask: a single image has no frame to carry the mask to; use "
                             "forward_clip / propagate on a frame sequence")
        if self.prompt == "box" and box is None:
            raise ValueError("model.prompt=box: sam2_video needs a box [B, 4] (x1, y1, x2, y2 in input pixels)")
        return self.forward_clip(image[:, None], box=box).mask_logits[:, 0]

    def forward_clip(self, frames: torch.Tensor, annotated: torch.Tensor | None = None,
                     masks: torch.Tensor | None = None, box: torch.Tensor | None = None) -> VideoModelOutput:
        if frames.ndim != 5 or frames.shape[2] != self.in_channels:
            raise ValueError(f"sam2_video expects frames [B, T, {self.in_channels}, H, W], got {tuple(frames.shape)}")
        b, t, _, h, w = frames.shape
        net = self.base_network
        prompt_frame = self._prompt_frames(b, t, annotated, frames.device)
        if self.prompt == "mask" and masks is None:
            raise ValueError("model.prompt=mask needs the clip's masks [B, T, 1, H, W] (batch['masks'])")
        if self.prompt == "box" and box is None:
            if masks is None:
                raise ValueError("model.prompt=box needs batch['box'] [B, 4] or the clip's masks to draw it from")
            box = torch.stack([mask_box(masks[i, prompt_frame[i]].detach().cpu()) for i in range(b)])
        vision = net.get_image_features(self._encoder_input(frames.flatten(0, 1)), return_dict=True)
        feats, pos = list(vision.fpn_hidden_states), list(vision.fpn_position_encoding)  # each [HW, B*T, C]

        groups = []
        for k in sorted(set(prompt_frame.tolist())):
            clips = (prompt_frame == k).nonzero().flatten()
            cond = ClipConditioning(frames=(k,))
            if self.prompt == "mask":
                cond.mask = prompt_mask_input(masks[clips, k].float(), self.image_size)
            elif self.prompt == "box":
                cond.points = box_points(box[clips].to(frames.device), (h, w), self.image_size)
            groups.append((clips, cond))
        low_res, scores = decode_clips(net, feats, pos, b, t, groups)
        logits = upsample_logits(low_res, (h, w), self.image_size).view(b, t, 1, h, w)
        conditioning = torch.arange(t, device=frames.device)[None, :] == prompt_frame[:, None]
        return VideoModelOutput(mask_logits=logits, object_score_logits=scores.view(b, t).float(),
                                mask_prompted=conditioning & (self.prompt == "mask"), prompt_frame=prompt_frame,
                                conditioning=conditioning)

    def _prompt_frames(self, b: int, t: int, annotated: torch.Tensor | None, device) -> torch.Tensor:
        """Each clip's conditioning frame: its first annotated frame when a mask or box prompts it, frame 0 in
        semantic mode (nothing ties the prompt-less conditioning to an annotation, and propagation starts there)."""
        if self.prompt == "none" or annotated is None:
            return torch.zeros(b, dtype=torch.long, device=device)
        annotated = annotated.bool().view(b, t)
        empty = (~annotated.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"model.prompt={self.prompt}: clip {empty[0]} of the batch has no annotated frame to "
                             "prompt on; the clip sampler must put an annotated frame in every clip")
        return annotated.int().argmax(dim=1).to(device)

    # --- the video task's hooks (tasks/video.py), alike for every model that takes clips ---------------------------
    def clip_encoder(self) -> Callable[..., dict]:
        """(clip, question, answer) -> the item the clip forward takes: a VideoClipDataset clip as it is (this family
        reads no question)."""
        return passthrough_clip

    clip_collate = staticmethod(collate_clips)

    def segment_video(self, frames, prompt: VideoPrompt | None = None, question: str | None = None,
                      max_new_tokens: int = 0) -> tuple[None, Iterator[tuple[int, torch.Tensor]]]:
        """(no answer, ``propagate`` from ``prompt``): what the video task's validation, evaluation and prediction
        run (a segmenting VLM answers ``question`` first)."""
        return None, propagate(self, frames, prompt)

    def video_head(self) -> VideoHead:
        return VideoHead(net=self.base_network, module=self, pixels=lambda frame: self._encoder_input(frame[None]),
                         image_size=self.image_size, in_channels=self.in_channels,
                         memory_frames=self.video.memory_frames, dtype=self._input_dtype())

    # --- what trains ----------------------------------------------------------------------------------------------
    def default_lora_targets(self) -> str:
        targets = self.DEFAULT_TARGETS
        if self.video.memory_attention == "train":
            targets = f"{targets}|{self.MEMORY_ATTENTION_TARGETS}"
        return targets

    def default_modules_to_save(self) -> list[str] | None:
        keep = ["mask_decoder"]
        if self.video.memory_encoder == "train":
            keep.append("memory_encoder")
        if self.video.object_pointers == "train":
            keep += ["object_pointer_proj", "temporal_positional_encoding_projection_layer"]
            if self.prompt == "mask":
                keep.append("mask_downsample")
        return keep

    def frozen_by_design(self) -> str | None:
        # Never reach the clip's mask logits or object scores: the IoU head only picks among the multimask outputs
        # (argmax), no_memory_positional_encoding is unused by Sam2VideoModel. The single-mask token (hypernetwork 0)
        # and the point embeddings serve box prompts only; the mask embedding and mask downsampler mask prompts only,
        # and a mask-prompted clip never decodes a frame without memory (no_memory_embedding). Memory parts the
        # config freezes (model.video) are kept frozen in every fine-tuning mode the same way.
        unused = [r"iou_prediction_head\.", r"(^|\.)no_memory_positional_encoding$"]
        if self.prompt != "box":
            unused += [r"output_hypernetworks_mlps\.0\.", r"prompt_encoder\.point_embed\."]
        if self.prompt != "mask":
            unused += [r"prompt_encoder\.mask_embed\.", r"(^|\.)mask_downsample\."]
        else:
            unused.append(r"(^|\.)no_memory_embedding$")
        return "|".join(unused + frozen_memory_parts(self.video))

    def selected_by_prediction(self) -> str | None:
        # the multimask hypernetworks reach the loss when their mask has the best predicted IoU; the "no object"
        # pointer and occlusion embedding when the model calls the object absent from a frame
        return MEMORY_SELECTED_BY_PREDICTION


# what reaches a clip's loss only on the frames whose prediction selects it: the multimask hypernetworks when their
# mask has the best predicted IoU; the "no object" pointer and occlusion embedding when the object is called absent
MEMORY_SELECTED_BY_PREDICTION = (r"output_hypernetworks_mlps\.[1-9]\.|(^|\.)no_object_pointer$|"
                                 r"(^|\.)occlusion_spatial_embedding_parameter$")


def frozen_memory_parts(video: VideoModelCfg, all_parts: bool = False) -> list[str]:
    """Regexes of the memory parts ``model.video`` keeps frozen (``all_parts``: every one of them, for a model that
    is not trained on clips, where none of them reaches a loss)."""
    unused = []
    if all_parts or video.memory_attention == "frozen":
        unused += [r"(^|\.)memory_attention\.", r"(^|\.)memory_temporal_positional_encoding$"]
    if all_parts or video.memory_encoder == "frozen":
        unused += [r"(^|\.)memory_encoder\.", r"(^|\.)occlusion_spatial_embedding_parameter$"]
    if all_parts or video.object_pointers == "frozen":
        unused += [r"(^|\.)object_pointer_proj\.", r"(^|\.)temporal_positional_encoding_projection_layer\.",
                   r"(^|\.)no_object_pointer$", r"(^|\.)mask_downsample\."]
    return unused


@dataclass
class ClipConditioning:
    """What conditions a group of clips: the conditioning ``frames`` (clip positions, decoded from the prompt without
    memory, before any other frame) and the prompt on them: a ``mask`` [n, 1, S, S] in the model's input square or
    box ``points`` (corner points [n, 1, 2, 2], labels [n, 1, 2]) on the first of them, or a sparse prompt
    ``embedding`` [n, D] (the segmenting VLM's projected [SEG]) on every one of them (Sa2VA's video inference), or
    nothing (semantic: the frame decoded alone)."""

    frames: tuple[int, ...] = (0,)
    mask: torch.Tensor | None = None
    points: tuple[torch.Tensor, torch.Tensor] | None = None
    embedding: torch.Tensor | None = None

    @property
    def prompted(self) -> bool:
        return self.mask is not None or self.points is not None or self.embedding is not None


def decode_clips(net: nn.Module, feats: list[torch.Tensor], pos: list[torch.Tensor], b: int, t: int,
                 groups: Sequence[tuple[torch.Tensor, ClipConditioning]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The clips of a batch through the memory: ``feats`` / ``pos`` the vision features of all B*T frames ([HW,
    B*T, C] per level, ``get_image_features``), ``groups`` (clip indices, their conditioning) covering every clip
    once. Returns the low-resolution mask logits [B*T, 1, h, w] and object-score logits [B*T]."""
    low_res: list[torch.Tensor | None] = [None] * (b * t)
    scores: list[torch.Tensor | None] = [None] * (b * t)
    for clips, cond in groups:
        clip_ids = clips.tolist()  # one host sync per group, not per frame
        for frame, out in track_clips(net, feats, pos, clips, t, cond):
            for row, clip in enumerate(clip_ids):
                low_res[clip * t + frame] = out["pred_masks"][row]
                scores[clip * t + frame] = out["object_score_logits"][row].reshape(())
    return torch.stack(low_res), torch.stack(scores)


def tracking_order(t: int, conditioning: Sequence[int]) -> list[tuple[int, bool]]:
    """(frame, reverse) in SAM 2's order: the conditioning frames first, then forward from the first of them to the
    end, then backward to frame 0 (``propagate_in_video`` from the earliest prompted frame, both ways)."""
    cond = sorted(set(int(k) for k in conditioning))
    first = cond[0]
    return ([(k, False) for k in cond] + [(f, False) for f in range(first + 1, t) if f not in cond]
            + [(f, True) for f in range(first - 1, -1, -1) if f not in cond])


def track_clips(net: nn.Module, feats: list[torch.Tensor], pos: list[torch.Tensor], clips: torch.Tensor, t: int,
                cond: ClipConditioning) -> Iterator[tuple[int, dict]]:
    """The clips ``clips`` (sharing ``cond``) through the memory, frame by frame in ``tracking_order``, around
    transformers' memory bank (a ``Sam2VideoInferenceSession`` used as a container). Yields (frame,
    {"pred_masks" [n, 1, h, w], "object_pointer", "object_score_logits" [n, 1, 1]})."""
    from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

    top = feats[-1]
    bank = Sam2VideoInferenceSession(inference_device=top.device, inference_state_device=top.device,
                                     video_storage_device=top.device, dtype=top.dtype)
    obj = bank.obj_id_to_idx(OBJECT_ID)
    for frame, reverse in tracking_order(t, cond.frames):
        columns = clips * t + frame
        out = frame_step(net, bank, obj, frame, [x[:, columns] for x in feats], pos[-1][:, columns], reverse, cond)
        yield frame, out


def frame_step(net: nn.Module, bank, obj: int, frame: int, level: list[torch.Tensor], top_pos: torch.Tensor,
               reverse: bool, cond: ClipConditioning) -> dict[str, torch.Tensor]:
    """One frame of n clips (``level``: its vision features [HW, n, C] per level, high to low resolution): decoded
    from the prompt without memory on a conditioning frame, else attended to the bank's memories; its memory
    encoded and stored in ``bank``. What ``_run_single_frame_inference`` + ``_batch_encode_memories`` compute, with
    gradient, for n clips, and with a sparse prompt embedding. Shared by the training forward and ``propagate``."""
    n = level[-1].shape[1]
    channels, (fh, fw) = net.hidden_dim, net.backbone_feature_sizes[-1]
    high_res = [x.permute(1, 2, 0).reshape(n, x.shape[2], *size)
                for x, size in zip(level[:-1], net.backbone_feature_sizes[:-1])]
    current = level[-1]
    conditioning = frame in cond.frames
    if conditioning and cond.mask is not None:
        pix = current.permute(1, 2, 0).reshape(n, channels, fh, fw)
    elif conditioning:  # no memory: SAM 2's learnt "no memory" token
        pix = (current + net.no_memory_embedding).permute(1, 2, 0).reshape(n, channels, fh, fw)
    else:
        pix = _memory_conditioned(net, bank, obj, frame, current, top_pos, reverse)
    on_frame = cond if conditioning else ClipConditioning(cond.frames)
    first = conditioning and frame == min(cond.frames)
    out = _decode(net, high_res, pix, on_frame, conditioning, first)
    memory, memory_pos = net._encode_new_memory(current, out.pop("high_res_masks"), out["object_score_logits"],
                                                is_mask_from_pts=conditioning and cond.prompted)
    bank.store_output(obj, frame, output_value={**out, "maskmem_features": memory, "maskmem_pos_enc": memory_pos},
                      is_conditioning_frame=conditioning)
    return out


@contextlib.contextmanager
def _sparse_prompt(net: nn.Module, embedding: torch.Tensor | None) -> Iterator[None]:
    """``embedding`` [1, D] appended to the prompt encoder's sparse output (after SAM 2's padding point), as Sa2VA
    injects the [SEG] embedding; transformers' ``_single_frame_forward`` takes no custom sparse prompt otherwise."""
    if embedding is None:
        yield
        return

    def append(module, args, output):
        sparse, dense = output
        return torch.cat([sparse, embedding.to(sparse.dtype).view(sparse.shape[0], 1, 1, -1)], dim=2), dense

    handle = net.prompt_encoder.register_forward_hook(append)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _best_mask_per_clip(net: nn.Module) -> Iterator[None]:
    """SAM 2's best-of-three mask choice (the multimask output with the highest predicted IoU) made per clip inside
    the mask decoder, which then hands ``_single_frame_forward`` the chosen mask and token as its single output.
    transformers' own choice indexes [batch, object, best] with a batch of several clips, which pairs every clip
    with every other clip's choice; with the choice made here the n clips of a frame decode in one batch and each
    gets the mask (and object pointer) it would get alone."""
    decoder = net.mask_decoder

    def all_three(module, args, kwargs):
        return args, {**kwargs, "multimask_output": True}

    def choose(module, args, kwargs, output):
        masks, iou, tokens, object_scores = output  # [n, P, 3, h, w], [n, P, 3], [n, P, 3, C], [n, 1]
        best = iou.argmax(dim=-1, keepdim=True)  # [n, P, 1]
        masks = masks.gather(2, best[..., None, None].expand(-1, -1, 1, *masks.shape[-2:]))
        tokens = tokens.gather(2, best[..., None].expand(-1, -1, 1, tokens.shape[-1]))
        return masks, iou.gather(2, best), tokens, object_scores

    handles = [decoder.register_forward_pre_hook(all_three, with_kwargs=True),
               decoder.register_forward_hook(choose, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# what a frame's decode hands on: to the loss (masks, object score) and to the memory (high-res mask, object pointer)
DECODER_OUTPUTS = ("pred_masks", "object_pointer", "object_score_logits", "high_res_masks")


def _decode(net: nn.Module, high_res: list[torch.Tensor], pix: torch.Tensor, cond: ClipConditioning,
            conditioning: bool, first: bool) -> dict[str, torch.Tensor]:
    """A frame of n clips through the mask decoder in one batch (``_run_single_frame_inference`` after its memory
    step): the mask prompt taken as the output, else the decoder on the (memory-conditioned) features with the box,
    the embedding (every conditioning frame) or no prompt. A mask or box prompts the first conditioning frame only."""
    if first and cond.mask is not None:
        # one clip at a time: the object pointer of a mask prompt comes from a multimask decode inside transformers
        # (``_use_mask_as_output``), whose choice among the three pairs clips up when given several
        parts = [net._use_mask_as_output(pix[i:i + 1], [x[i:i + 1] for x in high_res], cond.mask[i:i + 1])
                 for i in range(pix.shape[0])]
        return {key: torch.cat([getattr(part, key) for part in parts]) for key in DECODER_OUTPUTS}
    points = cond.points if first else None
    point_inputs = None if points is None else {"point_coords": points[0], "point_labels": points[1]}
    multimask = net._use_multimask(conditioning, point_inputs)
    with _sparse_prompt(net, cond.embedding if conditioning else None), \
            (_best_mask_per_clip(net) if multimask else contextlib.nullcontext()):
        out = net._single_frame_forward(pixel_values=None, input_points=None if points is None else points[0],
                                        input_labels=None if points is None else points[1],
                                        image_embeddings=high_res + [pix], multimask_output=False)
    return {key: getattr(out, key) for key in DECODER_OUTPUTS}


@contextlib.contextmanager
def _pointers_as_in_inference(net: nn.Module) -> Iterator[None]:
    """transformers reads the object pointers of conditioning frames *after* the current one (in tracking
    direction) in training mode only (SAM 2's ``only_obj_ptrs_in_the_past_for_eval``): training reads them as
    inference does, so a clip trains the way it is propagated. Only ``_get_object_pointers`` runs inside; the
    flag of the top module alone is switched (no submodule changes mode)."""
    was = net.training
    net.training = False
    try:
        yield
    finally:
        net.training = was


def _memory_conditioned(net: nn.Module, bank, obj: int, frame: int, current: torch.Tensor,
                        current_pos: torch.Tensor, reverse: bool) -> torch.Tensor:
    """``current`` [HW, n, C] attended to the bank's memories and object pointers: what transformers'
    ``_prepare_memory_conditioned_features`` computes for one clip, for n clips (its final reshape assumes n = 1)."""
    n, channels = current.shape[1], net.hidden_dim
    fh, fw = net.backbone_feature_sizes[-1]
    memories, memory_pos = net._build_memory_attention_inputs(
        net._gather_memory_frame_outputs(bank, obj, frame, track_in_reverse_time=reverse), current.device)
    with _pointers_as_in_inference(net):
        offsets, pointers, max_pointers = net._get_object_pointers(bank, obj, frame, None, current.device,
                                                                   track_in_reverse_time=reverse, streaming=True)
    n_pointer_tokens = 0
    if pointers:
        pointer_tokens, pointer_pos = net._process_object_pointers(offsets, pointers, max_pointers, n, channels,
                                                                   current.device)
        memories.append(pointer_tokens)
        memory_pos.append(pointer_pos)
        n_pointer_tokens = pointer_tokens.shape[0]
    attended = net.memory_attention(current_vision_features=current, current_vision_position_embeddings=current_pos,
                                    memory=torch.cat(memories, dim=0).to(current.dtype),
                                    memory_posision_embeddings=torch.cat(memory_pos, dim=0),
                                    num_object_pointer_tokens=n_pointer_tokens)  # [1, n, HW, C]
    return attended[0].transpose(1, 2).reshape(n, channels, fh, fw)


# --- prompts and outputs, shared by training and propagation ----------------------------------------------------------
def prompt_mask_input(mask: torch.Tensor, image_size: int) -> torch.Tensor:
    """Mask prompt [n, 1, H, W] -> the model's square input [n, 1, S, S] in {0, 1}, as Sam2VideoProcessor makes it."""
    mask = mask.float()
    if mask.shape[-2:] != (image_size, image_size):
        mask = F.interpolate(mask, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return (mask >= 0.5).float()


def box_points(box: torch.Tensor, frame_size: tuple[int, int], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes [n, 4] (x1, y1, x2, y2 in frame pixels) -> SAM 2's box prompt: corner points [n, 1, 2, 2] in the model's
    input square and their labels [n, 1, 2]."""
    h, w = frame_size
    scale = torch.tensor([image_size / w, image_size / h], device=box.device, dtype=torch.float32)
    corners = box.float().view(-1, 1, 2, 2) * scale
    labels = torch.tensor(BOX_CORNER_LABELS, dtype=torch.int32, device=box.device).expand(corners.shape[0], 1, 2)
    return corners, labels.contiguous()


def upsample_logits(low_res: torch.Tensor, frame_size: tuple[int, int], image_size: int) -> torch.Tensor:
    """Low-resolution mask logits [n, 1, h, w] -> [n, 1, H, W] at the frame's size, as Sam2VideoProcessor's
    post_process_masks does (to the model's square input, then to the frame)."""
    logits = F.interpolate(low_res.float(), size=(image_size, image_size), mode="bilinear", align_corners=False)
    if tuple(frame_size) != (image_size, image_size):
        logits = F.interpolate(logits, size=tuple(frame_size), mode="bilinear", align_corners=False)
    return logits


def supervised_frames(out: VideoModelOutput, batch: dict) -> torch.Tensor:
    """bool [B * T]: the frames of a clip batch that carry a loss: the annotated ones (padding never is), less the
    frame a mask prompted (its output is the prompt itself). The clip loss and the RL mask policy select these."""
    selected = batch["annotated"].bool().to(out.mask_logits.device)
    if out.mask_prompted is not None:
        selected = selected & ~out.mask_prompted
    return selected.flatten()


def clip_loss(out: VideoModelOutput, batch: dict,
              mask_loss: Callable[..., tuple[torch.Tensor, dict[str, float]]]) -> tuple[torch.Tensor, dict[str, float]]:
    """SAM 2's clip objective: ``mask_loss(logits [N, 1, H, W], target, fov)`` (e.g. losses.ComboLoss) on the N
    annotated frames of the batch that were not mask-prompted, plus BCE of the object score against "the annotated
    mask is not empty". Unannotated frames carry no loss (they only carry memory)."""
    selected = supervised_frames(out, batch)
    if not bool(selected.any()):  # e.g. a mask-prompted clip whose only annotated frame is the prompt
        return out.mask_logits.sum() * 0.0, {}
    logits = out.mask_logits.flatten(0, 1)[selected]
    target = batch["masks"].flatten(0, 1).to(logits.device)[selected].float()
    fov = batch.get("fov")
    fov = fov.flatten(0, 1).to(logits.device)[selected].float() if fov is not None else None
    loss, parts = mask_loss(logits, target, fov)
    present = (target.flatten(1).amax(dim=1) > 0.5).float()
    presence = F.binary_cross_entropy_with_logits(out.object_score_logits.flatten()[selected], present)
    parts = {**parts, "presence": float(presence.detach())}
    return loss + PRESENCE_WEIGHT * presence, parts


def clip_objective(out: VideoModelOutput, batch: dict, mask_loss, lm_weight: float = 0.0
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """The video task's loss: ``clip_loss`` (mask loss on the annotated frames + object-score BCE), plus ``lm_weight``
    x the LM loss on the answer when the model gave one (a segmenting VLM: ``task.lm_weight``, as the image task adds
    it)."""
    loss, parts = clip_loss(out, batch, mask_loss)
    if out.lm_loss is not None and lm_weight > 0:
        loss = loss + lm_weight * out.lm_loss
        parts = {**parts, "lm": float(out.lm_loss.detach())}
    return loss, parts


def passthrough_clip(clip: dict, question: str | None = None, answer: str | None = None) -> dict:
    """The clip item of a model that reads no question: the clip itself."""
    return clip


# --- inference: streaming propagation with a bounded memory bank ---------------------------------------------------
def memory_reach(net: nn.Module, memory_frames: int | None) -> tuple[int, int]:
    """(frames back whose memories the next frame reads, frames back whose object pointers it reads), capped at
    ``memory_frames``."""
    memories = net.num_maskmem - 1
    pointers = net.config.max_object_pointers_in_encoder - 1
    if memory_frames is not None:
        memories, pointers = min(memories, memory_frames), min(pointers, memory_frames)
    return memories, pointers


def memory_bank_frames(session) -> int:
    """Frames whose outputs a session's memory bank holds (all objects)."""
    return sum(len(store) for per_obj in session.output_dict_per_obj.values() for store in per_obj.values())


def memory_bank_bytes(session) -> int:
    """Bytes of the tensors the session holds: bank, stored frames, cached vision features."""
    seen: set[int] = set()

    def size(value) -> int:
        if torch.is_tensor(value):
            if value.data_ptr() in seen:
                return 0
            seen.add(value.data_ptr())
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(size(v) for v in value)
        return 0

    return (size(session.output_dict_per_obj) + size(session.processed_frames or {})
            + size(session.cache._vision_features))


def _trim_bank(session, obj: int, readers: list[tuple[int, int]], reach: tuple[int, int]) -> None:
    """Keep of the tracked frames' outputs only what the frames still to come (``readers``: (frame, direction))
    can read: whole memories within ``reach[0]`` frames, object pointers within ``reach[1]``; drop the full-size mask
    logits every frame (transformers keeps them for the memory encoder of the frame's own step only)."""
    memory_reach_, pointer_reach = reach
    store = session.output_dict_per_obj[obj]
    for out in store["cond_frame_outputs"].values():
        out.pop("high_res_masks", None)
    tracked = store["non_cond_frame_outputs"]
    for frame in list(tracked):
        behind = [(reader - frame) * direction for reader, direction in readers]
        if any(1 <= d <= memory_reach_ for d in behind):
            for key in ("high_res_masks", "pred_masks"):
                tracked[frame].pop(key, None)
        elif any(1 <= d <= pointer_reach for d in behind):
            tracked[frame] = {"object_pointer": tracked[frame]["object_pointer"]}
        else:
            del tracked[frame]
            session.frames_tracked_per_obj[obj].pop(frame, None)


def frame_reader(frames) -> Callable[[int], torch.Tensor] | None:
    """Random access to ``frames`` (a FrameReader's ``read``, a tensor or a sequence), or None for a plain iterable."""
    if hasattr(frames, "read") and hasattr(frames, "__len__"):
        return frames.read
    if torch.is_tensor(frames) or isinstance(frames, Sequence):
        return frames.__getitem__
    return None


def propagate(seg: nn.Module, frames: Iterable[torch.Tensor], prompt: VideoPrompt | None = None, *,
              memory_frames: int | None = None,
              after_frame: Callable[[Any], None] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Segment a frame sequence: yields (frame index, object probability float32 [H, W] on the CPU, at the frame's
    size) for every frame, the (first) prompted frame first, then forward to the end, then (prompt on a later frame)
    backward to frame 0, which needs random access to ``frames`` (a FrameReader, a tensor [T, C, H, W] or a list).

    ``seg``: any model with a ``video_head()`` (family ``sam2_video``; a segmenting VLM whose mask head is a SAM 2
    video model). ``frames``: float [C, H, W] in [0, 1]. ``prompt``: None = semantic, conditioned on frame 0 without
    a prompt; an embedding prompt's frames are all decoded first (random access needed), as the training forward
    does. The memory bank keeps the conditioning frames and, of the tracked frames, what the frames to come can read
    (``memory_frames``, default ``model.video.memory_frames``); ``after_frame(session)`` is called after every
    frame (memory measurements). Runs the network in eval mode under inference mode (transformers' session API).
    """
    from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

    video_head = getattr(seg, "video_head", None)
    if not callable(video_head):
        raise TypeError(f"propagate needs a model with a SAM 2 video mask head, got family "
                        f"{getattr(seg, 'family', type(seg).__name__)}")
    head: VideoHead = video_head()
    prompt = prompt or VideoPrompt()
    if sum(x is not None for x in (prompt.mask, prompt.box, prompt.embedding)) > 1:
        raise ValueError("a video prompt is one of a mask, a box or an embedding")
    net = head.net
    device = next(head.module.parameters()).device
    conditioning = prompt.conditioning_frames()
    start = conditioning[0]
    reach = memory_reach(net, memory_frames if memory_frames is not None else head.memory_frames)
    session = Sam2VideoInferenceSession(inference_device=device, inference_state_device=device,
                                        video_storage_device=device, dtype=head.dtype)
    obj = session.obj_id_to_idx(OBJECT_ID)
    read = frame_reader(frames)
    if read is None and (start > 0 or prompt.embedding is not None):
        why = (f"the prompt is on frame {start}: propagating back to frame 0" if start > 0
               else "an embedding prompt decodes its frames first, which")
        raise ValueError(f"{why} needs random access to the frames (a FrameReader, a tensor or a list), not a "
                         "one-pass iterator")

    def pixels_of(index: int, frame: torch.Tensor) -> torch.Tensor:
        if frame.ndim != 3 or frame.shape[0] != head.in_channels:
            raise ValueError(f"frame {index}: expected [{head.in_channels}, H, W] in [0, 1], got {tuple(frame.shape)}")
        with torch.no_grad():
            return head.pixels(frame.to(device, torch.float32))

    decoded: dict[int, torch.Tensor] = {}  # conditioning frames decoded from the embedding: low-res logits

    def condition(index: int, frame: torch.Tensor) -> None:
        """An embedding-prompted frame decoded without memory into the bank, as the training forward decodes it."""
        pixels = pixels_of(index, frame)
        with torch.inference_mode():
            vision = net.get_image_features(pixels, return_dict=True)
            cond = ClipConditioning(frames=conditioning, embedding=prompt.embedding.to(device).reshape(1, -1))
            out = frame_step(net, session, obj, index, list(vision.fpn_hidden_states),
                             vision.fpn_position_encoding[-1], False, cond)
        decoded[index] = out["pred_masks"][:1]

    def step(index: int, frame: torch.Tensor, reverse: bool) -> torch.Tensor:
        size = tuple(frame.shape[-2:])
        if index in decoded:
            pred_masks = decoded[index]
        else:
            pixels = pixels_of(index, frame)
            if index == start and prompt.embedding is None:
                _add_prompt(session, obj, index, prompt, size, head.image_size, device)
            pred_masks = net(inference_session=session, frame_idx=index, frame=pixels[0], reverse=reverse).pred_masks
            session.obj_with_new_inputs = []  # a prompt-less conditioning frame is not consumed by the model itself
            session.processed_frames.pop(index, None)  # its features stay in the session's one-frame cache
        readers = [(index + (-1 if reverse else 1), -1 if reverse else 1)]
        if start > 0 and not reverse:
            readers.append((start - 1, -1))
        _trim_bank(session, obj, readers, reach)
        if after_frame is not None:
            after_frame(session)
        with torch.no_grad():
            prob = torch.sigmoid(upsample_logits(pred_masks[:1].clone(), size, head.image_size))[0, 0]
        return prob.float().cpu()

    was_training = head.module.training
    head.module.eval()
    try:
        if prompt.embedding is not None:
            for index in conditioning:
                condition(index, read(index))
        seen = 0
        for index, frame in enumerate(frames):
            seen = index + 1
            if index >= start:
                yield index, step(index, frame, reverse=False)
        if seen <= conditioning[-1]:
            raise ValueError(f"the prompt is on frame {conditioning[-1]}, but the sequence has {seen} frames")
        for index in range(start - 1, -1, -1):
            yield index, step(index, read(index), reverse=True)
    finally:
        head.module.train(was_training)


def propagate_without_memory(seg: nn.Module, frames: Iterable[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
    """The memory ablation of ``propagate`` (semantic models): every frame segmented alone, as a one-frame video
    whose frame is decoded from SAM 2's "no memory" token, so nothing earlier reaches it. Comparing a clip-trained
    model with and without its memory shows how much of what it does comes from the memory. Yields what
    ``propagate`` yields, in frame order."""
    for index, frame in enumerate(frames):
        ((_, prob),) = propagate(seg, [frame])
        yield index, prob


def _add_prompt(session, obj: int, index: int, prompt: VideoPrompt, frame_size: tuple[int, int], image_size: int,
                device) -> None:
    """The prompt of ``index`` into the session, as Sam2VideoProcessor.add_inputs_to_inference_session puts it."""
    if prompt.mask is not None:
        mask = torch.as_tensor(prompt.mask, dtype=torch.float32).to(device)
        if tuple(mask.shape[-2:]) != tuple(frame_size):
            raise ValueError(f"frame {index}: the mask prompt is {tuple(mask.shape[-2:])}, the frame {frame_size}")
        session.add_mask_inputs(obj, index, prompt_mask_input(mask.view(1, 1, *mask.shape[-2:]), image_size))
    elif prompt.box is not None:
        box = torch.as_tensor(prompt.box, dtype=torch.float32, device=device).view(1, 4)
        coords, labels = box_points(box, frame_size, image_size)
        session.add_point_inputs(obj, index, {"point_coords": coords, "point_labels": labels})
    session.obj_with_new_inputs = [OBJECT_ID]


# --- building ---------------------------------------------------------------------------------------------------------
def check_memory_layout(config) -> None:
    """What transformers' Sam2VideoModel silently assumes of its config (a model built from model.config overrides
    that breaks it fails deep inside the first clip otherwise)."""
    hidden = config.vision_config.fpn_hidden_size
    problems = []
    if config.num_maskmem < 1:
        problems.append(f"num_maskmem={config.num_maskmem} (a video model needs memories)")
    width = config.memory_encoder_output_channels  # any width: fit_memory_width refits the cross-attention
    if hidden <= width or hidden % width:
        problems.append(f"vision_config.fpn_hidden_size={hidden} (object pointers are split into "
                        f"{width}-channel memory tokens: a multiple of memory_encoder_output_channels={width} above "
                        "it)")
    sizes = {"memory_attention_hidden_size": config.memory_attention_hidden_size,
             "memory_encoder_hidden_size": config.memory_encoder_hidden_size,
             "prompt_encoder_config.hidden_size": config.prompt_encoder_config.hidden_size,
             "mask_decoder_config.hidden_size": config.mask_decoder_config.hidden_size}
    problems += [f"{key}={value} (must equal vision_config.fpn_hidden_size={hidden})"
                 for key, value in sizes.items() if value != hidden]
    if problems:
        raise ConfigError(f"model.config does not describe a working SAM 2 video model: {'; '.join(problems)}")


def init_from_config(net: nn.Module) -> None:
    """What a Sam2VideoModel built from a config starts from, besides transformers' initialisation. Its
    _init_weights zeroes the memory fuser's layer scale whatever the config says, which leaves the fuser's
    convolutions without gradient: set the configured value. And the random object-score head scores ~0, so about
    half the frames would get the constant "no object" logits and no mask gradient: start out seeing the object."""
    with torch.no_grad():
        for block in net.memory_encoder.memory_fuser.layers:
            block.scale.fill_(net.config.memory_fuser_layer_scale_init_value)
        net.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(OBJECT_SCORE_PRIOR)


def fit_memory_width(net: nn.Module) -> list[str]:
    """Give the memory cross-attention the width of the memories it reads. transformers' memory-attention layer builds
    its key / value projections for MEMORY_CHANNELS-channel memories whatever the config says; SAM 2 builds them for
    ``memory_encoder_output_channels`` (its ``kv_in_dim``), equal in every published SAM 2 but not in a shrunk one (the
    Sa2VA test fixture: 16). Returns the names of the re-created (uninitialised) weights; none when widths agree."""
    width = net.config.memory_encoder_output_channels
    refit = []
    for i, layer in enumerate(net.memory_attention.layers):
        attention = layer.cross_attn_image
        if attention.k_proj.in_features == width:
            continue
        like = attention.k_proj.weight
        attention.kv_in_dim = width
        attention.k_proj = nn.Linear(width, attention.internal_dim, device=like.device, dtype=like.dtype)
        attention.v_proj = nn.Linear(width, attention.internal_dim, device=like.device, dtype=like.dtype)
        refit += [f"memory_attention.layers.{i}.cross_attn_image.{p}.{t}" for p in ("k_proj", "v_proj")
                  for t in ("weight", "bias")]
    return refit


def load_sam2_video(path, **kwargs) -> nn.Module:
    """A ``Sam2VideoModel`` checkpoint folder, loaded with transformers' ``from_pretrained`` (models.hf.load_pretrained);
    a checkpoint whose memories are not MEMORY_CHANNELS wide (see fit_memory_width) gets its memory cross-attention
    refitted and those weights read from the folder."""
    from pathlib import Path

    from safetensors import safe_open
    from transformers import Sam2VideoModel

    from medtune.models.hf import load_pretrained, read_config_json

    narrow = read_config_json(Path(path)).get("memory_encoder_output_channels", MEMORY_CHANNELS) != MEMORY_CHANNELS
    net = load_pretrained(Sam2VideoModel, path, ignore_mismatched_sizes=narrow, **kwargs)
    refit = set(fit_memory_width(net))
    if refit:
        params = dict(net.named_parameters())
        for file in sorted(Path(path).glob("*.safetensors")):
            with safe_open(str(file), "pt") as f, torch.no_grad():
                for key in refit.intersection(f.keys()):
                    params[key].copy_(f.get_tensor(key))
                    refit.discard(key)
        if refit:
            raise ConfigError(f"{path}: the memory cross-attention weights {sorted(refit)[:2]} are missing")
    return net


def build_sam2_video(cfg: Config) -> Sam2VideoSegModel:
    net = build_sam_network(cfg, Sam2VideoSegModel)
    check_memory_layout(net.config)
    if cfg.model.path is None:
        fit_memory_width(net)  # memories narrower than transformers' fixed MEMORY_CHANNELS, from model.config
        init_from_config(net)
    return Sam2VideoSegModel(net, cfg.data.channels, cfg.model.prompt, cfg.model.video)
