"""LoRA via PEFT, with the checks that catch its silent failures, and trainable-weight save/load.

``apply_lora`` refuses to re-wrap (pitfall 7), uses one anchored regex over full module names so a same-named
layer in another sub-model is never hit (pitfall 5), trains extra modules through ``modules_to_save`` rather than
``requires_grad`` flags set before wrapping (pitfall 6), and then verifies that the trainable set is exactly the
LoRA weights plus the ``modules_to_save`` copies. ``load_trainable`` writes weights into the already-built
trainable adapter instead of ``PeftModel.from_pretrained`` (whose default ``is_trainable=False`` would leave
nothing to train, pitfall 4).
"""
from __future__ import annotations

import copy
import json
import logging
import re
from collections import Counter
from pathlib import Path

from torch import nn

from medtune.config import LoraCfg
from medtune.errors import ConfigError, MissingFileError, UserError
from medtune.models.base import SegModel

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
ADAPTER_FILE = "adapter_model.safetensors"


def _supported_by_lora(module: nn.Module) -> bool:
    # What peft 0.21's LoRA dispatch accepts (bitsandbytes Linear4bit/8bit subclass nn.Linear). ConvTranspose2d is
    # not supported: it is neither a Conv2d subclass nor dispatched separately.
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.MultiheadAttention)) or (
        type(module).__name__ == "Conv1D"
    )


def _in_modules_to_save(name: str, modules_to_save: list[str]) -> bool:
    # Same rule PEFT uses to exclude adapters from modules that are trained as full copies.
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save)


def _is_peft_wrapped(net: nn.Module) -> bool:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(net, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in net.modules())


