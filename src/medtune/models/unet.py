"""Family ``unet``: MONAI's residual 2-D U-Net, the from-scratch baseline.

Base-model folder (``save_base`` output, accepted as ``model.path``): ``model.safetensors`` + ``model_config.json``
holding the ``monai.networks.nets.UNet`` keyword arguments. A full fine-tuning checkpoint's ``model/`` folder has
the same format, so it can seed another run directly.

LoRA defaults: every ``Conv2d`` outside the final up block (listed by exact name in one anchored regex, because
MONAI's nesting makes the names depend on depth and ``num_res_units``); the final up block ``model.2`` (transposed
conv to the output channel + its residual unit) trains fully via ``modules_to_save``. The inner up-sampling
``ConvTranspose2d`` layers stay frozen: peft 0.21 LoRA cannot wrap ``ConvTranspose2d``.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medtune.config import Config
from medtune.errors import ConfigError, MissingFileError, UserError
from medtune.models.base import SegModel, load_safetensors_folder
from medtune.models.hf import resolve_model_path

log = logging.getLogger(__name__)

CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "model.safetensors"
DEFAULT_ARCH: dict[str, Any] = {
    "channels": [16, 32, 64, 128],
    "strides": [2, 2, 2],
    "num_res_units": 2,
    "norm": "INSTANCE",
    "dropout": 0.0,
}
# The top-level Sequential of monai's UNet is (down, skip-connection, up): index 2 is always the output block.
OUTPUT_BLOCK = "model.2"


def _make_net(kwargs: dict[str, Any]) -> nn.Module:
    from monai.networks.nets import UNet

    kw = dict(kwargs)
    kw["channels"] = tuple(kw["channels"])
    kw["strides"] = tuple(kw["strides"])
    return UNet(**kw)


def arch_kwargs(cfg: Config) -> dict[str, Any]:
    unknown = set(cfg.model.config) - set(DEFAULT_ARCH)
    if unknown:
        raise ConfigError(f"unknown model.config key(s) {sorted(unknown)} for family unet; "
                          f"valid: {sorted(DEFAULT_ARCH)}")
    arch = {**DEFAULT_ARCH, **cfg.model.config}
    if len(arch["strides"]) != len(arch["channels"]) - 1:
        raise ConfigError(f"unet: model.config.strides needs len(channels)-1 = {len(arch['channels']) - 1} entries, "
                          f"got {arch['strides']}")
    return {"spatial_dims": 2, "in_channels": cfg.data.channels, "out_channels": 1,
            "channels": list(arch["channels"]), "strides": list(arch["strides"]),
            "num_res_units": int(arch["num_res_units"]), "norm": arch["norm"], "dropout": float(arch["dropout"])}


class UNetSegModel(SegModel):
    family = "unet"
    channels_last = True

    def __init__(self, net: nn.Module, arch: dict[str, Any]):
        super().__init__(net, arch["in_channels"])
        self.arch = dict(arch)
        self.multiple = 1
        for s in arch["strides"]:
            self.multiple *= int(s)

    def forward_logits(self, image: torch.Tensor, box: torch.Tensor | None = None) -> torch.Tensor:
        # `box` is accepted for the common contract; a U-Net has no prompt input.
        if image.ndim != 4 or image.shape[1] != self.in_channels:
            raise ValueError(f"unet expects images [B, {self.in_channels}, H, W], got {tuple(image.shape)}")
        h, w = image.shape[-2:]
        m = self.multiple
        # At least 2*m per side: instance norm cannot normalise a 1x1 bottleneck.
        ph, pw = max(-(-h // m) * m, 2 * m) - h, max(-(-w // m) * m, 2 * m) - w
        if ph or pw:
            # Reflection keeps border statistics natural; it needs the pad to be smaller than the side.
            mode = "reflect" if ph < h and pw < w else "replicate"
            image = F.pad(image, (0, pw, 0, ph), mode=mode)
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.net(image)[..., :h, :w]

    def default_lora_targets(self) -> str:
        names = [n for n, m in self.base_network.named_modules()
                 if type(m) is nn.Conv2d and not (n == OUTPUT_BLOCK or n.startswith(OUTPUT_BLOCK + "."))]
        return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"

    def default_modules_to_save(self) -> list[str] | None:
        return [OUTPUT_BLOCK]

    def save_base(self, out_dir: str | Path) -> Path:
        """Writes the merged network; the live model is untouched (the merge happens on a copy)."""
        from safetensors.torch import save_model

        from medtune.models.lora import merged_copy

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        net = merged_copy(self.net)
        save_model(net, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
        (out_dir / CONFIG_FILE).write_text(json.dumps(self.arch, indent=2))
        return out_dir

    def load_base_weights(self, folder: str | Path) -> None:
        saved = read_arch(Path(folder))
        if saved != self.arch:
            raise UserError(f"{folder} holds a U-Net with {saved}, this model is {self.arch}")
        load_safetensors_folder(self.base_network, folder)


def read_arch(folder: Path) -> dict[str, Any]:
    config = folder / CONFIG_FILE
    if not config.is_file():
        hint = (" (it has a config.json: a transformers checkpoint; set model.family to its family, e.g. sam)"
                if (folder / "config.json").is_file() else "")
        raise MissingFileError(f"{folder} is not a unet model folder: no {CONFIG_FILE}{hint}. "
                               "Write one with medtune.models.unet.UNetSegModel.save_base")
    return json.loads(config.read_text())


def build_unet(cfg: Config) -> UNetSegModel:
    if cfg.model.quantize_4bit:
        raise ConfigError("model.quantize_4bit (QLoRA) is for the transformers families (sam, sam2), not unet")
    if cfg.model.gradient_checkpointing:
        log.warning("model.gradient_checkpointing is ignored for unet (a small convolutional net)")
    path = resolve_model_path(cfg)
    if path is None:
        arch = arch_kwargs(cfg)
        return UNetSegModel(_make_net(arch), arch)
    arch = read_arch(path)
    # model.config may still be set when a run is seeded from a parent trained from scratch (rl.init_from); it is
    # harmless as long as it describes the saved architecture.
    conflicts = {k: (v, arch.get(k)) for k, v in cfg.model.config.items()
                 if k not in arch or (list(v) if isinstance(v, (list, tuple)) else v) != arch[k]}
    if conflicts:
        raise ConfigError(f"model.config {conflicts} (given, saved) contradicts the architecture saved in "
                          f"{path / CONFIG_FILE}; with model.path the folder decides. Remove model.config")
    if arch["in_channels"] != cfg.data.channels:
        raise ConfigError(f"{path} was saved for {arch['in_channels']}-channel images but data.channels="
                          f"{cfg.data.channels}; set data.channels={arch['in_channels']}")
    seg = UNetSegModel(_make_net(arch), arch)
    load_safetensors_folder(seg.net, path)
    return seg
