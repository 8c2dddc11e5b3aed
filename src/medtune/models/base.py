"""The model contract recipes rely on. Recipes never branch on the family."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from medtune.errors import MissingFileError, UserError


@dataclass
class ModelOutput:
    """What one training/evaluation forward of any family returns; each task reads the parts it needs.

    ``mask_logits`` [B, K, H, W] at the input resolution (K targets per image: 1 for U-Net/SAM, one per ``[SEG]`` for
    a segmenting VLM); ``lm_loss`` the language-model cross-entropy on supervised tokens (a scalar) and
    ``token_logits`` [B, T, V], for models that read and write text; ``mask_valid`` [B, K] bool: which of the K mask
    slots hold a real ``[SEG]`` mask (sequences with fewer ``[SEG]`` than the batch maximum leave slots empty; their
    logits are zero); ``logit_positions`` 1-D: the positions along T that ``token_logits`` [B, P, V] hold, when
    the model computed them only where needed (None: every position). Absent parts are None.
    """

    mask_logits: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    token_logits: torch.Tensor | None = None
    mask_valid: torch.Tensor | None = None
    logit_positions: torch.Tensor | None = None


class SegModel(nn.Module):
    """Wraps a family's network (possibly a ``peft.PeftModel``) behind one differentiable forward.

    ``forward_logits(image, box)`` takes ``image`` float [B, C, H, W] in [0, 1] (the wrapper does the family's own
    normalisation/resizing) and optional ``box`` float [B, 4] (x1, y1, x2, y2 in input pixels), and returns mask
    logits [B, 1, H, W] at the input resolution. It must be a plain teacher-forced forward: no ``no_grad``, no
    thresholding, no ``generate()``.

    Each family also says where LoRA goes by default (``default_lora_targets`` / ``default_modules_to_save``) and
    how its weights are written as a base-model folder that ``model.path`` accepts (``save_base``) and read back
    (``load_base_weights``).
    """

    family: str = "base"
    # Convolutional families run faster with NHWC activations and weights (oneDNN on CPU, cuDNN on GPU; see
    # bench/cpu_unet.py); build_model converts such a model after LoRA.
    channels_last: bool = False
    # families whose forward takes its image-encoder output from ``feature_cache`` when one is attached
    # (models/feature_cache.py, train.feature_cache)
    supports_feature_cache: bool = False
    feature_cache = None
    # families that read a question with the image (the segmenting VLM): their items carry the conversation
    takes_question: bool = False

    def __init__(self, net: nn.Module, in_channels: int):
        super().__init__()
        self.net = net
        self.in_channels = in_channels

    def forward_logits(self, image: torch.Tensor, box: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must implement forward_logits")

    def forward_batch(self, batch: dict) -> ModelOutput:
        """The one forward the recipes call, on a collated batch. Image-only families read ``image`` (and ``box``
        in box-prompt mode); text families read their token tensors too."""
        box = batch.get("box") if getattr(self, "prompt", "none") == "box" else None
        return ModelOutput(mask_logits=self.forward_logits(batch["image"], box))

    def forward(self, image: torch.Tensor | None = None, box: torch.Tensor | None = None, *,
                batch: dict | None = None):
        """``model(batch=batch)`` -> ``ModelOutput`` (the recipes' call, through DDP/autocast wrappers);
        ``model(image, box)`` -> mask logits [B, 1, H, W] (image-only families)."""
        if batch is not None:
            return self.forward_batch(batch)
        return self.forward_logits(image, box)

    @property
    def is_peft(self) -> bool:
        from peft import PeftModel

        return isinstance(self.net, PeftModel)

    @property
    def base_network(self) -> nn.Module:
        """The family's own network, without the PEFT wrapper (LoRA layers, if any, stay injected in it)."""
        return self.net.get_base_model() if self.is_peft else self.net

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """The frozen reference policy: same weights, LoRA adapters off (no second copy in memory)."""
        if not self.is_peft:
            raise RuntimeError("adapters_disabled() needs a LoRA model (finetune: lora)")
        # Leaving PEFT's disable_adapter() marks every modules_to_save parameter trainable again, including the ones
        # the family keeps frozen by design; restore the flags exactly.
        flags = [(p, p.requires_grad) for p in self.parameters()]
        try:
            with self.net.disable_adapter():
                yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def param_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; shared/tied parameters count once."""
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    # --- family hooks -------------------------------------------------------------------------------------------
    def default_lora_targets(self) -> str:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must say where LoRA goes by default")

    def default_modules_to_save(self) -> list[str] | None:
        return None

    def default_trainable_tokens(self) -> dict[str, list[int]] | None:
        """Embedding rows trained under LoRA as PEFT trainable tokens ({module name: token ids}), e.g. an added
        ``[SEG]`` token's row, instead of a full embedding copy in ``modules_to_save``."""
        return None

    def image_encoder(self) -> nn.Module | None:
        """The image encoder whose output depends on the image alone (SAM's vision encoder): what
        ``model.freeze_image_encoder`` freezes and ``train.feature_cache`` caches. None: no separate encoder (U-Net)."""
        return None

    def encoder_description(self) -> dict:
        """Everything besides the encoder's weights that decides its output for a given input tensor (config,
        preprocessing, input size, dtype): part of the feature cache's fingerprint."""
        raise NotImplementedError(f"{type(self).__name__} must describe its image encoder to cache its output")

    def frozen_by_design(self) -> str | None:
        """Regex (searched in parameter names) of parameters that cannot influence ``forward_logits`` (e.g. SAM's IoU
        head): kept frozen in every fine-tuning mode, otherwise the preflight rightly reports them dead."""
        return None

    def selected_by_prediction(self) -> str | None:
        """Regex of trainable parameters that reach the loss only when the model's own prediction selects them (a
        segmenting VLM's best-IoU mask heads): the preflight does not call them dead when its steps never pick one."""
        return None

    def save_base(self, out_dir: str | Path) -> Path:  # pragma: no cover
        """Write the network (LoRA merged in) as a folder another run can use as ``model.path``."""
        raise NotImplementedError(f"{type(self).__name__} must implement save_base")

    def load_base_weights(self, folder: str | Path) -> None:  # pragma: no cover
        """Load a ``save_base`` folder's weights into this (already built, same architecture) network in place."""
        raise NotImplementedError(f"{type(self).__name__} must implement load_base_weights")


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise MissingFileError(f"{folder} holds no model.safetensors (nor a sharded index): not a saved model folder")


def load_safetensors_folder(net: nn.Module, folder: str | Path) -> None:
    """Copy a folder's safetensors weights into ``net``, strictly except for tied/shared tensors.

    Writers (``safetensors.torch.save_model``, ``save_pretrained``) keep one name per shared storage, so a name is
    allowed to be missing only when it shares storage with a name that was loaded.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    state: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(folder):
        state.update(load_file(str(f)))
    missing, unexpected = net.load_state_dict(state, strict=False)
    own = net.state_dict(keep_vars=True)
    loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
    really_missing = [k for k in missing if own[k].data_ptr() not in loaded_ptrs]
    if unexpected or really_missing:
        raise UserError(
            f"weights in {folder} do not fit this model (was it saved from a different architecture/config?): "
            f"missing {really_missing[:8]}{' ...' if len(really_missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