def _is_lora_param(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def _is_modules_to_save_param(name: str) -> bool:
    return ".modules_to_save." in f".{name}"


def _is_token_param(name: str) -> bool:
    # PEFT trainable tokens (LoraConfig.trainable_token_indices): the rows being trained, e.g. an added [SEG]
    return ".trainable_tokens_delta." in f".{name}"


def adapter_summary(peft_model: nn.Module, depth: int = 1) -> dict[str, int]:
    """Number of LoRA-wrapped layers per submodule prefix (first ``depth`` name parts, relative to the base net)."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    counts: Counter[str] = Counter()
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            counts[".".join(name.split(".")[:depth])] += 1
    return dict(counts)


def _modules_to_save_summary(peft_model: nn.Module) -> list[str]:
    from peft.utils import ModulesToSaveWrapper

    base = peft_model.get_base_model()
    return [name for name, m in base.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def verify_trainable(peft_model: nn.Module, frozen_by_design: str | None = None) -> None:
    """Raise unless the trainable parameters are exactly the LoRA weights plus the modules_to_save copies (less the
    family's parameters that cannot influence the mask logits)."""
    wrong_on, wrong_off = [], []
    for name, p in peft_model.named_parameters():
        expected = _is_lora_param(name) or _is_modules_to_save_param(name) or _is_token_param(name)
        if frozen_by_design and re.search(frozen_by_design, name):
            expected = False
        if p.requires_grad and not expected:
            wrong_on.append(name)
        elif expected and not p.requires_grad:
            wrong_off.append(name)
    if wrong_on or wrong_off:
        raise RuntimeError(
            "LoRA trainable set is not LoRA + modules_to_save (+ trainable tokens): "
            f"unexpectedly trainable {wrong_on[:8]}{' ...' if len(wrong_on) > 8 else ''}; "
            f"unexpectedly frozen {wrong_off[:8]}{' ...' if len(wrong_off) > 8 else ''}"
        )
    if not any(_is_lora_param(n) and p.requires_grad for n, p in peft_model.named_parameters()):
        raise RuntimeError("no trainable LoRA parameter in the model; nothing would train")


def apply_lora(net: nn.Module, lora_cfg: LoraCfg, default_targets: str,
               default_modules_to_save: list[str] | None,
               trainable_tokens: dict[str, list[int]] | None = None) -> nn.Module:
    """Wrap ``net`` in a fresh ``PeftModel`` with LoRA on the modules whose full name matches the target regex.

    ``lora_cfg.target_modules`` / ``modules_to_save`` override the family defaults. ``trainable_tokens``
    ({embedding module name: token ids}) trains those rows only (PEFT ``trainable_token_indices``). Returns the
    ``PeftModel``.
    """
    from peft import LoraConfig, get_peft_model

    if _is_peft_wrapped(net):
        raise RuntimeError(
            "this model already carries PEFT adapters; wrapping it again would reset or freeze what was trained "
            "(pitfall 7). Load a trained adapter with medtune.models.lora.load_trainable, or export_merged it "
            "first and use the merged folder as model.path"
        )
    targets = lora_cfg.target_modules or default_targets
    modules_to_save = list(lora_cfg.modules_to_save if lora_cfg.modules_to_save is not None
                           else (default_modules_to_save or []))
    try:
        pattern = re.compile(targets)
    except re.error as err:
        raise ConfigError(f"lora.target_modules {targets!r} is not a valid regex: {err}") from None

    named = [(n, m) for n, m in net.named_modules() if n]
    all_names = [n for n, _ in named]
    for m in modules_to_save:
        if not any(n.endswith(m) for n in all_names):
            top = sorted({n.split(".")[0] for n in all_names})
            raise ConfigError(f"lora.modules_to_save entry {m!r} matches no module; top-level modules: {top}")

    matched = [(n, m) for n, m in named if pattern.fullmatch(n)]
    skipped = [n for n, _ in matched if _in_modules_to_save(n, modules_to_save)]
    matched = [(n, m) for n, m in matched if not _in_modules_to_save(n, modules_to_save)]
    if skipped:
        log.info("LoRA targets inside modules_to_save are trained fully instead: %s", skipped[:8])
    if not matched:
        sample = [n for n, m in named if _supported_by_lora(m)][:20]
        raise ConfigError(
            f"lora.target_modules {targets!r} (an anchored regex over full module names) matched no module outside "
            f"modules_to_save {modules_to_save}; some LoRA-capable module names: {sample}"
        )
    unsupported = [f"{n} ({type(m).__name__})" for n, m in matched if not _supported_by_lora(m)]
    if unsupported:
        raise ConfigError(
            f"lora.target_modules {targets!r} matches modules LoRA cannot wrap: {unsupported[:8]}; narrow the regex "
            "to Linear / Conv1d/2d/3d / Embedding layers"
        )

    config = LoraConfig(
        r=lora_cfg.resolved_r(),
        lora_alpha=lora_cfg.resolved_alpha(),
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
        modules_to_save=modules_to_save or None,
        trainable_token_indices=trainable_tokens or None,
        bias="none",
    )
    peft_model = get_peft_model(net, config)
    summary = adapter_summary(peft_model)
    if not summary:
        raise RuntimeError(f"PEFT attached no LoRA layer for target regex {targets!r}")
    verify_trainable(peft_model)
    log.info("LoRA r=%d alpha=%g landed on %d layers: %s; trained fully (modules_to_save): %s",
             config.r, config.lora_alpha, sum(summary.values()), summary,
             _modules_to_save_summary(peft_model) or "none")
    return peft_model


def merged_copy(net: nn.Module) -> nn.Module:
    """A plain network with the LoRA deltas and modules_to_save copies folded in.

    Works on a deep copy so the live model keeps its adapters and can go on training after an export. A quantised
    (QLoRA) base is refused: merging into 4-bit weights re-quantises and loses the adapter's precision.
    """
    if getattr(net, "is_loaded_in_4bit", False) or any("4bit" in type(m).__name__ or "8bit" in type(m).__name__
                                                       for m in net.modules()):
        raise UserError(
            "cannot export a merged model from a quantised (QLoRA) base: merging into 4-bit weights re-quantises "
            "and loses the adapter's precision. Build the model unquantised (model.quantize_4bit=false), "
            "load the adapter checkpoint with load_trainable, then export "
            "(`medtune export RUN --out DIR model.quantize_4bit=false`)"
        )
    if not _is_peft_wrapped(net):
        return net
    return copy.deepcopy(net).merge_and_unload()


def save_trainable(seg_model: SegModel, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """LoRA: ``out_dir/adapter`` in PEFT format; full: ``out_dir/model`` as a base folder (usable as model.path).

    `state_dict`: the model's full weights gathered by the engine (FSDP shards them, so the live parameters are only
    this rank's pieces), keyed as in ``seg_model.state_dict()``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if seg_model.is_peft:
        target = out_dir / ADAPTER_DIR
        net_state = None
        if state_dict is not None:  # PEFT picks the adapter's entries out of the network's full state dict
            prefix = "net."
            net_state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        seg_model.net.save_pretrained(str(target), safe_serialization=True, state_dict=net_state)
        if not (target / ADAPTER_FILE).is_file():
            raise RuntimeError(f"PEFT did not write {target / ADAPTER_FILE}")
        return target
    if state_dict is not None:
        raise UserError("full fine-tuning under FSDP cannot write the checkpoint's model/ folder (the weights are "
                        "sharded); use model.finetune=lora, or the DDP / DeepSpeed ZeRO-2 accelerate config")
    return seg_model.save_base(out_dir / MODEL_DIR)


def load_trainable(seg_model: SegModel, ckpt_dir: str | Path) -> None:
    """Load ``save_trainable`` weights into an already built SegModel of the same config, keeping them trainable."""
    ckpt_dir = Path(ckpt_dir)
    adapter, model = ckpt_dir / ADAPTER_DIR, ckpt_dir / MODEL_DIR
    if adapter.is_dir():
        if not seg_model.is_peft:
            raise UserError(f"{ckpt_dir} holds a LoRA adapter but the model was built for full fine-tuning; "
                            "build it with model.finetune=lora (the run's config)")
        _load_adapter(seg_model, adapter)
    elif model.is_dir():
        if seg_model.is_peft:
            raise UserError(f"{ckpt_dir} holds fully fine-tuned weights but the model was built with LoRA; "
                            "build it with model.finetune=full (the run's config)")
        seg_model.load_base_weights(model)
    else:
        raise MissingFileError(f"{ckpt_dir} has neither {ADAPTER_DIR}/ nor {MODEL_DIR}/; not a medtune checkpoint")
    trainable, _ = seg_model.param_counts()
    if trainable == 0:
        raise ValueError(f"after loading {ckpt_dir} no parameter is trainable (pitfall 4)")


def _load_adapter(seg_model: SegModel, adapter: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = adapter / ADAPTER_FILE
    if not weights.is_file():
        raise MissingFileError(f"{weights} missing; the checkpoint is incomplete")
    saved_cfg = json.loads((adapter / "adapter_config.json").read_text())
    live_cfg = seg_model.net.peft_config["default"]
    live = {"r": live_cfg.r, "target_modules": live_cfg.target_modules,
            "modules_to_save": sorted(live_cfg.modules_to_save or []),
            "trainable_token_indices": live_cfg.trainable_token_indices or None}
    saved = {"r": saved_cfg.get("r"), "target_modules": saved_cfg.get("target_modules"),
             "modules_to_save": sorted(saved_cfg.get("modules_to_save") or []),
             "trainable_token_indices": saved_cfg.get("trainable_token_indices") or None}
    if isinstance(saved["target_modules"], list):
        saved["target_modules"] = set(saved["target_modules"])
    if saved != live:
        raise UserError(f"adapter in {adapter} was trained with {saved}, but this model has {live}; "
                        "build the model with the run's own config (lora.* settings)")
    device = next(seg_model.parameters()).device
    state = load_file(str(weights), device=str(device))
    result = set_peft_model_state_dict(seg_model.net, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or [])
               if _is_lora_param(k) or _is_modules_to_save_param(k) or _is_token_param(k)]
    if missing:  # a tied copy (e.g. lm_head's trainable tokens tied to the embedding's) loads with its source
        own = seg_model.net.state_dict(keep_vars=True)
        loaded = {v.data_ptr() for k, v in own.items() if k not in set(missing)}
        missing = [k for k in missing if k not in own or own[k].data_ptr() not in loaded]
    if unexpected or missing:
        raise UserError(f"adapter {weights} does not fit: unexpected {unexpected[:8]}, missing {missing[:8]}")
    verify_trainable(seg_model.net, seg_model.frozen_by_design())


def export_merged(seg_model: SegModel, out_dir: str | Path) -> Path:
    """A standalone base-model folder (LoRA merged) that another run can use as ``model.path``."""
    return seg_model.save_base(out_dir)
