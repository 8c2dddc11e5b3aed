"""Family registry: ``build_model(cfg)`` = the family's base network + the fine-tuning mode (full or LoRA).

A family builder gets the whole ``Config`` and returns a ``SegModel`` around the *base* network (pretrained from
``model.path`` or randomly initialised from ``model.config``), already quantised / prepared for k-bit training /
gradient-checkpointed as asked. LoRA is attached here, after all of that, so no family can get the order wrong
(pitfall 7: ``prepare_model_for_kbit_training`` after the adapter freezes it).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Callable

from medtune.config import Config
from medtune.models.base import SegModel

log = logging.getLogger(__name__)

FAMILIES: dict[str, Callable[[Config], SegModel]] = {}


def register_family(name: str) -> Callable[[Callable[[Config], SegModel]], Callable[[Config], SegModel]]:
    def deco(fn: Callable[[Config], SegModel]) -> Callable[[Config], SegModel]:
        if name in FAMILIES and FAMILIES[name] is not fn:
            raise ValueError(f"model family {name!r} is already registered (by {FAMILIES[name].__module__})")
        FAMILIES[name] = fn
        return fn

    return deco


def _load_builtin_families() -> None:
    # Imported lazily: the family modules import this one to register themselves.
    import medtune.models.sam  # noqa: F401
    import medtune.models.unet  # noqa: F401


def resolve_model_path(cfg: Config) -> Path | None:
    """``model.path`` as a checked local folder, or None for random init.

    Refuses a transformers folder whose config.json maps to custom code (``auto_map``) unless the user opted in
    with ``model.trust_remote_code``: loading it would execute Python shipped inside the folder.
    """
    if cfg.model.path is None:
        return None
    path = Path(cfg.model.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model.path {cfg.model.path!r} does not exist. medtune loads only local folders (never downloads): "
            f"point model.path at a folder written by save_pretrained / `save_base` (e.g. download a hub model first "
            f"with `huggingface-cli download <repo> --local-dir <folder>`), or remove model.path to build "
            f"family {cfg.model.family!r} from model.config with random weights"
        )
    if not path.is_dir():
        raise ValueError(f"model.path {cfg.model.path!r} is a file; it must be the folder that holds the model files")
    config_json = path / "config.json"
    if config_json.is_file():
        try:
            data = json.loads(config_json.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_json} is not valid JSON ({err}); re-save the model") from None
        if data.get("auto_map") and not cfg.model.trust_remote_code:
            raise ValueError(
                f"{config_json} declares custom model code (auto_map: {data['auto_map']}); loading it would run "
                f"Python files from {path}. If you trust that folder, set model.trust_remote_code=true"
            )
    return path


def remote_code_kwargs(cfg: Config) -> dict[str, Any]:
    # Only passed when the user set it, so nothing in a plain run can opt into executing folder code.
    return {"trust_remote_code": True} if cfg.model.trust_remote_code else {}


def build_model(cfg: Config) -> SegModel:
    _load_builtin_families()
    family = cfg.model.family
    if family not in FAMILIES:
        raise ValueError(f"unknown model.family {family!r}; registered families: {', '.join(sorted(FAMILIES))}")
    mode = cfg.finetune_mode()
    if cfg.model.quantize_4bit and mode != "lora":
        raise ValueError(
            "model.quantize_4bit (QLoRA) trains LoRA adapters on a frozen 4-bit base and cannot train it fully; "
            "set model.finetune=lora (or leave it auto with model.path set), or model.quantize_4bit=false"
        )
    seg = FAMILIES[family](cfg)
    if mode == "lora":
        from medtune.models.lora import apply_lora

        seg.net = apply_lora(seg.net, cfg.lora, seg.default_lora_targets(), seg.default_modules_to_save())
    else:
        for p in seg.net.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
    unused = seg.frozen_by_design()
    if unused:
        for name, p in seg.net.named_parameters():
            if re.search(unused, name):
                p.requires_grad_(False)
    trainable, total = seg.param_counts()
    log.info("built %s (%s fine-tuning): %d / %d parameters trainable (%.2f%%)", family, mode, trainable, total,
             100.0 * trainable / max(total, 1))
    if trainable == 0:
        raise ValueError(f"{family} built with 0 trainable parameters; nothing would train")
    return seg
