"""What the segmenting VLM adds to a VLM's loading: where its parts come from, the SAM / SAM 2 checkpoint, the
composed folder's layout, and the ``[SEG]`` token. The VLM itself (network, processor) loads with the plain VLM's
``models.vlm.model.load_vlm_folder``.

Where the parts come from (``resolve_sources``): ``model.path`` = a composed folder written by ``save_base`` or the
Sa2VA importer (``vlm/``, ``sam/``, ``projection.safetensors``, ``segvlm.json``); or ``model.vlm.vlm_path`` +
``model.vlm.sam_path`` = a VLM checkpoint and a SAM checkpoint as downloaded; or neither, with ``model.config.preset:
tiny`` for random tiny parts (tests, demo).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medtune.config import Config
from medtune.errors import UserError
from medtune.models.hf import load_pretrained, read_config_json, resolve_local_folder

log = logging.getLogger(__name__)

SEGVLM_JSON = "segvlm.json"
FORMAT_VERSION = 1
VLM_DIR, SAM_DIR, PROJECTION_FILE = "vlm", "sam", "projection.safetensors"
# segvlm.json keys: the mean / std SAM's input is normalised with (absent: ImageNet's). The Sa2VA importer writes the
# bf16-rounded values Sa2VA's preprocess_image uses; save_base carries them on.
SAM_MEAN_KEY, SAM_STD_KEY = "sam_image_mean", "sam_image_std"
# SAM checkpoints by config model_type -> the class loaded. A SAM 2 video checkpoint (facebook/sam2.1-hiera-tiny)
# loads as Sam2VideoModel: the same image encoder / prompt encoder / mask decoder, plus the memory a segmenting VLM
# runs videos with (kept through training and export; trained only on clips).
SAM_MODEL_TYPES = {"sam": "sam", "sam2": "sam2", "sam2_video": "sam2_video"}
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
    """``model.config`` for random tiny parts: {preset: tiny, vlm: any tiny VLM kind, sam: sam2|sam}."""
    from medtune.models.vlm.seg.tiny import TINY_SAM_KINDS
    from medtune.models.vlm.tiny import KINDS as TINY_VLM_KINDS

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


def is_video_sam(sam: nn.Module) -> bool:
    """Whether the mask head is a SAM 2 video model (memory attention, memory encoder, object pointers)."""
    return type(sam).__name__ == "Sam2VideoModel"


def trains_on_clips(cfg: Config) -> bool:
    """Whether the run trains a segmenting VLM on video clips (its SAM 2 memory then trains as ``model.video``
    says; otherwise the memory parts stay frozen: no image loss reaches them)."""
    return cfg.task_kind() == "video"


def load_sam(path: Path, key: str) -> nn.Module:
    from transformers import Sam2Model, SamModel

    meta = read_config_json(path)
    model_type = meta.get("model_type")
    if model_type not in SAM_MODEL_TYPES:
        raise UserError(
            f"{key} {str(path)!r} holds a {model_type!r} model, not SAM or SAM 2 (config.json model_type sam, sam2 "
            f"or sam2_video); point {key} at a SAM checkpoint folder such as facebook/sam2.1-hiera-tiny"
        )
    kind = SAM_MODEL_TYPES[model_type]
    if kind == "sam":
        net = load_pretrained(SamModel, path, dtype=torch.float32)
    elif kind == "sam2_video":  # memories narrower than transformers' fixed width (a shrunk import) are refitted
        from medtune.models.video import load_sam2_video

        net = load_sam2_video(path, dtype=torch.float32)
    else:
        net = load_pretrained(Sam2Model, path, dtype=torch.float32)
    prepare_sam(net)
    return net


def prepare_sam(net: nn.Module) -> None:
    if sam_kind(net) == "sam2":
        # Training and evaluation must run the same function: never swap in another mask token in eval mode.
        net.mask_decoder.dynamic_multimask_via_stability = False


# ------------------------------------------------------------------------------------------------ VLM
def check_vlm_folder(path: Path, key: str) -> None:
    """One line for the two ways a VLM folder of a segvlm run is mistaken: a composed folder, a SAM folder."""
    if (path / SEGVLM_JSON).is_file():
        raise UserError(f"{key} {str(path)!r} is a composed segvlm folder (it has {SEGVLM_JSON}); set model.path to "
                         "it instead of model.vlm.vlm_path / sam_path")
    model_type = read_config_json(path).get("model_type")
    if model_type in SAM_MODEL_TYPES:
        raise UserError(f"{key} {str(path)!r} holds a {model_type!r} (SAM) model, not a VLM; point {key} at a VLM "
                         "folder (e.g. InternVL3-1B-hf) and model.vlm.sam_path at the SAM folder")


def module_name(root: nn.Module, target: nn.Module) -> str:
    return next(n for n, m in root.named_modules() if m is target)


def embeddings_tied(vlm: nn.Module) -> bool:
    out = vlm.get_output_embeddings()
    return out is not None and out.weight is vlm.get_input_embeddings().weight


def vision_unused_regex(vlm: nn.Module, vision: str | None, prefix: str) -> str | None:
    """Vision-tower parameters that never reach the image features (layers after ``vision_feature_layer``, CLIP's
    post-layernorm), as a regex over full names (``prefix`` + the tower's name ``vision`` in ``vlm``); None when
    everything is used."""
    layer = getattr(vlm.config, "vision_feature_layer", -1)
    if vision is None or not isinstance(layer, int):
        return None
    tower = vlm.get_submodule(vision)
    blocks = next((m for n, m in tower.named_modules() if n.endswith(("encoder.layer", "encoder.layers"))), None)
    unused = []
    if blocks is not None and layer < -1:
        first_unused = len(blocks) + 1 + layer
        idx = "|".join(str(i) for i in range(first_unused, len(blocks)))
        unused.append(rf"{re.escape(module_name(tower, blocks))}\.(?:{idx})\.")
    if vlm.config.model_type == "llava":
        unused.append(r"(?:vision_model\.)?post_layernorm\.")  # CLIP's pooled output is not used by LLaVA
    if not unused:
        return None
    return rf"{re.escape(prefix + vision)}\.(?:{'|'.join(unused)})"


def check_template_has_image(codec, where: str) -> None:
    """A chat template that drops the image would leave the processor's image without its tokens: one line here,
    not transformers' feature-count error deep in the forward."""
    from medtune.data.conversations import IMAGE_PLACEHOLDER

    token = getattr(codec.processor, "image_token", None)
    text = codec.render([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "probe"}]}], True)
    if token and token not in text:
        raise UserError(f"the chat template of {where} renders a user turn with an image as {text!r}: no image "
                         f"placeholder {token!r} ({IMAGE_PLACEHOLDER} in a conversation). Set model.vlm.chat_template "
                         "to a template that renders {'type': 'image'} content items as that token")


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
