"""Family ``vlm``: instruction tuning of a vision-language model (LLaVA / InternVL / Qwen-VL style; Hulu-Med through
medtune's own implementation in ``models/vlm/hulumed``; another remote-code model when ``model.trust_remote_code`` is set)
on image + conversation data.

The network is whatever ``from_pretrained`` builds from a local folder (``AutoModelForImageTextToText``, or
``AutoModelForCausalLM`` for remote code), with the folder's processor; ``model.config: {preset: tiny, vlm: llava |
internvl | qwen2_5_vl | qwen3_vl}`` builds the offline tiny models of ``models.vlm.tiny``. What this module adds is
where things go wrong silently:

* LoRA placement: vision towers reuse the language model's layer names (``q_proj`` ...), so the default targets are
  one anchored regex over the *full* names of the language model's linear layers, and ``after_lora`` refuses any
  adapter in the vision tower (unless ``model.vlm.vision_lora``) or the projector, and checks that the projector
  trains exactly when ``model.vlm.train_projector`` asks (through ``modules_to_save``, after wrapping).
* Labels: ``ChatCodec`` renders the conversation with the model's own chat template turn by turn and tokenises the
  pieces separately, so exactly the assistant answers and their end-of-turn token are supervised, whatever the
  template, and a generation prompt is token for token the training prompt.
* Truncation: a sample longer than ``model.vlm.max_length`` is refused with its id (never cut: a cut through the
  image tokens breaks the image-feature/token match, a cut answer teaches a wrong stop).
* Batches: only the keys ``ChatCodec.encode`` found to be per token are padded; per-image keys (``grid_sizes``,
  ``merge_sizes`` ...) are concatenated per image whatever their shape. Generation returns the new tokens whether or
  not the model's ``generate()`` echoes the prompt (``new_tokens``).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medtune.config import Config, VLMCfg
from medtune.data.conversations import IMAGE_PLACEHOLDER, question_turns
from medtune.data.types import DataError
from medtune.errors import UserError
from medtune.models.base import ModelOutput, SegModel
from medtune.models.hf import load_kwargs, load_pretrained, prepare_for_training, read_config_json, resolve_model_path
from medtune.models.vlm.hulumed import is_hulumed_config
from medtune.models.vlm.hulumed import load_folder as load_hulumed_folder
from medtune.models.vlm.logits import IGNORE_INDEX, LOGITS_AT, forward_logits_at, logit_positions, token_loss
from medtune.models.vlm.processing import (
    apply_image_processor_settings,
    load_processor,
    read_chat_template,
    save_processor,
)

log = logging.getLogger(__name__)

# Last name part of the vision encoder / the multimodal projector in the VLM families transformers and the common
# remote-code models use (LLaVA, InternVL, Qwen-VL, Idefics, Gemma3, PaliGemma, Hulu-Med / VideoLLaMA3 ...).
VISION_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder", "image_encoder", "vpm")
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "mlp1", "merger", "connector", "aligner")
# An encoded sample / a batch names its per-token keys under this key (``ChatCodec.encode`` finds them; ``collate``
# pads exactly those and concatenates every other tensor per image).
SEQUENCE_KEYS = "sequence_keys"
# Batch keys that are not model inputs.
NON_MODEL_KEYS = frozenset({"ids", "labels", "num_items_in_batch", "pad_token_id", SEQUENCE_KEYS, LOGITS_AT})
# Processor outputs that are per image (or per image patch), never per token, whatever their shape happens to be:
# a single image's [1, k] tensor must not pass for a [1, T] token row when k == T by chance.
PER_IMAGE_KEYS = frozenset({"pixel_values", "pixel_attention_mask", "image_sizes", "image_grid_thw", "grid_sizes",
                            "merge_sizes", "spatial_shapes", "pixel_values_videos", "video_grid_thw",
                            "aspect_ratio_ids", "aspect_ratio_mask"})
# Items made without ChatCodec (no SEQUENCE_KEYS entry) pad only these.
DEFAULT_SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels")
# Image-processor settings (preprocessor_config.json) that bound the image tokens of dynamic-resolution VLMs:
# Hulu-Med's max_tokens, Qwen-VL's max_pixels (older folders), InternVL's tile count max_patches.
IMAGE_SIZE_KNOBS = ("max_tokens", "max_pixels", "max_patches")
# config.json flag of Hulu-Med (VideoLLaMA3 lineage), true in its hub configs: its forward asserts batch size 1.
TOKEN_COMPRESSION_KEY = "use_token_compression"


# ---- conversations -> tokens ----------------------------------------------------------------------------------------
def _messages(turns: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Turns with ``<image>`` placeholders -> the content-part form chat templates render images from."""
    out = []
    for turn in turns:
        parts: list[dict[str, str]] = []
        pieces = turn["content"].split(IMAGE_PLACEHOLDER)
        for i, piece in enumerate(pieces):
            if i:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": turn["role"], "content": parts})
    return out


