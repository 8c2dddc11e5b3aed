"""What every transformers-based family shares: local model folders (never a hub download, no remote code unless
opted in), QLoRA's 4-bit loading, and preparing the network for k-bit training / gradient checkpointing.

The order is fixed here so no family can get it wrong: quantise on load -> ``prepare_model_for_kbit_training`` or
gradient checkpointing -> (later, in ``registry.build_model``) LoRA. Preparing after the adapter is attached would
freeze it (pitfall 7).

Every checkpoint load goes through ``load_pretrained``, which makes the non-persistent buffers trustworthy (see
``restore_non_persistent_buffers``).
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medtune.config import Config
from medtune.errors import ConfigError, MissingFileError, UserError
from medtune.models.vlm.hulumed import is_hulumed_config

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
        # a Hulu-Med folder of a VLM family (vlm, or segvlm's VLM) is loaded by medtune's own implementation: its
        # auto_map never runs
        native = cfg.model.family in ("vlm", "segvlm") and is_hulumed_config(data)
        if data.get("auto_map") and not cfg.model.trust_remote_code and not native:
            raise ConfigError(
                f"{config_json} ({key}) declares custom model code (auto_map: {data['auto_map']}); loading it would "
                f"run Python files from {path}. If you trust that folder, set model.trust_remote_code=true"
            )
    return path


def remote_code_kwargs(cfg: Config) -> dict[str, Any]:
    # Always passed, False unless the user set it: nothing in a plain run executes folder code, and transformers never
    # stops at its interactive "run the custom code? [y/N]" prompt (what it does when the argument is absent).
    return {"trust_remote_code": bool(cfg.model.trust_remote_code)}


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


def load_pretrained(loader, path: str | Path, **kwargs):
    """``loader.from_pretrained(path, **kwargs)`` with every non-persistent buffer recomputed (or the load refused):
    the one way medtune loads a transformers checkpoint."""
    net = loader.from_pretrained(str(path), **kwargs)
    restore_non_persistent_buffers(net, str(path))
    return net


def _non_persistent_buffers(net: nn.Module):
    """(full name, owning module, tensor) of every non-persistent buffer (``register_buffer(..., persistent=False)``)."""
    for module_name, module in net.named_modules():
        for name in module._non_persistent_buffers_set:
            tensor = module._buffers.get(name)
            if tensor is not None:
                yield (f"{module_name}.{name}" if module_name else name), module, tensor


def _construction_dtype(net: nn.Module) -> torch.dtype:
    """The default dtype ``from_pretrained`` built the model under (it records it as ``config.dtype``)."""
    dtype = getattr(getattr(net, "config", None), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _reference_buffers(net: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers of a second construction of ``type(net)`` from its config, eagerly computed on the CPU, with every
    parameter on the meta device (no parameter memory, no weight initialisation)."""
    from accelerate import init_empty_weights
    from transformers import initialization as hf_init

    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(_construction_dtype(net))
        with torch.device("cpu"), hf_init.no_init_weights(), hf_init.no_tie_weights(), \
                init_empty_weights(include_buffers=False):
            reference = type(net)(copy.deepcopy(net.config))
    finally:
        torch.set_default_dtype(old)
    return dict(reference.named_buffers())


def restore_non_persistent_buffers(net: nn.Module, where: str) -> list[str]:
    """Recompute every non-persistent buffer of a freshly loaded ``net`` as its ``__init__`` computes it; returns the
    names of those that loading had left with another value.

    Why: a non-persistent buffer (rotary ``inv_freq``, ``position_ids`` ...) is not in the checkpoint; its value is
    whatever the module's ``__init__`` computes. transformers 5 builds the model on the meta device, so that value is
    never computed; ``_move_missing_keys_from_meta_to_device`` then materialises every non-persistent buffer with
    ``torch.empty_like`` (uninitialised memory) and only the modules the model's ``_init_weights`` knows are written
    again (``*RotaryEmbedding`` with an ``original_inv_freq``, the buffers a native model re-initialises itself).
    Anything else -- remote code above all (Hulu-Med's vision ``VisionRotaryEmbedding.inv_freq``) -- silently keeps
    garbage that differs on every load.

    How: a module's constructor arguments are not recoverable in general, but the whole model's are: its config.
    ``type(net)(config)`` is built a second time with the default device being the CPU, parameters moved to the meta
    device as they are registered (accelerate's ``init_empty_weights(include_buffers=False)``) and transformers' weight
    initialisation off, so every ``__init__``-time buffer computation runs for real while parameters cost neither
    memory nor init time (measured: 0.06 s and 13 MB for the 76-billion-parameter default Qwen2.5-VL config on
    one CPU core). Each non-persistent buffer of ``net`` is then overwritten with its reference value (same name,
    cast to the loaded buffer's dtype and device); where transformers did re-initialise it, this writes the same
    value.

    Refused, in one line naming the buffer and its module class: a buffer the reference cannot provide (its
    ``__init__`` derives it from a parameter, which is on the meta device there, or the model cannot be built from
    its config alone) -- medtune does not run a model on memory nobody wrote.
    """
    found = list(_non_persistent_buffers(net))
    if not found:
        return []
    try:
        reference = _reference_buffers(net)
    except Exception as err:  # any failure of third-party construction code means: cannot recompute
        name, module, _ = found[0]
        detail = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        raise UserError(f"{where}: cannot recompute the non-persistent buffer {name} of {type(module).__name__} "
                        f"(not stored in the checkpoint, left uninitialised by transformers' loader): building "
                        f"{type(net).__name__} again from its config failed ({detail})") from None
    changed = []
    with torch.no_grad():
        for name, module, tensor in found:
            value = reference.get(name)
            if value is None or value.is_meta or value.shape != tensor.shape:
                why = ("its reference construction has no such buffer" if value is None else
                       "its __init__ derives it from a parameter" if value.is_meta else
                       f"its reference has shape {tuple(value.shape)}, the loaded one {tuple(tensor.shape)}")
                raise UserError(f"{where}: the non-persistent buffer {name} of {type(module).__name__} is not stored "
                                f"in the checkpoint and transformers' loader leaves it uninitialised; medtune cannot "
                                f"recompute it ({why}), so it refuses to run the model on uninitialised memory")
            value = value.to(device=tensor.device, dtype=tensor.dtype)
            if not torch.equal(tensor, value):
                changed.append(name)
                tensor.copy_(value)
    if changed:
        log.info("%s: recomputed %d non-persistent buffer(s) that loading had left wrong: %s", where, len(changed),
                 ", ".join(changed))
    return changed
