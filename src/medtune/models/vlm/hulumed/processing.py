"""Hulu-Med's input processing, written from its published behaviour, for medtune's ``ChatCodec``.

Image side (Hulu-Med's ``HulumedImageProcessor``): every image is resized (PIL bicubic) to a multiple of
``patch_size * merge_size`` holding between ``min_tokens`` and ``max_tokens`` patches, rescaled and normalised, and cut
into patches [N, 3 * p * p] in (t, h/m, w/m, m, m) order; ``grid_sizes`` (t, h, w) in patches, ``merge_sizes`` one per
image. Hulu-Med reads a PIL image's ``size`` (width, height) as (height, width), so a PIL image is resized to the
transposed aspect (a 256 x 215 w x h image becomes h 252 x w 210). Its checkpoints were trained that way, and the
published references depend on it, so it is reproduced here; an (H, W, C) array is read the right way round, as Hulu-Med
does for arrays.

Text side: each ``<image>`` of the prompt becomes one ``<image>`` token per merged patch (h * w / m^2). Hulu-Med's chat
template writes ``<image>\\n`` for an image part, so a text part that follows an image and starts with a newline (the
LLaVA-style ``<image>\\nquestion`` medtune's data use) loses that newline: the prompt is then token for token the one
Hulu-Med's processor makes from its own conversation format.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from transformers import BatchFeature

from medtune.errors import MissingFileError, UserError
from medtune.models.vlm.hulumed.config import CONFIG_CLASSES

IMAGE_TOKEN = "<image>"
PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
CHAT_TEMPLATE_FILE = "chat_template.json"
# Hulu-Med's image processor defaults (HulumedImageProcessor.__init__), for keys a preprocessor_config.json omits
IMAGE_DEFAULTS: dict[str, Any] = {
    "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True, "min_tokens": 16, "max_tokens": 16384, "patch_size": 14,
}
# HulumedProcessor's defaults (processor_config.json keys)
PROCESSOR_DEFAULTS: dict[str, Any] = {"image_merge_size": 1, "video_merge_size": 2, "fps": 1, "max_frames": 128}


def _swapped_size(image) -> tuple[int, int]:
    """(height, width) as Hulu-Med reads them: PIL's (width, height) taken as (height, width); arrays (H, W, C)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.size[0], image.size[1]
    return int(image.shape[0]), int(image.shape[1])


def target_sizes(sizes: list[tuple[int, int]], factor: int, min_tokens: int, max_tokens: int) -> list[tuple[int, int]]:
    """Hulu-Med's resize rule (``simple_batched_resize``): round each side to a multiple of ``factor``; the pixel
    budget ``max_tokens * factor^2`` is shared by the images of one call; at least ``min_tokens * factor^2``."""
    min_pixels, max_pixels = min_tokens * factor * factor, max_tokens * factor * factor
    budget = max_pixels // max(len(sizes), 1)
    out = []
    for height, width in sizes:
        h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
        if h_bar * w_bar > budget:
            beta = math.sqrt(height * width / budget)
            h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
        if h_bar * w_bar < min_pixels:
            beta = math.sqrt(min_pixels / (height * width))
            h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
        out.append((h_bar, w_bar))
    return out