class ChatCodec:
    """Conversation + image -> model inputs with assistant-only labels, through the model's own chat template.

    The conversation is rendered once per assistant turn: ``prompt_k`` (turns before answer k, with the generation
    prompt) and ``full_k`` (with answer k). Each rendering must extend the previous one; the differences are the
    pieces: prompt pieces (unsupervised; the first goes through the processor with the image) and answer pieces
    (supervised up to and including the first special token after the answer text: the end-of-turn token). Pieces
    are tokenised separately, so a generation prompt is exactly the training prompt and the model learns to emit
    exactly the tokens it is trained on. Picklable (DataLoader workers).
    """

    def __init__(self, processor, chat_template: str | None = None, max_length: int | None = None,
                 answer_token_ids: tuple[int, ...] = (), end_after_last_answer: bool = False):
        """``answer_token_ids``: special tokens that belong inside answers (the segmenting VLM's ``[SEG]``): never
        taken for the end of a turn, kept by ``decode``, not suppressed in sampling. ``end_after_last_answer``: a
        conversation that ends with an answer ends with that answer's end-of-turn token (what the template puts
        after it, e.g. a newline, is left out), as Sa2VA's training sequences do."""
        self.processor = processor
        self.answer_token_ids = frozenset(int(i) for i in answer_token_ids)
        self.end_after_last_answer = end_after_last_answer
        self.tokenizer = processor.tokenizer
        self.template = chat_template or getattr(processor, "chat_template", None) \
            or getattr(self.tokenizer, "chat_template", None)
        if not self.template:
            raise UserError("the model folder has no chat template (chat_template.jinja) and model.vlm.chat_template "
                             "is not set; give the template the model was trained with (a file path or the Jinja text)")
        self.max_length = max_length
        self._image_tokens_by_size: dict[tuple[int, int], int] = {}  # what the processor adds per image size
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        self.special_ids = set(self.tokenizer.all_special_ids) | {
            i for i, t in getattr(self.tokenizer, "added_tokens_decoder", {}).items() if t.special}
        ids = getattr(processor, "image_token_ids", None) or [getattr(processor, "image_token_id", None)]
        self.image_token_ids = {i for i in ids if i is not None}
        self.end_of_turn_id = self._end_of_turn()
        self.image_size_hint = _image_size_hint(processor)
        eos = self.tokenizer.eos_token_id
        self.stop_ids = sorted({i for i in (self.end_of_turn_id, eos) if i is not None})
        # never sampled: an image token in an answer would break the teacher-forced re-forward of GRPO (image
        # features and image tokens would no longer match), and other special tokens are no answer either
        self.suppress_ids = sorted((self.special_ids | self.image_token_ids) - set(self.stop_ids)
                                   - self.answer_token_ids)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        text = self.processor.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        return text[0] if isinstance(text, list) else text

    def _end_of_turn(self) -> int | None:
        """The special token the template closes an assistant turn with (e.g. <|im_end|>), if any."""
        turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        prompt, full = self.render(_messages(turns[:1]), True), self.render(_messages(turns), False)
        tail = self.tokenizer(full[len(prompt):], add_special_tokens=False).input_ids
        return next((t for t in tail[1:] if t in self.special_ids), None)

    def answer_end(self, toks: list[int]) -> int:
        """How many tokens of an answer piece are supervised: the answer and the first special token after it (the
        end of turn; special tokens of ``answer_token_ids`` are answer text); what follows (a newline) is prompt."""
        return next((i + 1 for i, t in enumerate(toks) if i > 0 and t in self.special_ids
                     and t not in self.answer_token_ids), len(toks))

    def pieces(self, turns: list[dict[str, str]], sample_id: str) -> list[tuple[str, bool]]:
        """(text, supervised) pieces; a conversation ending with a question ends with its generation prompt."""
        messages = _messages(turns)
        pieces, done = [], ""
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for k in answers:
            prompt = self.render(messages[:k], True)
            full = self.render(messages[:k + 1], False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise DataError(
                    f"sample {sample_id}: the chat template does not render this conversation turn by turn (a turn's "
                    "text is not a prefix of the next), so the assistant tokens cannot be located; set "
                    "model.vlm.chat_template to a template without look-ahead"
                )
            pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        if messages[-1]["role"] != "assistant":
            prompt = self.render(messages, True)
            if not prompt.startswith(done):
                raise DataError(f"sample {sample_id}: the chat template's generation prompt does not extend the "
                                "conversation; set model.vlm.chat_template")
            pieces.append((prompt[len(done):], False))
        return pieces

    def encode(self, turns: list[dict[str, str]], image, sample_id: str, for_generation: bool = False,
               check_length: bool = True) -> dict:
        """Model inputs of one sample: sequence keys 1-D [T] (input_ids, attention_mask, labels, and any other
        per-token key of the processor: a [1, T] output not in ``PER_IMAGE_KEYS``), every other processor key
        (pixel_values, image_grid_thw, merge_sizes ...) as returned; ``item[SEQUENCE_KEYS]`` names the sequence keys.
        ``image``: one image, or a list (several ``<image>`` placeholders: the frames of a video the VLM sees).
        ``for_generation``: the prompt for the last answer (labels all ignored)."""
        if for_generation and turns and turns[-1]["role"] == "assistant":
            turns = question_turns(turns)
        pieces = self.pieces(turns, sample_id)
        images = None if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        first = self.processor(text=[pieces[0][0]], images=images,
                               return_tensors="pt", add_special_tokens=False)
        t0 = first["input_ids"].shape[1]
        token_keys = [k for k, v in first.items()
                      if torch.is_tensor(v) and v.ndim == 2 and v.shape == (1, t0) and k not in PER_IMAGE_KEYS]
        rest, rest_labels = self._text_tokens(pieces)
        ids = first["input_ids"][0].tolist() + rest
        labels = [IGNORE_INDEX] * t0 + rest_labels
        if check_length:
            self._check_length(ids, labels, sample_id)
        item: dict[str, Any] = {"id": sample_id, "pad_token_id": self.pad_token_id,
                                SEQUENCE_KEYS: tuple(dict.fromkeys([*token_keys, "input_ids", "labels"]))}
        for key in token_keys:
            item[key] = extend_token_key(key, first[key][0], len(ids))
        item["input_ids"] = torch.tensor(ids, dtype=torch.long)
        item["labels"] = torch.tensor(labels, dtype=torch.long)
        for key, value in first.items():
            if key not in token_keys and key not in item:  # every other processor output, tensor or not
                item[key] = value
        return item

    def _text_tokens(self, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        """(ids, labels) of every piece after the first (the one with the image)."""
        ids: list[int] = []
        labels: list[int] = []
        for n, (text, supervised) in enumerate(pieces[1:], start=2):
            toks = self.tokenizer(text, add_special_tokens=False).input_ids
            cut = self.answer_end(toks) if supervised else 0
            if supervised and n == len(pieces) and self.end_after_last_answer:
                toks = toks[:cut]
            ids += toks
            labels += toks[:cut] + [IGNORE_INDEX] * (len(toks) - cut)
        return ids, labels

    def length(self, turns: list[dict[str, str]], image_size: tuple[int, int], sample_id: str) -> int:
        """The token count ``encode`` gives this conversation with an image of ``image_size`` (H, W), without the
        image: the text tokens + what the processor adds for an image of that size (found once per size with a blank
        image). Raises the template's DataError like ``encode``."""
        pieces = self.pieces(turns, sample_id)
        first = self.tokenizer(pieces[0][0], add_special_tokens=False).input_ids
        return len(first) + self._image_tokens_added(pieces[0][0], tuple(image_size)) + len(
            self._text_tokens(pieces)[0])

    def _image_tokens_added(self, text: str, image_size: tuple[int, int]) -> int:
        cache = self._image_tokens_by_size
        if image_size not in cache:
            from PIL import Image

            h, w = image_size
            with_image = self.processor(text=[text], images=[Image.new("RGB", (w, h))], return_tensors="pt",
                                        add_special_tokens=False)["input_ids"].shape[1]
            cache[image_size] = with_image - len(self.tokenizer(text, add_special_tokens=False).input_ids)
        return cache[image_size]

    def _check_length(self, ids: list[int], labels: list[int], sample_id: str) -> None:
        if self.max_length is None or len(ids) <= self.max_length:
            return
        image_pos = [i for i, t in enumerate(ids) if t in self.image_token_ids]
        cut_images = sum(p >= self.max_length for p in image_pos)
        cut_answer = sum(lab != IGNORE_INDEX for lab in labels[self.max_length:])
        what = (f"{cut_images} of its {len(image_pos)} image tokens (the image features would no longer match the "
                "image tokens)") if cut_images else f"{cut_answer} answer tokens" if cut_answer else "its last tokens"
        images = (f", make the images smaller ({len(image_pos)} of the {len(ids)} tokens are image tokens; "
                  f"{self.image_size_hint})") if image_pos else ""
        raise DataError(f"sample {sample_id}: {len(ids)} tokens > model.vlm.max_length={self.max_length}; "
                        f"truncation would cut {what}. Raise model.vlm.max_length{images} or shorten the conversation")

    def continuation_ids(self, turns: list[dict[str, str]], sample_id: str) -> list[int]:
        """Turn-by-turn generation: the tokens that follow the previous answer's end-of-turn token up to the
        generation prompt of the conversation's last (user) turn, exactly the tokens ``encode`` puts there; the
        answers before it are given as text (only what the template renders after them is taken)."""
        pieces = self.pieces(turns, sample_id)
        if len(pieces) < 3 or pieces[-1][1] or not pieces[-2][1]:
            raise ValueError("continuation_ids needs a conversation with an answer, ending with a question")
        answer = self.tokenizer(pieces[-2][0], add_special_tokens=False).input_ids
        return answer[self.answer_end(answer):] + self.tokenizer(pieces[-1][0], add_special_tokens=False).input_ids

    def decode(self, ids) -> str:
        """Answer text: special tokens dropped, except ``answer_token_ids`` (the segmenting VLM's ``[SEG]``)."""
        ids = [int(i) for i in ids]
        if not self.answer_token_ids:
            return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        kept = [i for i in ids if i in self.answer_token_ids or i not in self.special_ids | self.image_token_ids]
        return self.tokenizer.decode(kept, skip_special_tokens=False).strip()


def extend_token_key(key: str, values: torch.Tensor, length: int) -> torch.Tensor:
    """A per-token processor key [T] (attention_mask, token types ...) extended to ``length`` for appended text
    tokens: attention 1 (they are real tokens), anything else 0 (text)."""
    fill = 1 if key == "attention_mask" else 0
    return torch.cat([values, torch.full((length - len(values),), fill, dtype=values.dtype)])


def generation_kwargs(codec: ChatCodec, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0
                      ) -> dict[str, Any]:
    """``generate()`` settings of both VLM families: greedy, or plain temperature sampling (no top-k / top-p;
    special tokens but the stop tokens suppressed, so ``text_policy.token_logprobs`` with ``codec.suppress_ids`` is
    exactly the sampling distribution); stopping at the codec's stop tokens."""
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                              "eos_token_id": codec.stop_ids, "pad_token_id": codec.pad_token_id}
    if do_sample:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0, suppress_tokens=codec.suppress_ids)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    return kwargs


