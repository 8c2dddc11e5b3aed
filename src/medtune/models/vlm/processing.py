"""Processors of the VLM families: loading a folder's processor (tokenizer + image processor + chat template),
saving it next to an exported model, the chat template a config names, and images as processors take them."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from transformers import InternVLProcessor, Qwen2_5_VLProcessor, Qwen3VLProcessor

from medtune.config import Config
from medtune.errors import UserError
from medtune.models.hf import read_config_json, remote_code_kwargs

UINT8_MAX = 255

# ---- processors -----------------------------------------------------------------------------------------------------
# transformers' processors of the VLMs that also take video build a video processor, which needs torchvision (absent
# on some platforms, this one included). The image-only stand-ins below leave it out (their ``__init__`` names no
# video processor, so ``ProcessorMixin`` expects none) and process images exactly as the full processor does. They
# are module-level classes so a codec holding one pickles into DataLoader workers.
UNUSED_VIDEO_TOKEN = "<video>"


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """``InternVLProcessor`` without its video processor."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
        if tokenizer is not None and not _has_token(tokenizer, "video_token"):
            # InternVLProcessor reads the tokenizer's video token for its text pattern; an image-only processor never
            # expands it, and a tokenizer without one (Sa2VA's) is not given a new vocabulary entry for it
            tokenizer.video_token = UNUSED_VIDEO_TOKEN
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kwargs)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without its video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without its video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def _has_token(tokenizer, name: str) -> bool:
    try:
        return getattr(tokenizer, name) is not None
    except AttributeError:
        return False


# model_type -> (stand-in, the keys of processor_config.json it takes). save_processor writes the standard class name
# to processor_config.json, so a machine with torchvision loads the standard processor from the same folder.
IMAGE_ONLY: dict[str, tuple[type, tuple[str, ...]]] = {
    "internvl": (ImageOnlyInternVLProcessor, ("image_seq_length",)),
    "qwen2_5_vl": (ImageOnlyQwen2_5_VLProcessor, ()),
    "qwen3_vl": (ImageOnlyQwen3VLProcessor, ()),
}


# Import names whose PyPI package is called otherwise (what remote-code processors of medical VLMs import: Hulu-Med's
# imports cv2, decord and ffmpeg at module level).
PYPI_NAMES = {"cv2": "opencv-python-headless", "ffmpeg": "ffmpeg-python", "PIL": "pillow", "skimage": "scikit-image",
              "sklearn": "scikit-learn", "yaml": "pyyaml"}
_MISSING = re.compile(r"requires the following packages that were not found in your environment: ([\w., -]+?)\. Run")


def missing_packages_error(path: Path, err: ImportError) -> UserError | None:
    """transformers' "this modeling file requires the following packages ..." as one line naming what to install
    (its own hint names import names, e.g. ``pip install cv2``, which is no package); None for other errors."""
    found = _MISSING.search(str(err))
    if not found:
        return None
    names = [n.strip() for n in found.group(1).split(",") if n.strip()]
    install = " ".join(PYPI_NAMES.get(n, n) for n in names)
    return UserError(f"{path}: the folder's processor code imports {', '.join(names)}, not installed here; "
                     f"`pip install {install}` (or use a model medtune implements itself, e.g. Hulu-Med)")


def save_processor(processor, folder: str | Path) -> None:
    folder = Path(folder)
    processor.save_pretrained(str(folder))
    config = folder / "processor_config.json"
    stand_in = next((cls for cls, _ in IMAGE_ONLY.values() if type(processor) is cls), None)
    if stand_in is not None and config.is_file():
        data = json.loads(config.read_text())
        data["processor_class"] = stand_in.__mro__[1].__name__  # the standard processor it stands in for
        config.write_text(json.dumps(data, indent=2) + "\n")


def load_processor(path: Path, cfg: Config):
    """The folder's processor (tokenizer + image processor + chat template) through ``AutoProcessor``; for the VLMs
    whose processor needs torchvision (InternVL, Qwen2.5-VL, Qwen3-VL), the image-only stand-in built from the same
    files."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, ProcessorMixin

    processor, error = None, None
    remote = remote_code_kwargs(cfg)
    try:
        processor = AutoProcessor.from_pretrained(str(path), **remote)
    except ImportError as err:
        missing = missing_packages_error(path, err)
        if missing is not None:
            raise missing from None
        error = err
    except (AttributeError, OSError, ValueError, TypeError, KeyError) as err:
        error = err
    if isinstance(processor, ProcessorMixin) and hasattr(processor, "tokenizer"):
        return processor
    model_type = read_config_json(path).get("model_type")
    if model_type in IMAGE_ONLY:
        stand_in, keys = IMAGE_ONLY[model_type]
        saved = json.loads((path / "processor_config.json").read_text()) if (path / "processor_config.json").is_file() \
            else {}
        template = path / "chat_template.jinja"
        return stand_in(image_processor=AutoImageProcessor.from_pretrained(str(path), **remote),
                        tokenizer=AutoTokenizer.from_pretrained(str(path), **remote),
                        chat_template=template.read_text() if template.is_file() else None,
                        **{k: saved[k] for k in keys if k in saved})
    got = f"{type(processor).__name__}" if processor is not None else f"{type(error).__name__}: {error}"
    raise UserError(f"{path}: no multimodal processor could be loaded (AutoProcessor gave {got}); a vlm folder "
                     "needs the processor files saved next to the model (processor.save_pretrained(folder))")


def apply_image_processor_settings(processor, settings: dict) -> None:
    """``model.vlm.image_processor``: set attributes of the processor's image processor (the image-token budget of a
    dynamic-resolution VLM, ...). A name the image processor does not have is refused in one line listing its
    settings, rather than silently ignored."""
    if not settings:
        return
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise UserError(f"model.vlm.image_processor is set but {type(processor).__name__} has no image processor")
    known = sorted(k for k in image_processor.to_dict() if not k.startswith("_"))
    unknown = [k for k in settings if k not in known]
    if unknown:
        raise UserError(f"model.vlm.image_processor: {type(image_processor).__name__} has no setting "
                        f"{', '.join(unknown)}; its settings: {', '.join(known)}")
    for key, value in settings.items():
        current = getattr(image_processor, key, None)
        if isinstance(value, dict) and current is not None and not isinstance(current, (bool, int, float, str)):
            # a partial size dict (e.g. {longest_edge: N} of Qwen-VL's size) updates the current one
            fields = getattr(current, "__dataclass_fields__", None)
            base = {k: getattr(current, k) for k in fields} if fields else dict(current)
            value = {**{k: v for k, v in base.items() if v is not None}, **value}
        setattr(image_processor, key, value)


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


def to_uint8_rgb(image) -> np.ndarray:
    """uint8 [H, W, 3] from a float [C, H, W] (or [H, W]) image in [0, 1] (the data loader's; 8-bit files round-trip
    exactly), a uint8 [C, H, W] array / tensor, or one image [1, C, H, W]. Grey images are repeated to RGB (Sa2VA
    converts every image to RGB)."""
    x = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected an image [C, H, W] with C in (1, 3), got shape {x.shape}")
    if x.dtype != np.uint8:
        x = np.rint(np.clip(x.astype(np.float64), 0.0, 1.0) * UINT8_MAX).astype(np.uint8)
    if x.shape[0] == 1:
        x = np.repeat(x, 3, axis=0)
    return np.ascontiguousarray(x.transpose(1, 2, 0))


def to_pil(image):
    """LoadedSample image float [C, H, W] in [0, 1] -> RGB PIL image (what processors expect)."""
    from PIL import Image

    return Image.fromarray(to_uint8_rgb(image), mode="RGB")
