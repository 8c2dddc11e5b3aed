"""Loading the parts of a segmenting VLM from local folders, with one-line errors for the ways they go wrong.

Where the parts come from (``resolve_sources``): ``model.path`` = a composed folder written by ``save_base``
(``vlm/``, ``sam/``, ``projection.safetensors``, ``segvlm.json``); or ``model.vlm.vlm_path`` + ``model.vlm.sam_path``
= a VLM checkpoint and a SAM checkpoint as downloaded; or neither, with ``model.config.preset: tiny`` for random
tiny parts (tests, demo).

The VLM's text side (tokenizer, chat template, image placeholder) is gathered in ``Processing``. The number of
image tokens comes from the checkpoint's own processor class (its ``__call__`` on a dummy image, one tile), so the
placeholder always matches what transformers itself would feed the model. InternVL's processor cannot be built
without torchvision (it insists on a video processor); there the same rule as ``InternVLProcessor.
replace_image_token`` is applied to the tokenizer's image tokens and ``processor_config.json``'s
``image_seq_length``, and the build checks the count against the model config either way.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medtune.config import Config
from medtune.errors import UserError
from medtune.models.hf import load_kwargs, load_pretrained, read_config_json, resolve_local_folder

log = logging.getLogger(__name__)

SEGVLM_JSON = "segvlm.json"
FORMAT_VERSION = 1
VLM_DIR, SAM_DIR, PROJECTION_FILE = "vlm", "sam", "projection.safetensors"
# segvlm.json keys: the mean / std SAM's input is normalised with (absent: ImageNet's). The Sa2VA importer writes the
# bf16-rounded values Sa2VA's preprocess_image uses; save_base carries them on.
SAM_MEAN_KEY, SAM_STD_KEY = "sam_image_mean", "sam_image_std"
# SAM checkpoints by config model_type -> the single-image class used (a SAM 2 video checkpoint such as
# facebook/sam2.1-hiera-tiny holds the same image encoder / prompt encoder / mask decoder weights).
SAM_MODEL_TYPES = {"sam": "sam", "sam2": "sam2", "sam2_video": "sam2"}
# VLMs whose pixel_values are [N, 3, S, S] tiles (one per image, or InternVL's dynamic tiles) and whose image
# placeholder expands to a fixed number of tokens per tile: images.ImagePrep makes the tiles, the codec the tokens.
SUPPORTED_VLM_TYPES = ("internvl", "llava")
# processor kwargs that make one image one tile (the whole image resized to the vision tower's input size)
SINGLE_TILE_KWARGS: dict[str, dict[str, Any]] = {"internvl": {"crop_to_patches": False}}
# extra processor files copied through save_base when transformers could not build the processor object here
PROCESSOR_FILES = ("processor_config.json", "video_preprocessor_config.json")
TINY_KEYS = {"preset", "vlm", "sam", "tie_word_embeddings"}


@dataclass
class Sources:
    vlm: Path | None = None
    sam: Path | None = None
    composed: Path | None = None  # model.path: a save_base folder
    meta: dict[str, Any] = field(default_factory=dict)  # its segvlm.json


def resolve_sources(cfg: Config) -> Sources | None:
    """The local folders to load, checked (existence, remote code policy); None = random tiny parts."""
    vcfg, path = cfg.model.vlm, cfg.model.path
    if path is not None and (vcfg.vlm_path or vcfg.sam_path):
        raise UserError("segvlm: set either model.path (a composed folder from `medtune export`) or "
                         "model.vlm.vlm_path + model.vlm.sam_path (the parts), not both")
    if path is not None:
        folder = resolve_local_folder(path, "model.path", cfg)
        meta_file = folder / SEGVLM_JSON
        if not meta_file.is_file():
            raise UserError(
                f"model.path {path!r} has no {SEGVLM_JSON}, so it is not a composed segvlm folder. To compose a VLM "
                "and a SAM checkpoint, set model.vlm.vlm_path and model.vlm.sam_path instead (model.path is for "
                "folders written by `medtune export` of a segvlm run)"
            )
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise UserError(f"{meta_file} has format {meta.get('format')!r}; this medtune reads format "
                             f"{FORMAT_VERSION}. Re-export the model with this version")
        return Sources(vlm=resolve_local_folder(str(folder / VLM_DIR), "model.path (vlm/)", cfg),
                       sam=resolve_local_folder(str(folder / SAM_DIR), "model.path (sam/)", cfg),
                       composed=folder, meta=meta)
    if vcfg.vlm_path or vcfg.sam_path:
        if not (vcfg.vlm_path and vcfg.sam_path):
            missing = "model.vlm.sam_path" if vcfg.vlm_path else "model.vlm.vlm_path"
            raise UserError(f"segvlm composes a VLM and a SAM: {missing} is not set (point it at a local folder)")
        return Sources(vlm=resolve_local_folder(vcfg.vlm_path, "model.vlm.vlm_path", cfg),
                       sam=resolve_local_folder(vcfg.sam_path, "model.vlm.sam_path", cfg))
    return None


def tiny_choice(cfg: Config) -> dict[str, Any]:
    """``model.config`` for random tiny parts: {preset: tiny, vlm: internvl|llava, sam: sam2|sam}."""
    from medtune.models.vlm.seg.tiny import TINY_SAM_KINDS, TINY_VLM_KINDS

    conf = dict(cfg.model.config)
    if conf.get("preset") != "tiny":
        raise UserError(
            "segvlm needs its parts: model.vlm.vlm_path (a local VLM folder, e.g. InternVL3-1B-hf) + "
            "model.vlm.sam_path (a SAM / SAM 2 folder), or model.path (a composed folder from `medtune export`), "
            "or model.config: {preset: tiny} for random tiny parts (tests, demo)"
        )
    unknown = sorted(set(conf) - TINY_KEYS)
    if unknown:
        raise UserError(f"model.config keys {unknown} unknown for segvlm; valid: {sorted(TINY_KEYS)}")
    choice = {"vlm": conf.get("vlm", "internvl"), "sam": conf.get("sam", "sam2"),
              "tie_word_embeddings": conf.get("tie_word_embeddings")}
    if choice["vlm"] not in TINY_VLM_KINDS:
        raise UserError(f"model.config.vlm {choice['vlm']!r} unknown; valid: {', '.join(TINY_VLM_KINDS)}")
    if choice["sam"] not in TINY_SAM_KINDS:
        raise UserError(f"model.config.sam {choice['sam']!r} unknown; valid: {', '.join(TINY_SAM_KINDS)}")
    return choice


# ------------------------------------------------------------------------------------------------ SAM
def sam_kind(sam: nn.Module) -> str:
    return "sam2" if type(sam).__name__.startswith("Sam2") else "sam"


def load_sam(path: Path, key: str) -> nn.Module:
    from transformers import Sam2Config, Sam2Model, SamModel

    meta = read_config_json(path)
    model_type = meta.get("model_type")
    if model_type not in SAM_MODEL_TYPES:
        raise UserError(
            f"{key} {str(path)!r} holds a {model_type!r} model, not SAM or SAM 2 (config.json model_type sam, sam2 "
            f"or sam2_video); point {key} at a SAM checkpoint folder such as facebook/sam2.1-hiera-tiny"
        )
    if SAM_MODEL_TYPES[model_type] == "sam":
        net = load_pretrained(SamModel, path, dtype=torch.float32)
    else:
        # Build the image model's config from the checkpoint's sub-configs, so a video checkpoint loads without
        # transformers' "model of type sam2_video" warning (the extra memory weights are simply not used).
        config = Sam2Config(**{k: meta[k] for k in ("vision_config", "prompt_encoder_config", "mask_decoder_config")
                               if k in meta})
        net = load_pretrained(Sam2Model, path, config=config, dtype=torch.float32)
    prepare_sam(net)
    return net


def prepare_sam(net: nn.Module) -> None:
    if sam_kind(net) == "sam2":
        # Training and evaluation must run the same function: never swap in another mask token in eval mode.
        net.mask_decoder.dynamic_multimask_via_stability = False


# ------------------------------------------------------------------------------------------------ VLM
def load_vlm(path: Path, key: str, cfg: Config) -> nn.Module:
    from transformers import AutoModelForImageTextToText

    if (path / SEGVLM_JSON).is_file():
        raise UserError(f"{key} {str(path)!r} is a composed segvlm folder (it has {SEGVLM_JSON}); set model.path to "
                         "it instead of model.vlm.vlm_path / sam_path")
    meta = read_config_json(path)
    model_type = meta.get("model_type")
    if model_type in SAM_MODEL_TYPES:
        raise UserError(f"{key} {str(path)!r} holds a {model_type!r} (SAM) model, not a VLM; point {key} at a VLM "
                         "folder (e.g. InternVL3-1B-hf) and model.vlm.sam_path at the SAM folder")
    if model_type not in SUPPORTED_VLM_TYPES:
        raise UserError(
            f"{key} {str(path)!r} holds a {model_type!r} model; segvlm supports {', '.join(SUPPORTED_VLM_TYPES)} "
            "(transformers-native checkpoints, e.g. OpenGVLab/InternVL3-1B-hf or llava-hf/*: one image tile and a "
            "fixed number of image tokens, so the image preprocessing runs in torch)"
        )
    # Under QLoRA, everything but the language model's linears stays unquantised.
    keep = ["lm_head", "multi_modal_projector", "vision_tower"]
    return load_pretrained(AutoModelForImageTextToText, path, **load_kwargs(cfg, keep))


def module_name(root: nn.Module, target: nn.Module) -> str:
    return next(n for n, m in root.named_modules() if m is target)


def language_model(vlm: nn.Module) -> nn.Module:
    return vlm.get_decoder()


def vision_tower(vlm: nn.Module) -> nn.Module:
    return vlm.model.vision_tower


def projector(vlm: nn.Module) -> nn.Module:
    return vlm.model.multi_modal_projector


def embeddings_tied(vlm: nn.Module) -> bool:
    out = vlm.get_output_embeddings()
    return out is not None and out.weight is vlm.get_input_embeddings().weight


def vision_unused_regex(vlm: nn.Module, prefix: str) -> str | None:
    """Vision-tower parameters that never reach the image features (layers after ``vision_feature_layer``, CLIP's
    post-layernorm), as a regex over full names under ``prefix``; None when everything is used."""
    layer = getattr(vlm.config, "vision_feature_layer", -1)
    if not isinstance(layer, int):
        return None
    tower = vision_tower(vlm)
    blocks = next((m for n, m in tower.named_modules() if n.endswith(("encoder.layer", "encoder.layers"))), None)
    unused = []
    if blocks is not None and layer < -1:
        first_unused = len(blocks) + 1 + layer
        block_name = module_name(tower, blocks)
        idx = "|".join(str(i) for i in range(first_unused, len(blocks)))
        unused.append(rf"{_escape(block_name)}\.(?:{idx})\.")
    if vlm.config.model_type == "llava":
        unused.append(r"(?:vision_model\.)?post_layernorm\.")  # CLIP's pooled output is not used by LLaVA
    if not unused:
        return None
    return rf"{_escape(prefix)}\.(?:{'|'.join(unused)})"


def linear_regex(root: nn.Module, prefix: str) -> str:
    """Alternation of anchored patterns for every ``nn.Linear`` under ``prefix`` (layer numbers as ``\\d+``)."""
    names = [n for n, m in root.named_modules() if n.startswith(prefix + ".") and isinstance(m, nn.Linear)
             and not any(part == "base_layer" or part.startswith("lora_") for part in n.split("."))]
    patterns = sorted({r"\.".join(r"\d+" if part.isdigit() else _escape(part) for part in n.split("."))
                       for n in names})
    return "|".join(patterns)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


# ------------------------------------------------------------------------------------------------ text side
@dataclass
class Processing:
    """The VLM's tokenizer, image processor (for its input size / mean / std) and, when transformers can build it
    here, the processor object itself; plus the chat template and the expanded image placeholder."""

    tokenizer: Any
    image_processor: Any
    processor: Any | None
    chat_template: str
    image_token: str
    placeholder_ids: list[int]
    seg_token_id: int
    source_files: dict[str, str] = field(default_factory=dict)  # processor files to carry through save_base

    def save(self, folder: Path) -> None:
        self.tokenizer.chat_template = self.chat_template
        if self.processor is not None:
            self.processor.chat_template = self.chat_template
            self.processor.save_pretrained(str(folder))
            return
        self.tokenizer.save_pretrained(str(folder))
        self.image_processor.save_pretrained(str(folder))
        for name, text in self.source_files.items():
            (folder / name).write_text(text)


def load_processing(path: Path, key: str, vlm: nn.Module, seg_token: str, chat_template_cfg: str | None
                    ) -> Processing:
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    processor, source_files = None, {}
    try:
        processor = AutoProcessor.from_pretrained(str(path))
    except (ValueError, ImportError, OSError, TypeError) as err:
        if _has_torchvision():
            raise UserError(f"{key} {str(path)!r}: transformers cannot load its processor ({err}); the folder "
                             "needs its tokenizer and processor files (as downloaded)") from None
        # InternVL's processor requires a video processor, which requires torchvision: load the parts directly.
        log.info("processor of %s not buildable without torchvision (%s); loading tokenizer and image processor",
                 path, str(err).splitlines()[0][:120])
        for name in PROCESSOR_FILES:
            if (path / name).is_file():
                source_files[name] = (path / name).read_text()
    if processor is not None and not hasattr(processor, "tokenizer"):
        raise UserError(f"{key} {str(path)!r}: its processor ({type(processor).__name__}) has no tokenizer; "
                         "point it at a VLM folder as downloaded (with tokenizer files)")
    tokenizer = processor.tokenizer if processor is not None else AutoTokenizer.from_pretrained(str(path))
    image_processor = (processor.image_processor if processor is not None
                       else AutoImageProcessor.from_pretrained(str(path)))
    seq_len = json.loads(source_files["processor_config.json"]).get("image_seq_length") \
        if "processor_config.json" in source_files else None
    template, template_source = resolve_chat_template(chat_template_cfg, processor, tokenizer, f"{key} {str(path)!r}")
    return build_processing(tokenizer, image_processor, processor, vlm, seg_token, f"{key} {str(path)!r}",
                            template, template_source, seq_len, source_files)


def _has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def resolve_chat_template(cfg_value: str | None, processor, tokenizer, where: str) -> tuple[str, str]:
    """(template text, where it came from): ``model.vlm.chat_template`` (a file or the text) over the checkpoint's."""
    if cfg_value:
        candidate = Path(cfg_value).expanduser()
        if "{" not in cfg_value and candidate.is_file():
            return candidate.read_text(), f"model.vlm.chat_template file {str(candidate)!r}"
        if "{%" in cfg_value or "{{" in cfg_value:
            return cfg_value, "model.vlm.chat_template"
        raise UserError(f"model.vlm.chat_template {cfg_value!r} is neither an existing file nor Jinja template text")
    for owner in (processor, tokenizer):
        template = getattr(owner, "chat_template", None) if owner is not None else None
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            return template, f"the chat template of {where}"
    raise UserError(f"{where} has no chat template (chat_template.jinja / tokenizer_config.json); set "
                     "model.vlm.chat_template to a Jinja template file for this model's turn format")


