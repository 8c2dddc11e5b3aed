"""Tiny random segmenting-VLM parts for tests and the demo (CPU, seconds, no network).

Real checkpoints ship their tokenizer and chat template; a model built from config classes has neither, so this
module builds a small byte-level BPE tokenizer in code (trained on a fixed sentence list, so it is the same every
time) and fills the packaged ChatML template (``models/assets/tiny_chatml.jinja``) with the VLM's image token.
``save_tiny_parts`` writes a VLM folder and a SAM folder laid out like downloaded checkpoints, so tests exercise the
same loading code as ``model.vlm.vlm_path`` / ``model.vlm.sam_path`` on real ones.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from medtune.errors import UserError

TINY_VLM_KINDS = ("internvl", "llava")
TINY_SAM_KINDS = ("sam2", "sam")
TINY_VLM_IMAGE_SIZE = 56  # 4 x 4 patches of 14 px
TINY_PATCH = 14
TINY_VOCAB = 320  # BPE vocabulary incl. the 256 byte symbols and the special tokens
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 512}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}

CHATML_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
INTERNVL_IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                         "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
LLAVA_IMAGE_TOKEN = "<image>"
# The sentences the tiny BPE merges are learnt from: the default segvlm prompt/answer and chat words.
_CORPUS = [
    "Please segment the object in this image.", "Please segment the vessel in this image.",
    "Please segment the lesion in this image.", "It is [SEG].", "Sure, [SEG].", "There is no object.",
    "user", "assistant", "system", "You are a helpful assistant.", "What is in this image?",
]


def chat_template(image_token: str) -> str:
    text = resources.files("medtune.models").joinpath("assets/tiny_chatml.jinja").read_text()
    return text.replace("IMAGE_TOKEN", image_token)


def tiny_tokenizer(kind: str):
    """A ``PreTrainedTokenizerFast`` with ChatML turn tokens and the image tokens of ``kind``'s processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    image_tokens = list(INTERNVL_IMAGE_TOKENS.values()) if kind == "internvl" else [LLAVA_IMAGE_TOKEN]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=CHATML_SPECIAL + image_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    extra: dict[str, Any] = dict(INTERNVL_IMAGE_TOKENS) if kind == "internvl" else {"image_token": LLAVA_IMAGE_TOKEN}
    image_token = INTERNVL_IMAGE_TOKENS["context_image_token"] if kind == "internvl" else LLAVA_IMAGE_TOKEN
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens=extra, chat_template=chat_template(image_token))


def tiny_vlm_config(kind: str, tokenizer, tie_word_embeddings: bool | None = None):
    """InternVL (InternViT-style tower, pixel shuffle, Qwen2 text) or LLaVA (CLIP tower, Qwen2 text), tiny."""
    from transformers import InternVLConfig, LlavaConfig

    text = dict(TINY_TEXT, model_type="qwen2", vocab_size=len(tokenizer))
    grid = TINY_VLM_IMAGE_SIZE // TINY_PATCH
    if kind == "internvl":
        image_token_id = tokenizer.convert_tokens_to_ids(INTERNVL_IMAGE_TOKENS["context_image_token"])
        cfg = InternVLConfig(
            vision_config=dict(TINY_VISION, image_size=TINY_VLM_IMAGE_SIZE, patch_size=TINY_PATCH),
            text_config=text, image_token_id=image_token_id, image_seq_length=grid * grid // 4, downsample_ratio=0.5,
            tie_word_embeddings=True if tie_word_embeddings is None else tie_word_embeddings,
        )
    elif kind == "llava":
        image_token_id = tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN)
        cfg = LlavaConfig(
            vision_config=dict(TINY_VISION, model_type="clip_vision_model", image_size=TINY_VLM_IMAGE_SIZE,
                               patch_size=TINY_PATCH, projection_dim=TINY_VISION["hidden_size"]),
            text_config=text, image_token_id=image_token_id, image_seq_length=grid * grid,
            vision_feature_layer=-2, vision_feature_select_strategy="default",
            tie_word_embeddings=False if tie_word_embeddings is None else tie_word_embeddings,
        )
    else:
        raise UserError(f"model.config.vlm {kind!r} unknown for the tiny preset; valid: {', '.join(TINY_VLM_KINDS)}")
    cfg.text_config.tie_word_embeddings = cfg.tie_word_embeddings
    return cfg


def tiny_image_processor(kind: str):
    """The checkpoint's own image processor class (PIL backend: no torchvision needed), at the tiny input size."""
    from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

    size = TINY_VLM_IMAGE_SIZE
    if kind == "internvl":
        from transformers.models.got_ocr2 import GotOcr2ImageProcessorPil

        return GotOcr2ImageProcessorPil(size={"height": size, "width": size}, crop_to_patches=False,
                                        image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD)
    from transformers.models.clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def tiny_processor(kind: str, tokenizer, image_processor):
    """The real processor object where transformers can build it without torchvision (LLaVA), else None."""
    if kind != "llava":
        return None
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=TINY_PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=tokenizer.chat_template,
                          image_token=LLAVA_IMAGE_TOKEN)


def tiny_vlm(kind: str, tie_word_embeddings: bool | None = None):
    """(model, tokenizer, image_processor) with random weights."""
    from transformers import AutoModelForImageTextToText

    tokenizer = tiny_tokenizer(kind)
    config = tiny_vlm_config(kind, tokenizer, tie_word_embeddings)
    return AutoModelForImageTextToText.from_config(config), tokenizer, tiny_image_processor(kind)


def tiny_sam(kind: str):
    from transformers import Sam2Model, SamModel

    from medtune.models.sam import tiny_sam2_config, tiny_sam_config

    if kind == "sam2":
        return Sam2Model(tiny_sam2_config())
    if kind == "sam":
        return SamModel(tiny_sam_config(vision_config={"initializer_range": 0.02}))
    raise UserError(f"model.config.sam {kind!r} unknown for the tiny preset; valid: {', '.join(TINY_SAM_KINDS)}")


def save_vlm_folder(model, tokenizer, image_processor, folder: str | Path) -> Path:
    """A VLM folder as a hub download looks: weights, tokenizer (+ chat template), processor configs.

    The processor object itself is saved when transformers can build it here; InternVL's needs torchvision (for
    its video processor), so without it the tokenizer, image processor and ``processor_config.json`` are written
    one by one, in the files a real InternVL-hf folder has.
    """
    folder = Path(folder)
    model.save_pretrained(folder)
    processor = tiny_processor(model.config.model_type, tokenizer, image_processor)
    if processor is not None:
        processor.save_pretrained(folder)
        return folder
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps(
        {"processor_class": "InternVLProcessor", "image_seq_length": model.config.image_seq_length}, indent=2))
    return folder


def save_tiny_parts(out_dir: str | Path, vlm: str = "internvl", sam: str = "sam2", seed: int = 0,
                    tie_word_embeddings: bool | None = None) -> tuple[Path, Path]:
    """Write ``out_dir/vlm`` and ``out_dir/sam`` (random tiny weights); returns (vlm_path, sam_path)."""
    import torch

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model, tokenizer, image_processor = tiny_vlm(vlm, tie_word_embeddings)
    vlm_dir = save_vlm_folder(model, tokenizer, image_processor, out_dir / "vlm")
    sam_dir = out_dir / "sam"
    tiny_sam(sam).save_pretrained(sam_dir)
    return vlm_dir, sam_dir