def _image_size_hint(processor) -> str:
    """Where the number of image tokens is set, for the too-long message."""
    image_processor = getattr(processor, "image_processor", None)
    for name in IMAGE_SIZE_KNOBS:
        value = getattr(image_processor, name, None)
        if value is not None and not (isinstance(value, int) and value <= 1):  # (one tile cannot be lowered)
            return f"lower the image processor's {name}={value}: model.vlm.image_processor.{name}=..."
    return "the model folder's preprocessor_config.json sets the image size"


def collate(items: list[dict], padding_side: str = "right") -> dict:
    """Pad the sequence keys (those ``ChatCodec.encode`` found to be per token, named in ``item[SEQUENCE_KEYS]``) to
    the batch maximum; concatenate every other tensor along dim 0 (per-image keys stay per image: pixel_values,
    grid_sizes, merge_sizes ..., whatever their number of dimensions or length) and every list (non-tensor processor
    outputs) in sample order; ``ids`` = the sample ids, ``batch[SEQUENCE_KEYS]`` = the padded keys. Right padding for
    training, left padding for generation."""
    batch: dict[str, Any] = {"ids": [it["id"] for it in items]}
    pad_id = items[0].get("pad_token_id", 0)
    sequence = tuple(items[0].get(SEQUENCE_KEYS, DEFAULT_SEQUENCE_KEYS))
    batch[SEQUENCE_KEYS] = sequence
    keys = [k for k, v in items[0].items() if torch.is_tensor(v)]
    for key in [k for k, v in items[0].items() if not torch.is_tensor(v) and k not in ("id", "pad_token_id",
                                                                                        SEQUENCE_KEYS)]:
        # non-tensor processor outputs (e.g. a list of modalities per sample) are joined in sample order
        values = [it[key] for it in items]
        batch[key] = [v for vs in values for v in vs] if all(isinstance(v, list) for v in values) else values
    length = max(len(it["input_ids"]) for it in items)
    for key in keys:
        values = [it[key] for it in items]
        if key in sequence:
            fill = pad_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
            padded = []
            for v in values:
                pad = torch.full((length - len(v),), fill, dtype=v.dtype)
                padded.append(torch.cat([pad, v] if padding_side == "left" else [v, pad]))
            batch[key] = torch.stack(padded)
        elif values[0].ndim == 0:  # one number per sample
            batch[key] = torch.stack(values)
        else:
            batch[key] = torch.cat(values, dim=0)
    return batch


