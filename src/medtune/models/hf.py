"""What every transformers-based family shares: local model folders (never a hub download, no remote code unless
opted in), QLoRA's 4-bit loading, and preparing the network for k-bit training / gradient checkpointing.

The order is fixed here so no family can get it wrong: quantise on load -> ``prepare_model_for_kbit_training`` or
gradient checkpointing -> (later, in ``registry.build_model``) LoRA. Preparing after the adapter is attached would
freeze it (pitfall 7).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medtune.config import Config
from medtune.errors import ConfigError, MissingFileError, UserError
from medtune.models.hulumed import is_hulumed_config

log = logging.getLogger(__name__)


def resolve_model_path(cfg: Config) -> Path | None:
    """``model.path`` as a checked local folder, or None for random init (see ``resolve_local_folder``)."""
    if cfg.model.path is None:
        return None
    return resolve_local_folder(cfg.model.path, "model.path", cfg)


def resolve_local_folder(value: str, key: str, cfg: Config) -> Path:
    """A model folder named by config key ``key`` (``model.path``, ``model.vlm.vlm_path`` ...), checked.

    Refuses a transformers folder whose config.json maps to custom code (``auto_map``) unless the user opted in
    with ``model.trust_remote_code``: loading it would execute Python shipped inside the folder.
    """
    path = Path(value).expanduser()
    if not path.exists():
        fallback = (f"or remove model.path to build family {cfg.model.family!r} from model.config with random weights"
                    if key == "model.path" else f"or fix {key}")
        raise MissingFileError(
            f"{key} {value!r} does not exist. medtune loads only local folders (never downloads): "
            f"point {key} at a folder written by save_pretrained / `save_base` (e.g. download a hub model first "
            f"with `huggingface-cli download <repo> --local-dir <folder>`), {fallback}"
        )
    if not path.is_dir():
        raise ConfigError(f"{key} {value!r} is a file; it must be the folder that holds the model files")
    config_json = path / "config.json"
    if config_json.is_file():
        try:
            data = json.loads(config_json.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{config_json} is not valid JSON ({err}); re-save the model") from None
        # a Hulu-Med folder in family vlm is loaded by medtune's own implementation: its auto_map never runs
        native = cfg.model.family == "vlm" and is_hulumed_config(data)
        if data.get("auto_map") and not cfg.model.trust_remote_code and not native:
            raise ConfigError(
                f"{config_json} ({key}) declares custom model code (auto_map: {data['auto_map']}); loading it would "
                f"run Python files from {path}. If you trust that folder, set model.trust_remote_code=true"
            )
    return path


def remote_code_kwargs(cfg: Config) -> dict[str, Any]:
    # Only passed when the user set it, so nothing in a plain run can opt into executing folder code.
    return {"trust_remote_code": True} if cfg.model.trust_remote_code else {}


def read_config_json(path: Path) -> dict[str, Any]:
    config_json = path / "config.json"
    if not config_json.is_file():
        raise MissingFileError(f"{path} has no config.json, so it is not a transformers checkpoint folder "
                               "(save one with save_pretrained or `medtune export`)")
    return json.loads(config_json.read_text())


def require_qlora_stack() -> None:
    if not torch.cuda.is_available():
        raise ConfigError("QLoRA (model.quantize_4bit=true) needs a CUDA GPU and bitsandbytes; this machine has no "
                          "CUDA device. Set model.quantize_4bit=false to train LoRA on the unquantised model")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("QLoRA needs a CUDA GPU and bitsandbytes: pip install 'medtune[gpu]'") from None


def load_kwargs(cfg: Config, keep_trainable: list[str]) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments: fp32 master weights (mixed precision is autocast's job), or NF4 4-bit
    with ``keep_trainable`` modules (trained as full copies) left unquantised."""
    kwargs: dict[str, Any] = remote_code_kwargs(cfg)
    if cfg.model.quantize_4bit:
        require_qlora_stack()
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=list(keep_trainable),
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    else:
        kwargs["dtype"] = torch.float32
    return kwargs


def prepare_for_training(net: nn.Module, cfg: Config, input_grads: bool = False) -> nn.Module:
    """k-bit preparation and/or non-reentrant gradient checkpointing, before LoRA is attached.

    ``input_grads``: also make the input embeddings' output require grad (``enable_input_require_grads``). Needed
    by language models whose LoRA sits behind frozen embeddings under checkpointing (pitfall 3); harmless otherwise.
    """
    gc = cfg.model.gradient_checkpointing
    if gc and not getattr(net, "supports_gradient_checkpointing", False):
        raise ConfigError(f"transformers' {type(net).__name__} does not support gradient checkpointing; set "
                          "model.gradient_checkpointing=false (lower data.batch_size or data.patch_size for memory)")
    if cfg.model.quantize_4bit:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(net, use_gradient_checkpointing=gc,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    if gc:
        if hasattr(net, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
            net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if input_grads and hasattr(net, "enable_input_require_grads"):
            net.enable_input_require_grads()
    return net