class HulumedImageProcessor:
    """Images -> pixel_values [N, C*p*p] float32, grid_sizes [n, 3], merge_sizes [n] (Hulu-Med's image processor)."""

    model_input_names = ["pixel_values", "grid_sizes", "merge_sizes"]

    def __init__(self, **config):
        self.config = {**IMAGE_DEFAULTS, **config}  # every key kept, so save_pretrained writes the file back whole
        for key in IMAGE_DEFAULTS:
            setattr(self, key, self.config[key])

    def _pixels(self, image, size: tuple[int, int]) -> np.ndarray:
        from PIL import Image

        if not isinstance(image, Image.Image):
            array = np.asarray(image)
            if array.dtype != np.uint8:
                raise UserError(f"Hulu-Med image processor: arrays must be uint8 (H, W[, C]) images, got {array.dtype}")
            image = Image.fromarray(array)
        if self.do_convert_rgb:
            image = image.convert("RGB")
        if self.do_resize:
            height, width = size
            image = image.resize((width, height), resample=self.resample)
        pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        pixels = pixels.astype(np.float64) * self.rescale_factor if self.do_rescale else pixels
        pixels = pixels.astype(np.float32)  # (the float64 product cast to float32, as transformers' rescale does)
        if self.do_normalize:
            pixels = (pixels - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return pixels.transpose(2, 0, 1)  # C, H, W

    def __call__(self, images: list, merge_size: int = 1, return_tensors: str | None = "pt") -> BatchFeature:
        images = list(images)
        if not images:
            raise ValueError("Hulu-Med image processor: no image given")
        p, m = self.patch_size, int(merge_size)
        sizes = target_sizes([_swapped_size(im) for im in images], p * m, self.min_tokens, self.max_tokens)
        patches, grids = [], []
        for image, size in zip(images, sizes):
            pixels = self._pixels(image, size)
            c, height, width = pixels.shape
            gh, gw = height // p, width // p
            blocks = pixels[:, :gh * p, :gw * p].reshape(1, c, gh // m, m, p, gw // m, m, p)
            patches.append(blocks.transpose(0, 2, 5, 3, 6, 1, 4, 7).reshape(gh * gw, c * p * p))
            grids.append((1, gh, gw))
        data = {"pixel_values": np.concatenate(patches), "grid_sizes": np.asarray(grids, dtype=np.int64),
                "merge_sizes": np.full((len(images),), m, dtype=np.int64)}
        return BatchFeature(data=data, tensor_type=return_tensors)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.config)


def _render_parts(conversation: list[dict]) -> list[dict]:
    """Drop the newline a text part repeats right after an image part (the template already writes ``<image>\\n``)."""
    out = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            parts, previous_image = [], False
            for part in content:
                if previous_image and isinstance(part, dict) and part.get("type") == "text" \
                        and part.get("text", "").startswith("\n"):
                    part = {**part, "text": part["text"][1:]}
                parts.append(part)
                previous_image = isinstance(part, dict) and part.get("type") == "image"
            message = {**message, "content": parts}
        out.append(message)
    return out


class HulumedProcessor:
    """Tokenizer + image processor + chat template of a Hulu-Med folder, in the call form medtune's ``ChatCodec``
    uses: ``processor(text=[prompt], images=[PIL], return_tensors="pt", add_special_tokens=False)``."""

    def __init__(self, image_processor: HulumedImageProcessor, tokenizer, chat_template: str | None = None,
                 config: dict[str, Any] | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        self.config = {**PROCESSOR_DEFAULTS, **(config or {})}
        self.image_merge_size = int(self.config["image_merge_size"])
        self.image_token = IMAGE_TOKEN
        token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise UserError(f"the tokenizer of this Hulu-Med folder has no {IMAGE_TOKEN} token (added_tokens.json / "
                            "tokenizer.json); use the checkpoint's own tokenizer files")
        self.image_token_id = int(token_id)

    # -- text ---------------------------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation: list[dict], chat_template: str | None = None, tokenize: bool = False,
                            add_generation_prompt: bool = False, **kwargs):
        template = chat_template or self.chat_template
        if not template:
            raise UserError("this Hulu-Med folder has no chat template (chat_template.json or tokenizer_config.json "
                            "chat_template); set model.vlm.chat_template")
        return self.tokenizer.apply_chat_template(_render_parts(conversation), chat_template=template,
                                                  tokenize=tokenize, add_generation_prompt=add_generation_prompt,
                                                  **kwargs)

    def __call__(self, text: str | list[str] | None = None, images: list | None = None,
                 return_tensors: str | None = "pt", add_special_tokens: bool = False, **kwargs) -> BatchFeature:
        if isinstance(text, (list, tuple)):
            if len(text) != 1:
                raise ValueError(f"HulumedProcessor takes one prompt per call (got {len(text)}); batch with "
                                 "medtune's collate")
            text = text[0]
        if text is None:
            raise ValueError("HulumedProcessor needs text")
        images = [im for im in (images or []) if im is not None]
        n_slots = text.count(IMAGE_TOKEN)
        if n_slots != len(images):
            raise ValueError(f"HulumedProcessor: the prompt has {n_slots} {IMAGE_TOKEN} placeholders but "
                             f"{len(images)} images were given")
        data: dict[str, Any] = {}
        if images:
            vision = self.image_processor(images, merge_size=self.image_merge_size, return_tensors="pt")
            counts = [int(t * h * w) // (m * m) for (t, h, w), m in zip(vision["grid_sizes"].tolist(),
                                                                         vision["merge_sizes"].tolist())]
            pieces = text.split(IMAGE_TOKEN)
            text = pieces[0] + "".join(IMAGE_TOKEN * n + piece for n, piece in zip(counts, pieces[1:]))
            data.update(vision)
            data["modals"] = ["image"] * len(images)
        encoded = self.tokenizer(text, add_special_tokens=add_special_tokens, return_tensors=return_tensors)
        data = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], **data}
        return BatchFeature(data=data)

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    # -- folders ------------------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        """Tokenizer files + preprocessor_config.json + processor_config.json + chat_template.json, as a Hulu-Med
        hub folder has them (auto_map kept: the folder stays loadable by Hulu-Med's own code)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(folder))
        image_config = {**self.image_processor.to_dict(), "image_processor_type": "HulumedImageProcessor",
                        "processor_class": "HulumedProcessor"}
        (folder / PREPROCESSOR_FILE).write_text(json.dumps(image_config, indent=2, sort_keys=True) + "\n")
        config = {**self.config, "processor_class": "HulumedProcessor"}
        (folder / PROCESSOR_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if self.chat_template:
            (folder / CHAT_TEMPLATE_FILE).write_text(json.dumps({"chat_template": self.chat_template}, indent=2) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); re-download or re-save the folder") from None


def load_processor(path: str | Path) -> HulumedProcessor:
    """The processor of a Hulu-Med folder, with no code from the folder (the tokenizer with trust_remote_code=False,
    so never transformers' interactive prompt)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / PREPROCESSOR_FILE).is_file():
        raise MissingFileError(f"{path / PREPROCESSOR_FILE} missing: a Hulu-Med folder needs its image processor "
                               "configuration (copy it from the checkpoint the model came from)")
    image_processor = HulumedImageProcessor(**_read_json(path / PREPROCESSOR_FILE))
    settings = _read_json(path / PROCESSOR_FILE) if (path / PROCESSOR_FILE).is_file() else {}
    # The folder's config, read by medtune's class: AutoTokenizer would otherwise read config.json as an unknown
    # model type (its auto_map names code that is never run here)
    model_type = _read_json(path / "config.json").get("model_type") if (path / "config.json").is_file() else None
    config = CONFIG_CLASSES[model_type].from_pretrained(str(path)) if model_type in CONFIG_CLASSES else None
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, config=config)
    template = None
    if (path / CHAT_TEMPLATE_FILE).is_file():
        template = _read_json(path / CHAT_TEMPLATE_FILE).get("chat_template")
    elif (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    return HulumedProcessor(image_processor, tokenizer, template, settings)
