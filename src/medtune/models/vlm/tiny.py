"""Tiny vision-language models built offline from transformers config classes, for tests, demos and benchmarks.

Chat templates and tokenizers ship with checkpoints, not with the library, so a model built from a config has
neither: this module provides a small byte-level BPE tokenizer (trained on an embedded corpus in well under a
second, deterministic) that knows the image tokens of LLaVA and InternVL, and a Qwen-style chat template
(``<|im_start|>role\\n ... <|im_end|>\\n``). ``tiny_vlm(kind)`` returns a random-weight
``LlavaForConditionalGeneration`` or ``InternVLForConditionalGeneration`` (vision hidden 32, text Qwen2 hidden 64,
2 layers each; ~150k parameters) and its processor, which save and load with plain ``from_pretrained``.
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
TINY_VOCAB = 400
KINDS = ("llava", "internvl")
# The image token each model's processor expands: LLaVA repeats "<image>", InternVL wraps "<IMG_CONTEXT>" x N in
# "<img>...</img>".
IMAGE_TOKEN = {"llava": "<image>", "internvl": "<IMG_CONTEXT>"}


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


def tiny_tokenizer():
    """A ~400-token byte-level BPE tokenizer with the chat and image special tokens (offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([_CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    )



def _text_config(vocab_size: int, overrides: dict) -> dict:
    return deep_merge({"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab_size,
                        "max_position_embeddings": 1024, "tie_word_embeddings": False}, overrides)


def tiny_vlm_config(kind: str, tokenizer, overrides: dict | None = None):
    """LlavaConfig / InternVLConfig of the tiny model; ``overrides`` may set ``image_size``, ``vision_config``,
    ``text_config`` (merged into the defaults) and any top-level config key."""
    from transformers import CLIPVisionConfig, InternVLConfig, InternVLVisionConfig, LlavaConfig, Qwen2Config

    over = dict(overrides or {})
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


def tiny_processor(kind: str, config, tokenizer, chat_template: str | None = None):
    """The processor that matches ``config`` (image size, number of image tokens) with the tiny chat template."""
    template = chat_template or tiny_chat_template(IMAGE_TOKEN[kind])
    vision = config.vision_config
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
    from transformers import InternVLForConditionalGeneration, LlavaForConditionalGeneration

    tokenizer = tiny_tokenizer()
    config = tiny_vlm_config(kind, tokenizer, overrides)
    processor = tiny_processor(kind, config, tokenizer)
    cls = LlavaForConditionalGeneration if kind == "llava" else InternVLForConditionalGeneration
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
