"""Families ``sam`` (transformers ``SamModel``) and ``sam2`` (``Sam2Model``, single-image mode).

The image is resized straight to the model's square input (MedSAM style, no letterbox padding; SAM 2's own
processor does the same) and normalised with ImageNet mean/std, all in torch so the forward stays differentiable.
``model.prompt=box`` feeds the box scaled to that square; ``none`` (semantic) feeds no prompt: SAM then decodes
from its output tokens alone with the no-mask dense embedding, SAM 2 pads an empty "not-a-point" prompt itself.
The single-mask output (``multimask_output=False``) is upsampled to the input size.

LoRA defaults: the vision encoder's attention ``qkv`` and output ``proj`` linears (anchored, so the mask decoder's
attention layers are never hit), plus the whole mask decoder trained fully via ``modules_to_save``.

``model.freeze_image_encoder`` keeps the vision encoder frozen (decoder-only fine-tuning); ``train.feature_cache``
then feeds the network cached encoder outputs (``image_embeddings``) instead of ``pixel_values``
(models/feature_cache.py). SAM caches the image embedding; SAM 2 the vision encoder's FPN levels, before the mask
decoder's ``conv_s0``/``conv_s1`` and ``no_memory_embedding``, which train with the decoder.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medtune.config import Config, deep_merge
from medtune.errors import ConfigError
from medtune.models.base import SegModel, load_safetensors_folder
from medtune.models.hf import load_kwargs, load_pretrained, prepare_for_training, read_config_json, resolve_model_path

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



def tiny_sam_config_dict() -> dict[str, Any]:
    return {
        "vision_config": {"hidden_size": 32, "output_channels": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                          "image_size": 64, "patch_size": 8, "mlp_dim": 64, "window_size": 4,
                          "global_attn_indexes": [1], "num_pos_feats": 16,
                          "initializer_range": 0.02},  # transformers' 1e-10 default: see _config_from_overrides
        "prompt_encoder_config": {"hidden_size": 32, "image_size": 64, "patch_size": 8, "mask_input_channels": 4},
        "mask_decoder_config": {"hidden_size": 32, "mlp_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                "iou_head_hidden_dim": 32},
    }


def tiny_sam2_config_dict() -> dict[str, Any]:
    return {
        "vision_config": {
            "backbone_config": {
                "model_type": "sam2_hiera_det_model", "hidden_size": 16, "num_attention_heads": 1,
                "image_size": [64, 64], "patch_kernel_size": [7, 7], "patch_stride": [4, 4], "patch_padding": [3, 3],
                "query_stride": [2, 2], "window_positional_embedding_background_size": [2, 2],
                "num_query_pool_stages": 3, "blocks_per_stage": [1, 1, 2, 1], "embed_dim_per_stage": [16, 32, 64, 128],
                "num_attention_heads_per_stage": [1, 1, 2, 2], "window_size_per_stage": [4, 4, 4, 2],
                # A global block must not open a stage: Hiera's q-pooling divides by the window size.
                "global_attention_blocks": [3],
            },
            "backbone_channel_list": [128, 64, 32, 16],
            "backbone_feature_sizes": [[16, 16], [8, 8], [4, 4]],
            "fpn_hidden_size": 32,
        },
        "prompt_encoder_config": {"hidden_size": 32, "image_size": 64, "patch_size": 16, "mask_input_channels": 4},
        "mask_decoder_config": {"hidden_size": 32, "mlp_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                "iou_head_hidden_dim": 32},
    }


def tiny_sam_config(**overrides: Any):
    """A ~77k-parameter SamConfig (64x64 input, 8x8 patches) for tests and the demo."""
    from transformers import SamConfig

    return SamConfig(**deep_merge(tiny_sam_config_dict(), overrides))


def tiny_sam2_config(**overrides: Any):
    """A ~350k-parameter Sam2Config (64x64 input) for tests and the demo."""
    from transformers import Sam2Config

    return Sam2Config(**deep_merge(tiny_sam2_config_dict(), overrides))


class SamSegModel(SegModel):
    family = "sam"
    model_type = "sam"
    supports_feature_cache = True
    takes_mask_prompt = False
    DEFAULT_TARGETS = r"^vision_encoder\.layers\.\d+\.attn\.(?:qkv|proj)$"
    DEFAULT_MODULES_TO_SAVE = ["mask_decoder"]

    def __init__(self, net: nn.Module, in_channels: int, prompt: str):
        super().__init__(net, in_channels)
        self.prompt = prompt
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def transformers_classes():
        """(network class, config class) of the family in transformers."""
        from transformers import SamConfig, SamModel

        return SamModel, SamConfig

    @staticmethod
    def tiny_config_dict() -> dict[str, Any]:
        return tiny_sam_config_dict()

    @staticmethod
    def load_network(loader, path: Path, **kwargs) -> nn.Module:
        """``model.path`` -> the transformers network (``loader``: the family's class, or AutoModel for remote code)."""
        return load_pretrained(loader, path, **kwargs)

    @property
    def image_size(self) -> int:
        size = self.base_network.config.prompt_encoder_config.image_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def _input_dtype(self) -> torch.dtype:
        patch = self.base_network.get_input_embeddings()
        weight = next((p for p in patch.parameters() if p.is_floating_point()), None)
        return weight.dtype if weight is not None else torch.float32

    def _encoder_input(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        size = self.image_size
        x = image.expand(-1, 3, -1, -1) if image.shape[1] == 1 else image
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=(h > size or w > size))
        return ((x - self.pixel_mean) / self.pixel_std).to(self._input_dtype())

    def forward_logits(self, image: torch.Tensor, box: torch.Tensor | None = None) -> torch.Tensor:
        if image.ndim != 4 or image.shape[1] != self.in_channels:
            raise ValueError(f"{self.family} expects images [B, {self.in_channels}, H, W], got {tuple(image.shape)}")
        b, c, h, w = image.shape
        size = self.image_size
        kwargs: dict[str, Any] = {"multimask_output": False}
        if self.feature_cache is not None and not image.requires_grad:  # a gradient w.r.t. the image needs the encoder
            kwargs["image_embeddings"] = self._decoder_embeddings(self.feature_cache.features(image,
                                                                                             self.encoder_features))
        else:
            kwargs["pixel_values"] = self._encoder_input(image)
        if self.prompt == "box":
            if box is None:
                raise ValueError(f"model.prompt=box: {self.family} needs a box [B, 4] (x1, y1, x2, y2 in input pixels) "
                                 "for every image; pass batch['box'], or set model.prompt=none for semantic mode")
            if box.shape != (b, 4):
                raise ValueError(f"box must be [B, 4] = [{b}, 4], got {tuple(box.shape)}")
            scale = torch.tensor([size / w, size / h, size / w, size / h], device=box.device, dtype=torch.float32)
            kwargs["input_boxes"] = (box.float() * scale)[:, None, :].to(image.device)
        out = self.net(**kwargs)
        logits = out.pred_masks[:, 0].float()  # [B, 1 prompt, 1 mask, h, w] -> [B, 1, h, w]
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)

    # --- frozen image encoder and its feature cache -------------------------------------------------------------
    def image_encoder(self) -> nn.Module:
        return self.base_network.vision_encoder

    def encoder_description(self) -> dict:
        vision = self.base_network.config.vision_config
        return {"family": self.family, "in_channels": self.in_channels, "image_size": self.image_size,
                "input_dtype": str(self._input_dtype()), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                "resize": "bilinear, antialiased when shrinking", "vision_config": vision.to_dict(),
                "attention": getattr(vision, "_attn_implementation", None),
                "quantized": bool(getattr(self.base_network, "is_loaded_in_4bit", False))}

    def encoder_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The image encoder's output for ``image`` [B, C, H, W] in [0, 1]: what the feature cache stores. SAM: the
        image embedding [B, 256, 64, 64] at ViT-B scale."""
        return [self.image_encoder()(self._encoder_input(image)).last_hidden_state]

    def _decoder_embeddings(self, features: list[torch.Tensor]):
        """``image_embeddings`` for the network's forward from ``encoder_features`` (what its pixel_values path
        computes from the encoder output)."""
        return features[0]

    def default_lora_targets(self) -> str:
        return self.DEFAULT_TARGETS

    def frozen_by_design(self) -> str | None:
        # With one mask output and box-or-no prompts, these parts never reach the mask logits: the IoU / object-score
        # heads only score masks, hypernetworks 1..3 make the multimask outputs that are discarded, the mask-prompt
        # encoder and point-label embeddings encode prompts that are never given. Training them would only make
        # the preflight (rightly) report them dead.
        unused = [r"iou_prediction_head\.", r"pred_obj_score_head\.", r"output_hypernetworks_mlps\.[1-9]",
                  r"prompt_encoder\.mask_embed\.", r"prompt_encoder\.not_a_point_embed",
                  r"prompt_encoder\.point_embed\.[01]\."]
        if self.prompt == "none":
            unused.append(r"prompt_encoder\.point_embed\.")
        return "|".join(unused)

    def default_modules_to_save(self) -> list[str] | None:
        return list(self.DEFAULT_MODULES_TO_SAVE)

    def save_base(self, out_dir: str | Path) -> Path:
        """``save_pretrained`` of the merged network; the merge runs on a copy, the live model keeps its adapters."""
        from medtune.models.lora import merged_copy

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        merged_copy(self.net).save_pretrained(str(out_dir), safe_serialization=True)
        return out_dir

    def load_base_weights(self, folder: str | Path) -> None:
        load_safetensors_folder(self.base_network, folder)


class Sam2SegModel(SamSegModel):
    family = "sam2"
    model_type = "sam2"
    DEFAULT_TARGETS = r"^vision_encoder\.backbone\.blocks\.\d+\.attn\.(?:qkv|proj)$"

    @staticmethod
    def transformers_classes():
        from transformers import Sam2Config, Sam2Model

        return Sam2Model, Sam2Config

    @staticmethod
    def tiny_config_dict() -> dict[str, Any]:
        return tiny_sam2_config_dict()

    def encoder_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The vision encoder's FPN levels [B, C, h, w], high to low resolution. Not ``get_image_embeddings``: that
        also runs the mask decoder's conv_s0/conv_s1 and adds no_memory_embedding, which train with the decoder."""
        out = self.image_encoder()(self._encoder_input(image), return_dict=True)
        return list(out.fpn_hidden_states)

    def _decoder_embeddings(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        # Sam2Model.forward's pixel_values path from the vision encoder's output on (transformers 5.x), op for op
        net = self.base_network
        maps = list(features)
        maps[0] = net.mask_decoder.conv_s0(maps[0])
        maps[1] = net.mask_decoder.conv_s1(maps[1])
        maps = [m.flatten(2).permute(2, 0, 1) for m in maps]
        maps[-1] = maps[-1] + net.no_memory_embedding
        b = features[-1].shape[0]
        return [m.permute(1, 2, 0).view(b, -1, *size) for m, size in zip(maps, net.backbone_feature_sizes)]


def _config_from_overrides(cls: type[SamSegModel], overrides: dict[str, Any]):
    """``model.config`` -> the family's transformers config object; ``preset: tiny`` starts from the tiny test config."""
    overrides = dict(overrides)
    preset = overrides.pop("preset", None)
    if preset not in (None, "tiny"):
        raise ConfigError(f"model.config.preset {preset!r} unknown for {cls.family}; valid: tiny (or omit it for the "
                          "transformers default: SAM ViT-B / SAM 2 Hiera-B+ sized)")
    base = cls.tiny_config_dict() if preset == "tiny" else {}
    if cls.family == "sam":
        # transformers' SamVisionConfig defaults to initializer_range=1e-10 (harmless under pretrained weights); a
        # model built from a config would start with a ~zero vision encoder and vanishing gradients.
        base = deep_merge({"vision_config": {"initializer_range": 0.02}}, base)
    return cls.transformers_classes()[1](**deep_merge(base, overrides))


def build_sam_network(cfg: Config, cls: type[SamSegModel]) -> nn.Module:
    """The transformers network of a SAM-like family (``cls``): loaded from ``model.path`` or built from
    ``model.config``, prepared for training; the caller wraps it in ``cls``."""
    from transformers import AutoModel

    model_cls, _ = cls.transformers_classes()
    if cfg.model.prompt == "mask" and not cls.takes_mask_prompt:
        raise ConfigError(f"model.prompt=mask prompts a video model's memory (family sam2_video); {cls.family} takes "
                          "none or box")
    path = resolve_model_path(cfg)
    if path is None:
        if cfg.model.quantize_4bit:
            raise ConfigError("model.quantize_4bit quantises a pretrained model; set model.path to a local checkpoint")
        net = model_cls(_config_from_overrides(cls, cfg.model.config))
    else:
        meta = read_config_json(path)
        if cfg.model.config:
            # Not an error: a run seeded from a parent trained from scratch (rl.init_from) carries its model.config.
            log.warning("model.config is ignored with model.path: the architecture comes from %s/config.json", path)
        if not meta.get("auto_map") and meta.get("model_type") != cls.model_type:
            raise ConfigError(f"{path} holds a {meta.get('model_type')!r} model, not {cls.model_type!r}; set "
                              f"model.family to match the checkpoint")
        keep = cfg.lora.modules_to_save if cfg.lora.modules_to_save is not None else cls.DEFAULT_MODULES_TO_SAVE
        loader = AutoModel if cfg.model.trust_remote_code else model_cls
        net = cls.load_network(loader, path, **load_kwargs(cfg, keep))
    if cls.model_type != "sam":
        # SAM 2 swaps in another mask token in eval mode when the first one looks unstable; training and
        # evaluation must run the same function, so always take the single-mask token.
        net.mask_decoder.dynamic_multimask_via_stability = False
    # Non-reentrant checkpointing back-propagates into LoRA even though the patch embedding's output does not
    # require grad (pitfall 3), so input grads are not needed here.
    return prepare_for_training(net, cfg)


def _build(cfg: Config, cls: type[SamSegModel]) -> SamSegModel:
    return cls(build_sam_network(cfg, cls), cfg.data.channels, cfg.model.prompt)


def build_sam(cfg: Config) -> SamSegModel:
    return _build(cfg, SamSegModel)


def build_sam2(cfg: Config) -> Sam2SegModel:
    return _build(cfg, Sam2SegModel)