def new_tokens(output: torch.Tensor, prompt_ids: torch.Tensor, max_new_tokens: int, model_name: str = "the model"):
    """The new tokens of a ``generate()`` output, whether the model echoes the prompt or not.

    transformers' VLMs generate from ``input_ids`` and return prompt + new tokens; a model that generates from
    ``inputs_embeds`` alone (Hulu-Med, many remote-code VLMs) returns only the new tokens. The output is an echo
    exactly when it starts with the (left-padded) prompt ids, token for token; otherwise it must be new tokens only,
    so no longer than ``max_new_tokens``. Anything else is refused rather than cut at a guessed position.
    """
    t = prompt_ids.shape[1]
    if output.shape[0] == prompt_ids.shape[0] and output.shape[1] >= t \
            and torch.equal(output[:, :t], prompt_ids.to(output.device)):
        return output[:, t:]
    if output.shape[1] <= max_new_tokens:
        return output
    raise UserError(f"{model_name}.generate() returned {output.shape[1]} tokens per sample for a {t}-token prompt and "
                     f"max_new_tokens={max_new_tokens}: neither the prompt followed by new tokens nor new tokens alone, "
                     "so the answer cannot be located; the model's generate() is not the transformers one")


# ---- where the parts are --------------------------------------------------------------------------------------------
def _under(name: str, prefix: str | None) -> bool:
    return prefix is not None and (name == prefix or name.startswith(prefix + "."))