def build_processing(tokenizer, image_processor, processor, vlm: nn.Module, seg_token: str, where: str, template: str,
                     template_source: str, image_seq_length: int | None = None,
                     source_files: dict[str, str] | None = None) -> Processing:
    """Add [SEG] (first: a tokenizer that splits it splits the image tokens too), expand the image placeholder,
    check it against the model config and the chat template."""
    seg_id = add_seg_token(tokenizer, seg_token, where)
    model_type = vlm.config.model_type
    if processor is not None:
        image_token = processor.image_token
        placeholder = _processor_placeholder(processor, model_type)
    elif model_type == "internvl":
        # The rule of InternVLProcessor.replace_image_token for one tile.
        image_token = tokenizer.context_image_token
        n = image_seq_length or vlm.config.image_seq_length
        placeholder = tokenizer(tokenizer.start_image_token + image_token * n + tokenizer.end_image_token,
                                add_special_tokens=False)["input_ids"]
    else:
        raise UserError(f"transformers could not build the {model_type} processor from the VLM folder; "
                         "the folder needs its processor files (processor_config.json / preprocessor_config.json)")
    image_token_id = vlm.config.image_token_id
    n_image = sum(1 for i in placeholder if i == image_token_id)
    expected = getattr(vlm.config, "image_seq_length", None)
    if n_image == 0 or (expected is not None and n_image != expected):
        raise UserError(f"the processor expands one image to {n_image} image tokens (id {image_token_id}) but the "
                         f"model config expects {expected}: the processor files and config.json of the VLM folder "
                         "disagree (image size / patch size / image_seq_length)")
    check_template_has_image(tokenizer, template, image_token, template_source)
    return Processing(tokenizer, image_processor, processor, template, image_token, list(placeholder), seg_id,
                      dict(source_files or {}))


