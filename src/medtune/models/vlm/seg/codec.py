"""The segvlm text codec: one conversation (image + question [+ answer]) -> token ids, labels, attention mask.

Picklable (a tokenizer, a template string and a few ids), so DataLoader workers can encode. The conversation is
rendered with the checkpoint's chat template (or ``model.vlm.chat_template``); the image item becomes the
processor's image token, replaced by the expanded placeholder ids (e.g. ``<img>`` + 256 x ``<IMG_CONTEXT>`` +
``</img>``); an image cut into N tiles (InternVL's dynamic tiling) gets N times the image tokens of one tile inside
the same start / end tokens, as InternVL and Sa2VA build their prompts. The prompt and the answer are tokenised
separately and concatenated, exactly the token sequence ``generate()`` continues from, so teacher forcing and
generation see the same prompt tokens.

Labels are -100 everywhere except the answer tokens and the end-of-turn token (the first special token the
template puts after the answer, e.g. ``<|im_end|>``; the tokenizer's EOS when it puts none).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from medtune.errors import UserError
from medtune.models.vlm.seg.parts import render, user_turn

IGNORE_INDEX = -100
_PROBE_ANSWER = "medtune probe answer"


@dataclass
class TextCodec:
    tokenizer: object
    chat_template: str
    image_token: str
    placeholder_ids: list[int]
    seg_token: str
    seg_token_id: int
    max_length: int | None = None
    pad_token_id: int = field(init=False)
    end_of_turn_id: int = field(init=False)
    end_of_turn: str = field(init=False)

    def __post_init__(self) -> None:
        tok = self.tokenizer
        self.end_of_turn = self._find_end_of_turn()
        self.end_of_turn_id = tok.convert_tokens_to_ids(self.end_of_turn)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_token_id = int(pad if pad is not None else self.end_of_turn_id)

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end a generated answer."""
        ids = [self.end_of_turn_id]
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def _find_end_of_turn(self) -> str:
        tok = self.tokenizer
        messages = user_turn("q") + [{"role": "assistant", "content": [{"type": "text", "text": _PROBE_ANSWER}]}]
        full = render(tok, self.chat_template, messages, add_generation_prompt=False)
        after = full[full.rfind(_PROBE_ANSWER) + len(_PROBE_ANSWER):]
        specials = set(tok.all_special_tokens) | set(tok.get_added_vocab())
        found = [(after.find(s), s) for s in specials if s and after.find(s) >= 0 and s != self.seg_token]
        if found:
            return min(found)[1]
        if tok.eos_token is None:
            raise UserError("the chat template puts no special token after the assistant answer and the tokenizer has "
                             "no EOS token: cannot tell where an answer ends; set model.vlm.chat_template")
        return tok.eos_token

    def placeholder(self, num_tiles: int = 1) -> list[int]:
        """The image's ids for ``num_tiles`` tiles: the one-tile placeholder with its run of image tokens repeated."""
        if num_tiles == 1:
            return list(self.placeholder_ids)
        ids = self.placeholder_ids
        image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        first = ids.index(image_id)
        last = len(ids) - 1 - ids[::-1].index(image_id)
        return ids[:first] + ids[first:last + 1] * num_tiles + ids[last + 1:]

    def _tokenize(self, text: str, num_tiles: int = 1) -> list[int]:
        ids: list[int] = []
        for i, piece in enumerate(text.split(self.image_token)):
            if i:
                ids += self.placeholder(num_tiles)
            if piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    def encode(self, question: str, answer: str | None = None, num_tiles: int = 1) -> dict[str, torch.Tensor]:
        """``input_ids``, ``labels`` (-100 outside answer + end-of-turn), ``attention_mask``: LongTensor [T] each.

        ``answer=None``: the prompt with the generation prompt appended (what ``generate()`` continues).
        ``num_tiles``: how many tiles the image is cut into (``SegVLMModel.image_prep.num_tiles(H, W)``).
        """
        for token, where in ((self.image_token, "question"), (self.seg_token, "question")):
            if token in question:
                raise UserError(f"the {where} {question!r} contains {token!r}; the codec inserts the image itself and "
                                 f"{self.seg_token!r} belongs in answers only")
        if answer is not None and self.image_token in answer:
            raise UserError(f"the answer {answer!r} contains the image token {self.image_token!r}")
        prompt_text = render(self.tokenizer, self.chat_template, user_turn(question), add_generation_prompt=True)
        prompt = self._tokenize(prompt_text, num_tiles)
        answer_ids: list[int] = []
        if answer is not None:
            messages = user_turn(question) + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
            full = render(self.tokenizer, self.chat_template, messages, add_generation_prompt=False)
            if not full.startswith(prompt_text) or answer not in full[len(prompt_text):]:
                raise UserError("the chat template renders the assistant turn so that the generation prompt is not "
                                 "its prefix; teacher forcing would not match generation. Set model.vlm.chat_template")
            tail = full[len(prompt_text):]
            answer_text = tail[: tail.find(answer) + len(answer)]
            answer_ids = self.tokenizer(answer_text, add_special_tokens=False)["input_ids"] + [self.end_of_turn_id]
        ids = prompt + answer_ids
        if self.max_length is not None and len(ids) > self.max_length:
            raise UserError(f"a sample encodes to {len(ids)} tokens, more than model.vlm.max_length="
                             f"{self.max_length}; raise the limit or shorten the text (samples are never truncated: "
                             "cutting the image tokens or the answer would train on a broken sample)")
        labels = [IGNORE_INDEX] * len(prompt) + answer_ids
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
                "attention_mask": torch.ones(len(ids), dtype=torch.long)}

    def decode(self, ids) -> str:
        """Text of ``ids`` with special tokens kept (so ``[SEG]`` and the end-of-turn token show)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def answer_text(self, generated) -> str:
        """The answer in generated ids: up to the first stop token (padding dropped, [SEG] kept)."""
        ids = generated.tolist() if isinstance(generated, torch.Tensor) else list(generated)
        stops = set(self.stop_token_ids)
        cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        return self.tokenizer.decode([t for t in ids[:cut] if t != self.pad_token_id], skip_special_tokens=False)
