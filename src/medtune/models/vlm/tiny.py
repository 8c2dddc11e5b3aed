"""Tiny vision-language models built offline from transformers config classes, for tests, demos and benchmarks.

Chat templates and tokenizers ship with checkpoints, not with the library, so a model built from a config has
neither: this module provides a small byte-level BPE tokenizer (trained on an embedded corpus in well under a
second, deterministic) that knows the image tokens of LLaVA and InternVL, and a Qwen-style chat template
(``<|im_start|>role\\n ... <|im_end|>\\n``). ``tiny_vlm(kind)`` returns a random-weight
``LlavaForConditionalGeneration``, ``InternVLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` or
``Qwen3VLForConditionalGeneration`` (vision hidden 32, text hidden 64, 2 layers each; ~150-250k parameters) and its
processor (the image-only stand-ins of ``processing`` where the full one needs torchvision), which save and load with
plain ``from_pretrained``.
"""
from __future__ import annotations

from typing import Any

from medtune.config import deep_merge
from medtune.errors import UserError

# Words the tokenizer learns merges for: chat roles and the medical question/answer vocabulary of the tests and the
# BUSI benchmark. Anything else still encodes (byte-level), just in more tokens.
_CORPUS = (
    "system user assistant You are a helpful medical assistant. "
    "Is the finding in this image benign, malignant or normal? Answer with one word. "
    "What is the diagnosis for this image: benign, malignant or normal? Classify this image as benign or malignant. "
    "Which category does this image belong to: benign or malignant? Reply with the category only. "
    "The lesion is benign. The lesion is malignant. The tissue looks normal. It is benign. It is malignant. "
    "breast ultrasound lesion tumour tumor cancer cyst mass benign malignant normal yes no left right "
    "What organ is shown? Describe the image. A round lesion. Breast. The answer is"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<img>", "</img>", "<IMG_CONTEXT>",
                  "<video>")
# Qwen-VL's image tokens: "<|vision_start|>" + "<|image_pad|>" x N + "<|vision_end|>"; only the Qwen kinds' tokenizer
# has them, so the other kinds keep the ids their tests were written with.
QWEN_VL_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
TINY_VOCAB = 400
KINDS = ("llava", "internvl", "qwen2_5_vl", "qwen3_vl")
QWEN_KINDS = ("qwen2_5_vl", "qwen3_vl")
# What the chat template writes for an image, which each processor then expands: LLaVA repeats "<image>", InternVL
# wraps "<IMG_CONTEXT>" x N in "<img>...</img>", Qwen-VL repeats "<|image_pad|>" inside the vision markers.
IMAGE_TOKEN = {"llava": "<image>", "internvl": "<IMG_CONTEXT>", "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
               "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>"}
# Qwen-VL vision towers: patch size and the 2x2 merge that turns four patches into one image token
QWEN_PATCH = {"qwen2_5_vl": 14, "qwen3_vl": 16}
QWEN_MERGE = 2
QWEN_TEMPORAL_PATCH = 2  # an image is one frame repeated over the temporal patch


def tiny_chat_template(image_token: str = "<image>") -> str:
    """Qwen-style template: string or [{"type": "image"} | {"type": "text"}] contents, optional generation prompt."""
    return (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{ '" + image_token + "' }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def tiny_tokenizer(kind: str = "llava"):
    """A ~400-token byte-level BPE tokenizer with the chat and image special tokens (offline, deterministic); the Qwen
    kinds' also has Qwen-VL's vision tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([_CORPUS] * 4, trainer)
    if kind in QWEN_KINDS:
        from tokenizers import AddedToken

        backend.add_special_tokens([AddedToken(t, special=True) for t in QWEN_VL_TOKENS])
    named = {"image_token": "<image>", "start_image_token": "<img>", "end_image_token": "</img>",
             "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
    if kind in QWEN_KINDS:  # the names Qwen-VL's processor reads its image / video tokens from
        named.update(image_token="<|image_pad|>", video_token="<|video_pad|>", vision_bos_token="<|vision_start|>",
                     vision_eos_token="<|vision_end|>")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens=named)



def _text_config(vocab_size: int, overrides: dict) -> dict:
    return deep_merge({"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab_size,
                        "max_position_embeddings": 1024, "tie_word_embeddings": False}, overrides)


def tiny_vlm_config(kind: str, tokenizer, overrides: dict | None = None):
    """LlavaConfig / InternVLConfig of the tiny model; ``overrides`` may set ``image_size``, ``vision_config``,
    ``text_config`` (merged into the defaults) and any top-level config key."""
    from transformers import CLIPVisionConfig, InternVLConfig, InternVLVisionConfig, LlavaConfig, Qwen2Config

    over = dict(overrides or {})
    if kind in QWEN_KINDS:
        return _qwen_vl_config(kind, tokenizer, over)
    image_size = int(over.pop("image_size", 32 if kind == "llava" else 28))
    vision_over, text_over = over.pop("vision_config", {}), over.pop("text_config", {})
    text = Qwen2Config(**_text_config(len(tokenizer), text_over))
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[kind])
    if kind == "llava":
        vision = CLIPVisionConfig(**deep_merge({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                "num_attention_heads": 2, "image_size": image_size, "patch_size": 8,
                                                "projection_dim": 32}, vision_over))
        return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                           vision_feature_select_strategy="default", vision_feature_layer=-1, **over)
    if kind == "internvl":
        vision = InternVLVisionConfig(**deep_merge({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                     "num_attention_heads": 2, "image_size": [image_size, image_size],
                                                     "patch_size": [7, 7]}, vision_over))
        return InternVLConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                              downsample_ratio=0.5, **over)
    raise UserError(f"model.config.vlm {kind!r} unknown; valid: {', '.join(KINDS)}")


def _qwen_vl_config(kind: str, tokenizer, over: dict):
    """Qwen2.5-VL / Qwen3-VL: a 2-layer vision tower (window attention / deepstack as the real ones) and a 2-layer
    text model with multimodal RoPE sections that sum to half the head dimension (16)."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    vision_over, text_over = over.pop("vision_config", {}), over.pop("text_config", {})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_VL_TOKENS}
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    text = _text_config(len(tokenizer), {"head_dim": 16, "bos_token_id": None, "eos_token_id": None,
                                         "pad_token_id": tokenizer.pad_token_id, **text_over})
    text.pop("model_type")
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
              "patch_size": QWEN_PATCH[kind], "spatial_merge_size": QWEN_MERGE,
              "temporal_patch_size": QWEN_TEMPORAL_PATCH}
    if kind == "qwen2_5_vl":
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 2, 4]}
        vision.update(window_size=4 * QWEN_PATCH[kind], fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=deep_merge(vision, vision_over), **special, **over)
    text["rope_scaling"] = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    vision.update(num_position_embeddings=64, deepstack_visual_indexes=[1])
    return Qwen3VLConfig(text_config=text, vision_config=deep_merge(vision, vision_over), **special, **over)