def _shortest(names: list[str], last_parts: tuple[str, ...]) -> str | None:
    found = [n for n in names if n.split(".")[-1] in last_parts]
    return min(found, key=lambda n: (n.count("."), n)) if found else None


@dataclass
class VLMParts:
    vision: str | None  # full module name of the vision encoder
    projector: str | None  # of the multimodal projector
    output: str | None  # of the output embedding (lm_head): never a LoRA target by default

    @classmethod
    def find(cls, net: nn.Module) -> "VLMParts":
        names = [n for n, _ in net.named_modules() if n]
        out = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
        output = next((n for n, m in net.named_modules() if out is not None and m is out), None)
        return cls(vision=_shortest(names, VISION_NAMES), projector=_shortest(names, PROJECTOR_NAMES), output=output)


def linear_names(vlm: nn.Module, parts: VLMParts, inside: str | None = None) -> list[str]:
    """Full names (in ``vlm``) of the linear layers of the language model (``inside=None``: not the vision tower,
    the projector or the output embedding) or of the vision tower (``inside="vision"``), never the inside of an
    already attached adapter."""
    names = []
    for name, module in vlm.named_modules():
        split = name.split(".")
        if not isinstance(module, nn.Linear) or name == parts.output or "base_layer" in split \
                or any(p.startswith("lora_") for p in split):
            continue
        in_vision, in_projector = _under(name, parts.vision), _under(name, parts.projector)
        if (inside == "vision" and in_vision and not in_projector) or (inside is None and not in_vision
                                                                       and not in_projector):
            names.append(name)
    return names


