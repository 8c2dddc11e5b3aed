"""Family registry: ``build_model(cfg)`` = the family's base network + the fine-tuning mode (full or LoRA).

A family builder gets the whole ``Config`` and returns a ``SegModel`` around the *base* network (pretrained from
``model.path`` or randomly initialised from ``model.config``), already quantised / prepared for k-bit training /
gradient-checkpointed as asked. LoRA is attached here, after all of that, so no family can get the order wrong
(pitfall 7: ``prepare_model_for_kbit_training`` after the adapter freezes it).
"""
from __future__ import annotations

import importlib
import logging
import re
from typing import Callable

import torch

from medtune.config import Config
from medtune.errors import ConfigError
from medtune.models.base import SegModel

log = logging.getLogger(__name__)

# The built-in families, by "module:builder" so nothing is imported until a family is asked for (and no family
# module has to import this one to register itself). A third-party family is given the same way in the config:
# `model.family: "my_pkg.my_family:build"`, a function Config -> SegModel.
BUILDERS: dict[str, str] = {
    "unet": "medtune.models.unet:build_unet",
    "sam": "medtune.models.sam:build_sam",
    "sam2": "medtune.models.sam:build_sam2",
    "sam2_video": "medtune.models.video:build_sam2_video",
    "segvlm": "medtune.models.vlm.seg:build_segvlm",
    "vlm": "medtune.models.vlm.model:build_vlm",
}


def family_builder(family: str) -> Callable[[Config], SegModel]:
    target = BUILDERS.get(family, family)
    if ":" not in target:
        raise ConfigError(f"unknown model.family {family!r}; built in: {', '.join(sorted(BUILDERS))}, or a "
                          "third-party builder as 'package.module:function'")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"model.family {family!r}: cannot import {module_name!r} ({err})") from None
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise ConfigError(f"model.family {family!r}: {module_name!r} has no function {attr!r}")
    return builder


def freeze_image_encoder(seg: SegModel, mode: str) -> None:
    """``model.freeze_image_encoder``: the image encoder keeps its weights. Full fine-tuning then trains the rest
    (SAM: prompt encoder + mask decoder); LoRA adapters in the encoder would contradict the setting, so they are refused
    rather than silently frozen."""
    encoder = seg.image_encoder()
    if encoder is None:
        raise ConfigError(f"model.freeze_image_encoder: family {seg.family!r} has no separate image encoder (sam and "
                          "sam2 have); remove the setting")
    if mode == "lora":
        adapted = [n for n, p in encoder.named_parameters() if p.requires_grad]
        if adapted:
            raise ConfigError(f"model.freeze_image_encoder=true, but lora.target_modules puts adapters in the image "
                              f"encoder ({adapted[0]} ...); target the decoder, e.g. "
                              r"lora.target_modules='^mask_decoder\.transformer\..*_proj$' lora.modules_to_save=[]")
    for p in encoder.parameters():
        p.requires_grad_(False)


def build_run_model(cfg: Config) -> SegModel:
    """``build_model`` under the run's seed, in a forked RNG: what a run trains and what every later load of it
    (evaluation, predict, the app, RL's parent, export) builds before its checkpoint is applied. Weights a checkpoint
    does not hold (the random frozen base of a preset built from a config) are then the same in training and in
    every load, whatever the caller drew from the RNG before; the caller's stream is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        return build_model(cfg)


def build_model(cfg: Config) -> SegModel:
    family = cfg.model.family
    builder = family_builder(family)
    mode = cfg.finetune_mode()
    if cfg.model.quantize_4bit and mode != "lora":
        raise ConfigError(
            "model.quantize_4bit (QLoRA) trains LoRA adapters on a frozen 4-bit base and cannot train it fully; "
            "set model.finetune=lora (or leave it auto with model.path set), or model.quantize_4bit=false"
        )
    seg = builder(cfg)
    if not isinstance(seg, SegModel):
        raise ValueError(f"model.family {family!r}: its builder returned {type(seg).__name__}, not a SegModel")
    if mode == "lora":
        from medtune.models.lora import apply_lora

        seg.net = apply_lora(seg.net, cfg.lora, seg.default_lora_targets(), seg.default_modules_to_save(),
                             trainable_tokens=seg.default_trainable_tokens())
        if hasattr(seg, "after_lora"):  # a family's own check / set-up once the adapter is attached
            seg.after_lora()
    else:
        for p in seg.net.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
    if seg.channels_last:  # after LoRA, so the adapter's convolutions run in the same layout as the base's
        seg.to(memory_format=torch.channels_last)
    unused = seg.frozen_by_design()
    if unused:
        for name, p in seg.net.named_parameters():
            if re.search(unused, name):
                p.requires_grad_(False)
    if cfg.model.freeze_image_encoder:
        freeze_image_encoder(seg, mode)
    trainable, total = seg.param_counts()
    log.info("built %s (%s fine-tuning): %d / %d parameters trainable (%.2f%%)", family, mode, trainable, total,
             100.0 * trainable / max(total, 1))
    if trainable == 0:
        raise ConfigError(f"{family} built with 0 trainable parameters; nothing would train")
    # Training mode, as a freshly constructed nn.Module is: from_pretrained leaves transformers' networks in eval
    # mode, where their activation checkpointing (and dropout) silently does nothing. That is how bench/gpu_sam.py
    # once measured "checkpointing does not lower SAM's peak memory".
    return seg.train()
