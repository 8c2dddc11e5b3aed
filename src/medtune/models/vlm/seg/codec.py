"""The segvlm text codec: one conversation (image + questions [+ answers]) -> token ids, labels, attention mask.

Picklable (a tokenizer, a template string and a few ids), so DataLoader workers can encode. The conversation is
rendered with the checkpoint's chat template (or ``model.vlm.chat_template``); the image item becomes the
processor's image token, replaced by the expanded placeholder ids (e.g. ``<img>`` + 256 x ``<IMG_CONTEXT>`` +
``</img>``); an image cut into N tiles (InternVL's dynamic tiling) gets N times the image tokens of one tile inside
the same start / end tokens, as InternVL and Sa2VA build their prompts.

A conversation is one user turn per question, each followed by its answer, and the image only in the first user
turn (as Sa2VA's training data put several referring expressions of one image). It is rendered once per turn:
``prompt_k`` (everything before answer k, with the generation prompt) and ``full_k`` (with answer k); each rendering
must extend the previous one, and the differences are the pieces: the user piece k (unsupervised) and the answer
piece k (supervised: the answer tokens and the end-of-turn token). Pieces are tokenised separately and
concatenated, exactly the token sequence ``generate()`` continues from turn by turn, so teacher forcing and
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

    def _messages(self, questions: list[str], answers: list[str]) -> list[dict]:
        """Chat messages: the image in the first user turn only; question k, then answer k when given."""
        messages: list[dict] = []
        for k, question in enumerate(questions):
            messages += user_turn(question) if k == 0 else [
                {"role": "user", "content": [{"type": "text", "text": question}]}]
            if k < len(answers):
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answers[k]}]})
        return messages

    def _check_texts(self, questions: list[str], answers: list[str]) -> None:
        if not questions:
            raise UserError("a segvlm conversation needs at least one question")
        if len(answers) not in (len(questions), len(questions) - 1):
            raise ValueError(f"{len(questions)} questions need {len(questions)} answers (teacher forcing) or "
                             f"{len(questions) - 1} (a prompt for the last one), got {len(answers)}")
        for question in questions:
            for token in (self.image_token, self.seg_token):
                if token in question:
                    raise UserError(f"the question {question!r} contains {token!r}; the codec inserts the image "
                                     f"itself and {self.seg_token!r} belongs in answers only")
        for answer in answers:
            if self.image_token in answer:
                raise UserError(f"the answer {answer!r} contains the image token {self.image_token!r}")

    def pieces(self, questions: list[str], answers: list[str]) -> list[tuple[str, str | None]]:
        """(user piece, answer piece) per turn, as text: the user piece runs from the end of the previous answer's
        end-of-turn token to the end of this turn's generation prompt; the answer piece is the text up to the end of
        the answer (its end-of-turn token is added as an id). The last answer piece is None when ``answers`` is one
        shorter than ``questions`` (the conversation ends with a generation prompt)."""
        self._check_texts(questions, answers)
        out: list[tuple[str, str | None]] = []
        done = ""
        for k in range(len(questions)):
            prompt = render(self.tokenizer, self.chat_template, self._messages(questions[:k + 1], answers[:k]),
                            add_generation_prompt=True)
            if not prompt.startswith(done):
                raise UserError("the chat template does not render this conversation turn by turn (an earlier turn "
                                 "renders differently once a later one follows), so the answers cannot be located; "
                                 "set model.vlm.chat_template to a template without look-ahead")
            if k >= len(answers):
                out.append((prompt[len(done):], None))
                break
            full = render(self.tokenizer, self.chat_template, self._messages(questions[:k + 1], answers[:k + 1]),
                          add_generation_prompt=False)
            answer = answers[k]
            if not full.startswith(prompt) or answer not in full[len(prompt):]:
                raise UserError("the chat template renders the assistant turn so that the generation prompt is not "
                                 "its prefix; teacher forcing would not match generation. Set model.vlm.chat_template")
            tail = full[len(prompt):]
            answer_end = tail.find(answer) + len(answer)
            out.append((prompt[len(done):], tail[:answer_end]))
            # the next user piece starts after the rendered end-of-turn token (which the answer piece's id stands
            # for); a template that renders none (EOS stands in) continues right after the answer
            eot_at = tail.find(self.end_of_turn, answer_end)
            done = prompt + (tail[:eot_at + len(self.end_of_turn)] if eot_at >= 0 else tail[:answer_end])
        return out

    def prompt_ids(self, questions: list[str], answers: list[str], num_tiles: int = 1) -> list[int]:
        """Token ids of the last user piece (ending with the generation prompt), given the earlier answers: what a
        turn-by-turn generation appends after the previous answer's tokens and end-of-turn token."""
        if len(answers) != len(questions) - 1:
            raise ValueError(f"prompt_ids needs one answer fewer than questions, got {len(answers)} for "
                             f"{len(questions)}")
        return self._tokenize(self.pieces(questions, answers)[-1][0], num_tiles if len(questions) == 1 else 1)

    def encode(self, question: str | list[str], answer: str | list[str] | None = None, num_tiles: int = 1
               ) -> dict[str, torch.Tensor]:
        """``input_ids``, ``labels`` (-100 outside the answers + their end-of-turn tokens), ``attention_mask``:
        LongTensor [T] each.

        One question (a string) or several (a list, one user turn each); as many answers for teacher forcing, or
        one fewer (``answer=None`` for a single question): the prompt with the generation prompt appended (what
        ``generate()`` continues). ``num_tiles``: how many tiles the image is cut into
        (``SegVLMModel.image_prep.num_tiles(H, W)``); the image sits in the first user turn.
        """
        questions = [question] if isinstance(question, str) else list(question)
        answers = [] if answer is None else [answer] if isinstance(answer, str) else list(answer)
        ids: list[int] = []
        labels: list[int] = []
        for k, (user_text, answer_text) in enumerate(self.pieces(questions, answers)):
            prompt = self._tokenize(user_text, num_tiles if k == 0 else 1)
            ids += prompt
            labels += [IGNORE_INDEX] * len(prompt)
            if answer_text is not None:
                answer_ids = self.tokenizer(answer_text, add_special_tokens=False)["input_ids"] + [self.end_of_turn_id]
                ids += answer_ids
                labels += answer_ids
        if self.max_length is not None and len(ids) > self.max_length:
            raise UserError(f"a sample encodes to {len(ids)} tokens, more than model.vlm.max_length="
                             f"{self.max_length}; raise the limit or shorten the text (samples are never truncated: "
                             "cutting the image tokens or the answer would train on a broken sample)")
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