def lora_target_patterns(vlm: nn.Module, parts: VLMParts, vision_lora: bool, prefix: str = "") -> list[str]:
    """The default LoRA targets of a VLM as anchored-regex alternatives over full names (``prefix``: where the VLM
    sits in the wrapped network, e.g. ``vlm.`` in the segmenting VLM): every linear of the language model, plus
    the vision tower's with ``vision_lora``. Vision towers reuse the language model's layer names (q_proj ...), so a
    suffix list would put adapters there."""
    if parts.vision is None:
        raise UserError(f"cannot find the vision encoder of {type(vlm).__name__} (no module named "
                         f"{', '.join(VISION_NAMES)}); set lora.target_modules to an anchored regex over the "
                         "language model's linear layers")
    names = linear_names(vlm, parts) + (linear_names(vlm, parts, "vision") if vision_lora else [])
    if not names:
        raise UserError(f"no linear layer found in the language model of {type(vlm).__name__}; set "
                         "lora.target_modules")
    return sorted({_name_pattern(prefix + n) for n in names})


def check_lora_placement(vlm: nn.Module, parts: VLMParts, vision_lora: bool, train_projector: bool) -> dict:
    """After wrapping: refuse adapters in the projector, in the vision tower unless ``vision_lora`` (and none there
    with it), and check the projector trains exactly when ``train_projector`` asks. Returns the adapter counts."""
    from peft.tuners.lora import LoraLayer

    landed = [n for n, m in vlm.named_modules() if isinstance(m, LoraLayer)]
    in_projector = [n for n in landed if _under(n, parts.projector)]
    in_vision = [n for n in landed if _under(n, parts.vision) and n not in in_projector]
    if in_projector:
        raise UserError(f"LoRA landed in the multimodal projector ({', '.join(in_projector[:4])}); train the "
                         "projector fully with model.vlm.train_projector=true and narrow lora.target_modules")
    if in_vision and not vision_lora:
        raise UserError(
            f"LoRA landed in the vision tower ({len(in_vision)} layers, e.g. {in_vision[0]}): its layers share "
            "names with the language model's (q_proj ...). Narrow lora.target_modules (an anchored regex over full "
            "module names; the default targets the language model only) or set model.vlm.vision_lora=true"
        )
    if vision_lora and not in_vision:
        raise UserError("model.vlm.vision_lora=true but no LoRA layer landed in the vision tower; include its "
                         "linear layers in lora.target_modules")
    trainable_projector = [n for n, p in vlm.named_parameters() if p.requires_grad and _under(n, parts.projector)]
    if train_projector and not trainable_projector:
        raise RuntimeError(f"model.vlm.train_projector: no parameter of {parts.projector} is trainable after "
                           "wrapping (pitfall 6)")
    if not train_projector and trainable_projector:
        raise RuntimeError(f"projector parameters trainable although model.vlm.train_projector=false: "
                           f"{trainable_projector[:4]}")
    return {"language": len(landed) - len(in_vision), "vision": len(in_vision)}


def _name_pattern(name: str) -> str:
    """Escaped full name with layer indices generalised: model.layers.3.mlp -> model\\.layers\\.\\d+\\.mlp."""
    return re.sub(r"(?<=\\\.)\d+(?=\\\.)", r"\\d+", re.escape(name))


