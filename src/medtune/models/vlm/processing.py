"""Processors of the VLM families: loading a folder's processor (tokenizer + image processor + chat template),
saving it next to an exported model, the chat template a config names, and images as processors take them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from transformers import InternVLProcessor

from medtune.config import Config
from medtune.errors import UserError
from medtune.models.hf import read_config_json, remote_code_kwargs


# ---- processors -----------------------------------------------------------------------------------------------------
class ImageOnlyInternVLProcessor(InternVLProcessor):
    """InternVL's processor without its video processor, which needs torchvision (absent on some platforms); images
    are processed exactly as by ``InternVLProcessor``."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kwargs)


# Processors that have an image-only stand-in when the full one cannot be built (no torchvision): model_type -> the
# processor class name written to processor_config.json, so a machine with torchvision loads the standard one.
_IMAGE_ONLY = {"internvl": "InternVLProcessor"}


def save_processor(processor, folder: str | Path) -> None:
    folder = Path(folder)
    processor.save_pretrained(str(folder))
    config = folder / "processor_config.json"
    if isinstance(processor, ImageOnlyInternVLProcessor) and config.is_file():
        data = json.loads(config.read_text())
        data["processor_class"] = _IMAGE_ONLY["internvl"]
        config.write_text(json.dumps(data, indent=2) + "\n")


def load_processor(path: Path, cfg: Config):
    """The folder's processor (tokenizer + image processor + chat template) through ``AutoProcessor``; for InternVL
    without torchvision, the image-only stand-in built from the same files."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, ProcessorMixin

    processor, error = None, None
    try:
        processor = AutoProcessor.from_pretrained(str(path), **remote_code_kwargs(cfg))
    except (ImportError, AttributeError, OSError, ValueError, TypeError, KeyError) as err:
        error = err
    if isinstance(processor, ProcessorMixin) and hasattr(processor, "tokenizer"):
        return processor
    model_type = read_config_json(path).get("model_type")
    if model_type in _IMAGE_ONLY:
        saved = json.loads((path / "processor_config.json").read_text()) if (path / "processor_config.json").is_file() \
            else {}
        template = path / "chat_template.jinja"
        return ImageOnlyInternVLProcessor(
            image_processor=AutoImageProcessor.from_pretrained(str(path)),
            tokenizer=AutoTokenizer.from_pretrained(str(path)),
            image_seq_length=int(saved.get("image_seq_length", 256)),
            chat_template=template.read_text() if template.is_file() else None)
    got = f"{type(processor).__name__}" if processor is not None else f"{type(error).__name__}: {error}"
    raise UserError(f"{path}: no multimodal processor could be loaded (AutoProcessor gave {got}); a vlm folder "
                     "needs the processor files saved next to the model (processor.save_pretrained(folder))")


def read_chat_template(value: str | None) -> str | None:
    """``model.vlm.chat_template``: a file path or the Jinja text itself."""
    if value is None:
        return None
    if "{%" in value or "{{" in value:
        return value
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    raise UserError(f"model.vlm.chat_template {value!r} is neither an existing file nor a Jinja template text")


def to_pil(image: np.ndarray):
    """LoadedSample image float [C, H, W] in [0, 1] -> RGB PIL image (what processors expect)."""
    from PIL import Image

    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr.transpose(1, 2, 0)
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
    else:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="RGB")