def tiny_processor(kind: str, config, tokenizer, chat_template: str | None = None):
    """The processor that matches ``config`` (image size, number of image tokens) with the tiny chat template."""
    template = chat_template or tiny_chat_template(IMAGE_TOKEN[kind])
    vision = config.vision_config
    if kind in QWEN_KINDS:
        from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

        from medtune.models.vlm.processing import IMAGE_ONLY

        # images resized to between 2x2 and 4x4 merged tokens (4-16 image tokens): small, but several grid shapes
        unit = vision.patch_size * vision.spatial_merge_size
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=(2 * unit) ** 2, max_pixels=(4 * unit) ** 2, patch_size=vision.patch_size,
            merge_size=vision.spatial_merge_size, temporal_patch_size=vision.temporal_patch_size)
        return IMAGE_ONLY[kind][0](image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
    if kind == "llava":
        from transformers import LlavaProcessor
        from transformers.models.llava import LlavaImageProcessorPil

        size = int(vision.image_size)
        image_processor = LlavaImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        # CLIP adds a CLS token; the "default" feature strategy drops it again
        return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                              vision_feature_select_strategy=config.vision_feature_select_strategy,
                              num_additional_image_tokens=1, chat_template=template)
    from transformers.models.got_ocr2 import GotOcr2ImageProcessorPil

    from medtune.models.vlm.processing import ImageOnlyInternVLProcessor

    size = int(vision.image_size[0])
    # one tile per image (no dynamic crops): a fixed, small number of image tokens
    image_processor = GotOcr2ImageProcessorPil(size={"height": size, "width": size}, crop_to_patches=False,
                                               min_patches=1, max_patches=1)
    per_tile = int((size // vision.patch_size[0]) ** 2 * config.downsample_ratio ** 2)
    return ImageOnlyInternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                      image_seq_length=per_tile, chat_template=template)


def tiny_vlm(kind: str = "llava", overrides: dict[str, Any] | None = None, seed: int | None = None):
    """(random-weight model, processor) of the tiny ``kind`` VLM; ``seed`` fixes the weights."""
    import torch
    from transformers import (
        InternVLForConditionalGeneration,
        LlavaForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
    )

    if kind not in KINDS:
        raise UserError(f"model.config.vlm {kind!r} unknown; valid: {', '.join(KINDS)}")
    tokenizer = tiny_tokenizer(kind)
    config = tiny_vlm_config(kind, tokenizer, overrides)
    processor = tiny_processor(kind, config, tokenizer)
    cls = {"llava": LlavaForConditionalGeneration, "internvl": InternVLForConditionalGeneration,
           "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen3_vl": Qwen3VLForConditionalGeneration}[kind]
    if seed is not None:
        torch.manual_seed(seed)
    net = cls(config)
    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    net.generation_config.eos_token_id = stop
    net.generation_config.pad_token_id = tokenizer.pad_token_id
    return net, processor


def save_tiny_vlm(folder, kind: str = "llava", seed: int = 0, overrides: dict[str, Any] | None = None):
    """Write a tiny VLM + processor folder that ``model.path`` (family vlm) loads; returns the folder."""
    from pathlib import Path

    from medtune.models.vlm.processing import save_processor

    folder = Path(folder)
    net, processor = tiny_vlm(kind, overrides, seed=seed)
    net.save_pretrained(str(folder), safe_serialization=True)
    save_processor(processor, folder)
    return folder