# ---- the family -----------------------------------------------------------------------------------------------------
class VLMModel(SegModel):
    family = "vlm"

    def __init__(self, net: nn.Module, processor, codec: ChatCodec, vlm_cfg: VLMCfg):
        super().__init__(net, in_channels=3)
        self.processor = processor
        self.codec = codec
        self.parts = VLMParts.find(net)
        self.train_projector = vlm_cfg.train_projector
        self.vision_lora = vlm_cfg.vision_lora
        self._unused: str | None | bool = False  # computed once (frozen_by_design)

    def text_codec(self) -> ChatCodec:
        return self.codec

    def forward_logits(self, image, box=None):
        raise UserError("family vlm answers in text and has no mask logits; use task.kind=instruct")

    def model_inputs(self, batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}

    def forward_batch(self, batch: dict) -> ModelOutput:
        """Teacher-forced forward: token logits at the positions ``batch[LOGITS_AT]`` names (default: those the LM
        loss reads; ``models.vlm.logits``) and, with ``labels``, the LM loss on the supervised tokens (sum over them
        / ``batch["num_items_in_batch"]`` when given, else their number in this batch)."""
        inputs = self.model_inputs(batch)
        labels = batch.get("labels")
        positions = logit_positions(batch, labels, inputs["input_ids"].device)
        _, logits = forward_logits_at(partial(self.net, use_cache=False), self.base_network, inputs, positions)
        loss = token_loss(logits, labels, batch.get("num_items_in_batch"), positions) if labels is not None else None
        return ModelOutput(lm_loss=loss, token_logits=logits, logit_positions=positions)

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0):
        """New tokens [B, <= max_new_tokens] for a left-padded prompt batch: greedy, or plain temperature sampling
        (no top-k / top-p; special tokens but the stop tokens suppressed: ``text_policy.token_logprobs`` with
        ``codec.suppress_ids`` is exactly the sampling distribution)."""
        inputs = self.model_inputs(batch)
        out = self.net.generate(**inputs, **generation_kwargs(self.codec, max_new_tokens, do_sample, temperature))
        return new_tokens(out, inputs["input_ids"], max_new_tokens, type(self.base_network).__name__)

    # -- where LoRA goes ------------------------------------------------------------------------------------------
    def default_lora_targets(self) -> str:
        return "^(?:" + "|".join(lora_target_patterns(self.base_network, self.parts, self.vision_lora)) + ")$"

    def default_modules_to_save(self) -> list[str] | None:
        if not self.train_projector:
            return None
        if self.parts.projector is None:
            raise UserError(f"model.vlm.train_projector: no projector found in {type(self.base_network).__name__} "
                             f"(no module named {', '.join(PROJECTOR_NAMES)}); list it in lora.modules_to_save")
        return [self.parts.projector]

    def after_lora(self) -> None:
        """Refuse adapters where they were not asked for, and check the projector trains exactly when asked."""
        counts = check_lora_placement(self.base_network, self.parts, self.vision_lora, self.train_projector)
        log.info("vlm LoRA layers: %s; projector %s", counts,
                 "trained fully (modules_to_save)" if self.train_projector else "frozen")

    def frozen_by_design(self) -> str | None:
        """Trainable parameters the forward never uses (e.g. CLIP's post-layernorm, vision layers after the feature
        layer), found once by one probe forward/backward on a blank image: kept frozen, otherwise the preflight
        rightly reports them dead. Only needed when something in the vision tower trains (full fine-tuning, vision
        LoRA): the default LoRA on every language-model layer plus the projector is on the forward path by
        construction, and a large model is not run once more on the CPU for nothing."""
        if self._unused is False:
            self._unused = None if self.is_peft and not self.vision_lora else self._probe_unused()
        return self._unused

    def _probe_unused(self) -> str | None:
        from PIL import Image

        trainable = [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]
        if not trainable:
            return None
        turns = [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\nprobe"}, {"role": "assistant", "content": "probe"}]
        item = self.codec.encode(turns, Image.new("RGB", (32, 32)), "probe", check_length=False)
        device = next(self.net.parameters()).device
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collate([item]).items()}
        saved = [(p, p.grad) for _, p in trainable]
        for _, p in trainable:
            p.grad = None
        with torch.enable_grad():
            self.forward_batch(batch).lm_loss.backward()
        unused = [n for n, p in trainable if p.grad is None]
        for p, grad in saved:
            p.grad = grad
        if unused:
            log.info("vlm: %d parameters the forward never uses stay frozen, e.g. %s", len(unused), unused[:3])
        return "^(?:" + "|".join(re.escape(n) for n in unused) + ")$" if unused else None

    # -- folders --------------------------------------------------------------------------------------------------
    def save_base(self, out_dir: str | Path) -> Path:
        """Merged model (LoRA folded in, on a copy) + processor with the training chat template: a folder plain
        ``from_pretrained`` loads, and ``model.path`` too."""
        from medtune.models.lora import merged_copy

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        merged_copy(self.net).save_pretrained(str(out_dir), safe_serialization=True)
        self.processor.chat_template = self.codec.template
        save_processor(self.processor, out_dir)
        return out_dir

    def load_base_weights(self, folder: str | Path) -> None:
        reload_vlm_weights(self.base_network, Path(folder))


def _auto_class(meta: dict, path: Path):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    auto_map = meta.get("auto_map") or {}
    if auto_map:  # remote code (the caller checked model.trust_remote_code)
        return AutoModelForImageTextToText if "AutoModelForImageTextToText" in auto_map else AutoModelForCausalLM
    if meta.get("model_type") not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise UserError(f"{path} holds a {meta.get('model_type')!r} model, which is not a vision-language model "
                         "AutoModelForImageTextToText knows; model.family=vlm needs a VLM folder (or remote code with "
                         "model.trust_remote_code=true)")
    return AutoModelForImageTextToText


