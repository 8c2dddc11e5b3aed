"""``SegVLMNet`` (VLM + SAM + projection in one module, so PEFT wraps all of it) and ``SegVLMModel`` (its forward)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medtune.config import VLMCfg
from medtune.errors import UserError
from medtune.models.base import ModelOutput, SegModel, load_safetensors_folder
from medtune.models.sam import IMAGENET_MEAN, IMAGENET_STD, Sam2SegModel, SamSegModel
from medtune.models.vlm.logits import forward_logits_at, logit_positions, token_loss
from medtune.models.vlm.seg.codec import IGNORE_INDEX, TextCodec
from medtune.models.vlm.seg.images import PIL_BICUBIC, UINT8_MAX, ImagePrep
from medtune.models.vlm.seg.parts import (
    FORMAT_VERSION,
    PROJECTION_FILE,
    SAM_DIR,
    SAM_MEAN_KEY,
    SAM_STD_KEY,
    SEGVLM_JSON,
    VLM_DIR,
    Processing,
    embeddings_tied,
    language_model,
    linear_regex,
    module_name,
    projector,
    sam_kind,
    vision_tower,
    vision_unused_regex,
)

# SAM 2's mask decoder makes three masks plus the single-mask head (token 0); the modes that pick one of them.
MASK_OUTPUTS = ("best_iou", "single")


@dataclass
class DecodedMasks:
    """What the mask decoder gave for each of the K prompts of B images (``best_iou``: M = 3 candidates; ``single``:
    M = 1). ``low_res`` [B, K, h, w] is the candidate chosen (``index`` [B, K]), at the decoder's resolution."""

    candidates: torch.Tensor  # [B, K, M, h, w]
    iou_scores: torch.Tensor  # [B, K, M]
    index: torch.Tensor  # [B, K] long
    low_res: torch.Tensor  # [B, K, h, w]


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

    def __init__(self, net: SegVLMNet, in_channels: int, processing: Processing, codec: TextCodec, vcfg: VLMCfg,
                 sam_image_mean=IMAGENET_MEAN, sam_image_std=IMAGENET_STD):
        super().__init__(net, in_channels)
        self.processing = processing
        self.codec = codec
        self.vcfg = vcfg
        # set by the builder from task.lm_weight: whether any loss reaches the VLM's output head
        self.lm_loss_trained = True
        self.sam_kind = sam_kind(net.sam)
        self.mask_output = resolve_mask_output(vcfg.mask_output, self.sam_kind)
        image_processor = processing.image_processor
        vlm_config = net.vlm.config
        # InternVL's dynamic tiling when the image processor asks for it (Sa2VA: crop_to_patches, 1..12 tiles)
        tiling = vlm_config.model_type == "internvl" and bool(getattr(image_processor, "crop_to_patches", False))
        self.image_prep = ImagePrep(
            sam_size=_square(net.sam.config.prompt_encoder_config.image_size),
            tile_size=_square(vlm_config.vision_config.image_size), tiling=tiling,
            min_tiles=int(getattr(image_processor, "min_patches", None) or 1),
            max_tiles=int(getattr(image_processor, "max_patches", None) or 1),
            resample=int(getattr(image_processor, "resample", None) or PIL_BICUBIC))
        mean = getattr(image_processor, "image_mean", None) or IMAGENET_MEAN
        std = getattr(image_processor, "image_std", None) or IMAGENET_STD
        self.register_buffer("vlm_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("vlm_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.sam_image_mean, self.sam_image_std = [float(v) for v in sam_image_mean], [float(v) for v in sam_image_std]
        self.register_buffer("sam_mean", torch.tensor(self.sam_image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("sam_std", torch.tensor(self.sam_image_std).view(1, 3, 1, 1), persistent=False)

    # --- the contract ---------------------------------------------------------------------------------------------
    def text_codec(self) -> TextCodec:
        return self.codec

    @property
    def seg_token_id(self) -> int:
        return self.codec.seg_token_id

    def forward_logits(self, image: torch.Tensor, box: torch.Tensor | None = None) -> torch.Tensor:
        raise UserError("segvlm segments from text: call forward_batch with input_ids from seg.text_codec() "
                         "(task.kind segvlm), or generate_masks / teacher_forced_masks")

    def prepare(self, image) -> dict[str, torch.Tensor]:
        """The model inputs of one image at its own resolution (float [C, H, W] in [0, 1] or uint8): see images.py."""
        return self.image_prep(image)

    def num_tiles(self, height: int, width: int) -> int:
        """How many VLM tiles an image of this size becomes: the ``num_tiles`` of ``text_codec().encode``."""
        return self.image_prep.num_tiles(height, width)

    def forward_batch(self, batch: dict) -> ModelOutput:
        """Teacher-forced forward. ``batch``: the prepared images (``sam_image`` uint8 [B, 3, S, S], ``vlm_tiles``
        uint8 [N, 3, t, t] = every image's tiles in order, from ``prepare``) or raw ``image`` float [B, C, H, W] in
        [0, 1] (prepared here, one by one); ``input_ids`` [B, T], optional ``attention_mask`` [B, T] and ``labels``
        [B, T] (-100 = not supervised), from the text codec with each image's ``num_tiles``. The mask logits come at
        ``output_size`` (H, W): given, else that of ``mask``, else the (common) size of the images."""
        missing = [k for k in ("input_ids",) if k not in batch]
        if "sam_image" not in batch and "image" not in batch:
            missing.insert(0, "sam_image/vlm_tiles (or image)")
        if missing:
            raise UserError(f"segvlm batch lacks {missing}: it needs the image and the conversation tokens from "
                             "seg.text_codec().encode(question, answer, num_tiles) (task.kind segvlm)")
        inputs = batch if "sam_image" in batch else self._prepare_batch(batch["image"])
        size = batch.get("output_size")
        if size is None:
            size = batch["mask"].shape[-2:] if "mask" in batch else self._common_size(inputs["image_size"])
        return self._forward(inputs, batch["input_ids"], batch.get("attention_mask"), batch.get("labels"),
                             (int(size[0]), int(size[1])), batch)

    def _prepare_batch(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        if image.ndim != 4 or image.shape[1] != self.in_channels:
            raise UserError(f"segvlm expects images [B, {self.in_channels}, H, W], got {tuple(image.shape)}")
        items = [self.prepare(x) for x in image]
        return {"sam_image": torch.stack([i["sam_image"] for i in items]).to(image.device),
                "vlm_tiles": torch.cat([i["vlm_tiles"] for i in items]).to(image.device),
                "image_size": torch.stack([i["image_size"] for i in items])}

    @staticmethod
    def _common_size(image_size: torch.Tensor) -> tuple[int, int]:
        sizes = {tuple(int(v) for v in s) for s in image_size}
        if len(sizes) != 1:
            raise UserError(f"images of several sizes {sorted(sizes)} in one batch: give output_size (H, W)")
        return next(iter(sizes))

    def _forward(self, inputs: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 labels: torch.Tensor | None, output_size: tuple[int, int], batch: dict | None = None) -> ModelOutput:
        """The VLM's token logits are computed where ``batch[LOGITS_AT]`` says (``models.vlm.logits``); by default
        where the LM loss reads them, and nowhere without labels: the masks need only the hidden states."""
        sam_image, tiles = inputs["sam_image"], inputs["vlm_tiles"]
        b = sam_image.shape[0]
        if input_ids.ndim != 2 or input_ids.shape[0] != b:
            raise UserError(f"input_ids must be [B={b}, T], got {tuple(input_ids.shape)}")
        net = self.base_network
        device = sam_image.device
        input_ids = input_ids.to(device)
        attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device))
        self._check_image_tokens(input_ids, attention_mask, tiles.shape[0])
        vlm_inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": self._vlm_pixels(tiles)}
        labels = labels.to(device) if labels is not None else None
        positions = logit_positions(batch or {}, labels, device)
        out, logits = forward_logits_at(partial(net.vlm, output_hidden_states=True, use_cache=False,
                                                return_dict=True), net.vlm, vlm_inputs, positions)
        lm_loss = None
        if labels is not None:
            supervised = bool((labels != IGNORE_INDEX).any())
            # the mean over the supervised tokens (what the VLM's own loss gives); nothing supervised: a zero that is
            # still part of the graph, not 0/0
            lm_loss = token_loss(logits, labels, None, positions) if supervised else logits.sum() * 0.0
        # hidden_states[-1] is the final-norm output, the lm_head input: the [SEG] token's own last hidden state
        prompts, valid = self._seg_hidden(out.hidden_states[-1], input_ids, attention_mask)
        if prompts.shape[1] == 0:
            mask_logits = torch.zeros(b, 0, *output_size, device=device, dtype=torch.float32)
        else:
            projection = net.seg_projection
            weight_dtype = next(projection.parameters()).dtype
            features = self._sam_features(net.sam, self._sam_pixels(sam_image))
            low = self._decode_masks(net.sam, features, projection(prompts.to(weight_dtype))).low_res
            mask_logits = self.upsample(low, output_size)
            mask_logits = torch.where(valid[:, :, None, None], mask_logits, torch.zeros_like(mask_logits))
        return ModelOutput(mask_logits=mask_logits, lm_loss=lm_loss, token_logits=logits, mask_valid=valid,
                           logit_positions=positions)

    def _check_image_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_tiles: int) -> None:
        """One line instead of transformers' feature-count error deep inside: the prompts must hold one tile's
        image tokens per tile given (``text_codec().encode(..., num_tiles=model.num_tiles(H, W))``)."""
        image_id = self.base_network.vlm.config.image_token_id
        per_tile = sum(1 for i in self.codec.placeholder_ids if i == image_id)
        found = int(((input_ids == image_id) & attention_mask.bool()).sum())
        if found != per_tile * n_tiles:
            raise UserError(f"the batch's prompts hold {found} image tokens but its images make {n_tiles} tile(s) of "
                             f"{per_tile}: encode each prompt with num_tiles=model.num_tiles(H, W) of its image")

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

    # --- image preprocessing (uint8 from images.ImagePrep -> the encoders' inputs) ----------------------------------
    def _vlm_pixels(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 tiles [N, 3, t, t] -> normalised float (ToTensor + Normalize, in float32)."""
        x = (tiles.float() / UINT8_MAX - self.vlm_mean) / self.vlm_std
        return x.to(_floating_dtype(vision_tower(self.base_network.vlm)))

    def _sam_pixels(self, sam_image: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] -> /255, (x - mean) / std in float32 with the folder's SAM mean/std."""
        x = (sam_image.float() / UINT8_MAX - self.sam_mean) / self.sam_std
        return x.to(_floating_dtype(self.base_network.sam.vision_encoder))

    # --- generation and evaluation -----------------------------------------------------------------------------------
    def _one_image(self, image, caller: str) -> dict[str, torch.Tensor]:
        if image.ndim != 4 or image.shape[0] != 1:
            raise UserError(f"{caller} takes one image [1, C, H, W] (its original resolution), got {tuple(image.shape)}")
        inputs = self._prepare_batch(image)
        inputs["num_tiles"] = int(inputs["vlm_tiles"].shape[0])
        return inputs

    def generate_masks(self, image: torch.Tensor, question: str, max_new_tokens: int = 32
                       ) -> tuple[str, torch.Tensor]:
        """Greedy answer to ``question`` about ``image`` [1, C, H, W], and one mask per [SEG] in it: (answer text,
        mask logits [K, H, W]); K = number of [SEG] in the answer, possibly 0. One turn of ``generate_turns``."""
        answers, masks = self.generate_turns(image, [question], max_new_tokens)
        return answers[0], masks[0]

    def generate_turns(self, image: torch.Tensor, questions: list[str], max_new_tokens: int = 32
                       ) -> tuple[list[str], list[torch.Tensor]]:
        """A conversation about ``image`` [1, C, H, W], one greedy answer per question, each turn continuing the
        previous turns' generated tokens (the image in the first turn only, as in training). Returns the answers
        and, per answer, the mask logits [K_k, H, W] of its [SEG] tokens (K_k possibly 0).

        ``generate()`` runs under no_grad; the masks come from ONE teacher-forced forward over the whole generated
        conversation (the training forward), so they are differentiable w.r.t. the mask path for the caller who
        wants that.
        """
        inputs = self._one_image(image, "generate_turns")
        codec = self.codec
        stops = set(codec.stop_token_ids)
        pixels = self._vlm_pixels(inputs["vlm_tiles"])
        sequence: list[int] = []
        answers: list[str] = []
        seg_counts: list[int] = []
        for k in range(len(questions)):
            sequence += codec.prompt_ids(questions[:k + 1], answers, inputs["num_tiles"])
            prompt = torch.tensor([sequence], device=image.device)
            with torch.no_grad():
                generated = self.base_network.vlm.generate(
                    input_ids=prompt, attention_mask=torch.ones_like(prompt), pixel_values=pixels,
                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=codec.stop_token_ids,
                    pad_token_id=codec.pad_token_id,
                )
            new = generated[0, prompt.shape[1]:].tolist()
            end = next((i + 1 for i, t in enumerate(new) if t in stops), len(new))
            new = new[:end]
            answers.append(codec.answer_text(new))
            seg_counts.append(sum(t == codec.seg_token_id for t in new))
            # an answer cut by max_new_tokens is closed as training closes every answer, before the next turn
            sequence += new if new and new[-1] in stops else new + [codec.end_of_turn_id]
        out = self._forward(inputs, torch.tensor([sequence], device=image.device), None, None,
                            tuple(image.shape[-2:]))
        return answers, list(torch.split(out.mask_logits[0], seg_counts))

    def teacher_forced_masks(self, image: torch.Tensor, question: str | list[str], answer: str | list[str]
                             ) -> torch.Tensor:
        """Mask logits [K, H, W] for given answers (K = their [SEG] count): the training forward on one image
        [1, C, H, W] at its original resolution. Lists: one turn per question, as ``codec.encode``."""
        inputs = self._one_image(image, "teacher_forced_masks")
        enc = self.codec.encode(question, answer, inputs["num_tiles"])
        return self._forward(inputs, enc["input_ids"][None], enc["attention_mask"][None], None,
                             tuple(image.shape[-2:])).mask_logits[0]

    # --- family hooks -------------------------------------------------------------------------------------------
    def _names(self) -> dict[str, str]:
        net = self.base_network
        return {"language": module_name(net, language_model(net.vlm)),
                "vision": module_name(net, vision_tower(net.vlm)),
                "projector": module_name(net, projector(net.vlm))}

    def _sam_encoder_targets(self) -> str:
        own = (Sam2SegModel if self.sam_kind == "sam2" else SamSegModel).DEFAULT_TARGETS
        return r"sam\." + own.removeprefix("^").removesuffix("$")

    def default_lora_targets(self) -> str:
        """Every linear of the language model's decoder layers, by anchored full names (``vlm.model.language_model.
        layers.\\d+.self_attn.q_proj`` ...): the vision tower's same-named layers are never hit. Plus the vision
        tower's linears with ``model.vlm.vision_lora`` and SAM's image-encoder attention with ``sam_encoder_lora``."""
        net, names = self.base_network, self._names()
        parts = [linear_regex(net, names["language"])]
        if self.vcfg.vision_lora:
            parts.append(linear_regex(net, names["vision"]))
        if self.vcfg.sam_encoder_lora:
            parts.append(self._sam_encoder_targets())
        return "^(?:" + "|".join(p for p in parts if p) + ")$"

    def default_modules_to_save(self) -> list[str] | None:
        extra = [self._names()["projector"].rsplit(".", 1)[-1]] if self.vcfg.train_projector else []
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
        """Adapters only where asked: the language model, the vision tower (``vision_lora``), SAM's image encoder
        (``sam_encoder_lora``); the projector trains only with ``train_projector``. A user ``lora.target_modules``
        that reaches elsewhere is refused here rather than found out after training."""
        from peft.tuners.lora import LoraLayer

        base, names = self.base_network, self._names()
        allowed = [names["language"]]
        if self.vcfg.vision_lora:
            allowed.append(names["vision"])
        if self.vcfg.sam_encoder_lora:
            allowed.append("sam.vision_encoder")
        stray = [n for n, m in base.named_modules()
                 if isinstance(m, LoraLayer) and not any(n.startswith(a + ".") for a in allowed)]
        if stray:
            raise UserError(
                f"LoRA landed outside the language model: {stray[:6]}{' ...' if len(stray) > 6 else ''}. Set "
                "model.vlm.vision_lora=true for the vision tower, model.vlm.sam_encoder_lora=true for SAM's image "
                "encoder, model.vlm.train_projector=true to train the projector (fully), or narrow lora.target_modules"
            )
        projector_trains = any(p.requires_grad for n, p in base.named_parameters()
                               if n.startswith(names["projector"] + "."))
        if projector_trains != self.vcfg.train_projector:
            raise RuntimeError(f"the VLM projector is {'trainable' if projector_trains else 'frozen'} but "
                               f"model.vlm.train_projector={self.vcfg.train_projector}")

    def frozen_by_design(self) -> str | None:
        # SAM parts that cannot reach the chosen mask logits prompted by an embedding: the IoU / object-score heads
        # (the best-IoU choice is an argmax: no gradient reaches the IoU head, as in Sa2VA), the hypernetworks of the
        # mask tokens never output (single: 1..3, the multimask ones; best_iou: 0, the single-mask head), the
        # mask-prompt encoder, the point-label embeddings (SAM 2's padding points are label -1: not_a_point_embed,
        # which SAM without points never uses). And the VLM vision layers after the feature layer (LLaVA reads the
        # second-to-last CLIP layer).
        hyper = r"output_hypernetworks_mlps\.[1-9]" if self.mask_output == "single" else r"output_hypernetworks_mlps\.0\."
        unused = [r"iou_prediction_head\.", r"pred_obj_score_head\.", hyper,
                  r"sam\.prompt_encoder\.mask_embed\.", r"sam\.prompt_encoder\.point_embed\."]
        if self.sam_kind == "sam":
            unused.append(r"sam\.prompt_encoder\.not_a_point_embed\.")
        out = self.base_network.vlm.get_output_embeddings()
        if not self.lm_loss_trained and out is not None and not embeddings_tied(self.base_network.vlm):
            # without the LM loss (task.lm_weight=0) nothing reaches an untied output head
            unused.append(re.escape(module_name(self.base_network, out)) + r"\.")
        vision = vision_unused_regex(self.base_network.vlm, self._names()["vision"])
        if vision:
            unused.append(vision)
        return "|".join(unused)

    def selected_by_prediction(self) -> str | None:
        """Regex of parameters that reach the loss only for the samples whose prediction selects them: with
        ``best_iou`` the hypernetworks of the three candidate masks, of which each prompt keeps one. The preflight
        does not call them dead when a few steps happen to pick the same candidate."""
        return r"output_hypernetworks_mlps\.[1-9]" if self.mask_output == "best_iou" else None

    def save_base(self, out_dir: str | Path) -> Path:
        """One folder ``model.path`` loads back: ``vlm/`` (merged VLM + processor/tokenizer with [SEG] and the chat
        template), ``sam/``, ``projection.safetensors``, ``segvlm.json``. Merges a copy; the live model keeps its
        adapters."""
        from safetensors.torch import save_file

        from medtune.models.lora import merged_copy

        if getattr(self.base_network.vlm, "is_loaded_in_4bit", False):
            raise UserError("cannot save a 4-bit (QLoRA) VLM as a model folder; build the model unquantised "
                             "(model.quantize_4bit=false), load the adapter with load_trainable, then export")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        net = merged_copy(self.net)
        net.vlm.save_pretrained(str(out_dir / VLM_DIR))
        self.processing.save(out_dir / VLM_DIR)
        net.sam.save_pretrained(str(out_dir / SAM_DIR))
        save_file({k: v.detach().contiguous().cpu() for k, v in net.seg_projection.state_dict().items()},
                  str(out_dir / PROJECTION_FILE))
        meta = {"format": FORMAT_VERSION, "seg_token": self.codec.seg_token, "seg_token_id": self.seg_token_id,
                "vlm_model_type": net.vlm.config.model_type, "sam_model_type": net.sam.config.model_type,
                "hidden_size": net.seg_projection[0].in_features, "prompt_size": net.seg_projection[-1].out_features,
                SAM_MEAN_KEY: self.sam_image_mean, SAM_STD_KEY: self.sam_image_std}
        (out_dir / SEGVLM_JSON).write_text(json.dumps(meta, indent=2))
        return out_dir

    def load_base_weights(self, folder: str | Path) -> None:
        from safetensors.torch import load_file
        from transformers import AutoModelForImageTextToText

        folder, net = Path(folder), self.base_network
        # transformers writes VLM weights under the checkpoint's original key names; its own loader maps them back
        fresh = AutoModelForImageTextToText.from_pretrained(str(folder / VLM_DIR), dtype=_floating_dtype(net.vlm))
        missing, unexpected = net.vlm.load_state_dict(fresh.state_dict(), strict=False)
        if missing or unexpected:
            raise UserError(f"VLM weights in {folder / VLM_DIR} do not fit this model: missing {missing[:6]}, "
                             f"unexpected {unexpected[:6]}")
        load_safetensors_folder(net.sam, folder / SAM_DIR)
        net.seg_projection.load_state_dict(load_file(str(folder / PROJECTION_FILE)))


def _floating_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