def _processor_placeholder(processor, model_type: str) -> list[int]:
    from PIL import Image

    size = _image_size(processor.image_processor) or (64, 64)
    dummy = Image.new("RGB", (size[1], size[0]))
    out = processor(text=[processor.image_token], images=[dummy], add_special_tokens=False,
                    **SINGLE_TILE_KWARGS.get(model_type, {}))
    return [int(i) for i in out["input_ids"][0]]


def _image_size(image_processor) -> tuple[int, int] | None:
    for attr in ("crop_size", "size"):
        size = getattr(image_processor, attr, None)
        if size is None:
            continue
        height, width = _get(size, "height"), _get(size, "width")
        if height and width:
            return int(height), int(width)
        edge = _get(size, "shortest_edge")
        if edge:
            return int(edge), int(edge)
    return None


def _get(obj, key):
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def user_turn(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def check_template_has_image(tokenizer, template: str, image_token: str, source: str) -> None:
    text = render(tokenizer, template, user_turn("probe"), add_generation_prompt=True)
    if text.count(image_token) != 1:
        raise UserError(f"{source} renders a user turn with an image as {text!r}: it does not place the image "
                         f"placeholder {image_token!r} exactly once. Set model.vlm.chat_template to a template that "
                         "renders {'type': 'image'} content items as that token")


# ------------------------------------------------------------------------------------------------ [SEG]
def add_seg_token(tokenizer, seg_token: str, where: str) -> int:
    """Add ``seg_token`` as one special token (no-op when present) and return its id; refuse a token that the
    tokenizer would split (each piece would become a mask)."""
    tokenizer.add_tokens([seg_token], special_tokens=True)
    seg_id = tokenizer.convert_tokens_to_ids(seg_token)
    alone = tokenizer(seg_token, add_special_tokens=False)["input_ids"]
    in_text = tokenizer(f"It is {seg_token}.", add_special_tokens=False)["input_ids"]
    if alone != [seg_id] or in_text.count(seg_id) != 1:
        raise UserError(
            f"model.vlm.seg_token {seg_token!r} tokenises to {len(alone)} ids {alone} with the tokenizer of {where}, "
            "not one: every piece would ask for a mask. Use a seg_token the tokenizer keeps whole (added special "
            "tokens are, unless tokenizer_config.json sets split_special_tokens: true)"
        )
    return seg_id


def fit_embeddings(vlm: nn.Module, tokenizer) -> None:
    """Grow the embedding (and untied output) matrices when the tokenizer outgrew them (new rows: the mean)."""
    rows = vlm.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        vlm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