def check_token_compression(meta: dict, cfg: Config, path: Path) -> None:
    """Remote code with ``use_token_compression`` (Hulu-Med's / VideoLLaMA3's own forward, true in their hub configs)
    works at batch size 1 only: that forward asserts it deep inside. Refused here, from config.json alone, before
    anything loads. (medtune's own Hulu-Med implementation does not need this: compression is a no-op for images.)"""
    if not meta.get(TOKEN_COMPRESSION_KEY):
        return
    rl = cfg.objective == "rl"
    per_forward = cfg.data.batch_size * (cfg.rl.group_size if rl else 1)
    if per_forward <= 1:
        return
    where = (f"data.batch_size={cfg.data.batch_size} x rl.group_size={cfg.rl.group_size} answers per prompt" if rl
             else f"data.batch_size={cfg.data.batch_size}")
    fix = "" if rl else " or set data.batch_size=1"
    raise UserError(f"{path / 'config.json'} sets {TOKEN_COMPRESSION_KEY}: true, which this model supports with one "
                     f"sample per forward only, but this run batches {per_forward} ({where}); set {TOKEN_COMPRESSION_KEY} "
                     f"to false in that config.json (for images it changes nothing; Hulu-Med's own notebook turns it "
                     f"off){fix}")


def reload_vlm_weights(net: nn.Module, folder: Path) -> None:
    """A VLM's weights from a folder its own class saved, into ``net`` (both families' ``load_base_weights``).
    Through that class's ``from_pretrained``: ``save_pretrained`` may write weights under other names (LLaVA keeps its
    legacy key layout on disk) and only the loader maps them back; medtune's Hulu-Med loads the same way."""
    kwargs = {"trust_remote_code": True} if getattr(net.config, "auto_map", None) and not is_hulumed_config(
        net.config.to_dict()) else {}
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
    loaded = type(net).from_pretrained(str(folder), dtype=dtype, **kwargs)
    missing, unexpected = net.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise UserError(f"weights in {folder} do not fit this model (saved from another architecture?): missing "
                        f"{missing[:8]}, unexpected {unexpected[:8]}")


def load_vlm_folder(path: Path, cfg: Config):
    """(network, processor) of a local VLM folder: medtune's own Hulu-Med, else transformers' native VLM (or remote
    code, with the opt-in) and the folder's processor. The one loader of both VLM families."""
    meta = read_config_json(path)
    # QLoRA: the projector (trained fully when asked) and lm_head stay unquantised
    keep = list(PROJECTOR_NAMES) + ["lm_head"]
    if is_hulumed_config(meta):  # medtune's own Hulu-Med: no code from the folder, with or without the opt-in;
        # its token compression is a no-op for images at any batch size
        net, processor = load_hulumed_folder(path, **load_kwargs(cfg, keep))
    else:
        check_token_compression(meta, cfg, path)  # before anything loads
        processor = load_processor(path, cfg)
        net = load_pretrained(_auto_class(meta, path), path, **load_kwargs(cfg, keep))
    apply_image_processor_settings(processor, cfg.model.vlm.image_processor)
    return net, processor


def build_vlm(cfg: Config) -> VLMModel:
    path = resolve_model_path(cfg)  # refuses remote code without model.trust_remote_code
    if path is None:
        if cfg.model.quantize_4bit:
            raise UserError("model.quantize_4bit quantises a pretrained model; set model.path to a local VLM folder")
        overrides = dict(cfg.model.config)
        preset, kind = overrides.pop("preset", None), overrides.pop("vlm", "llava")
        if preset != "tiny":
            raise UserError("family vlm builds from model.config only the offline test models ({preset: tiny, vlm: "
                             "llava | internvl | qwen2_5_vl | qwen3_vl}); for a real VLM set model.path to a local "
                             "checkpoint folder")
        from medtune.models.vlm.tiny import tiny_vlm

        net, processor = tiny_vlm(kind, overrides)
        apply_image_processor_settings(processor, cfg.model.vlm.image_processor)
    else:
        if cfg.model.config:
            log.warning("model.config is ignored with model.path: the architecture comes from %s/config.json", path)
        net, processor = load_vlm_folder(path, cfg)
    codec = ChatCodec(processor, read_chat_template(cfg.model.vlm.chat_template), cfg.model.vlm.max_length)
    net = prepare_for_training(net, cfg, input_grads=True)
    return VLMModel(net, processor, codec, cfg.model.vlm)
