"""Image + conversation samples (LLaVA-style JSON): reading one entry into a checked, normalised conversation.

Two spellings are accepted: LLaVA's ``{"conversations": [{"from": "human"|"gpt"|"system", "value": "<image>\\n..."}]}``
and the chat form ``{"messages": [{"role": "user"|"assistant"|"system", "content": str | [parts]}]}`` where parts are
``{"type": "text", "text": ...}`` / ``{"type": "image"}``. Both become a list of turns ``{"role", "content"}`` with
``content`` a string in which each image sits at an ``<image>`` placeholder; the model's chat template renders the
placeholder as that model's own image token later.

Every problem is returned as one line naming the entry and the fix, never raised one at a time.
"""
from __future__ import annotations

from typing import Any

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _part_text(part: Any) -> tuple[str | None, bool]:
    """(text, is_image) of one chat-form content part; (None, False) when malformed."""
    if isinstance(part, str):
        return part, False
    if not isinstance(part, dict):
        return None, False
    kind = part.get("type")
    if kind == "image":
        return IMAGE_PLACEHOLDER, True
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"], False
    return None, False


def _turn(raw: Any) -> tuple[str, str] | str:
    """(role, content) of one raw turn, or a problem text."""
    if not isinstance(raw, dict):
        return "is not an object with from/value or role/content"
    role = raw.get("from", raw.get("role"))
    content = raw.get("value", raw.get("content"))
    if role not in ROLES:
        return f"has role {role!r}; use one of {sorted(ROLES)}"
    if isinstance(content, list):
        texts = [_part_text(p)[0] for p in content]
        if any(t is None for t in texts):
            return "has a content part that is neither {'type': 'text', 'text': ...} nor {'type': 'image'}"
        content = "".join(texts)
    if not isinstance(content, str):
        return "has no text (value / content must be a string or a list of parts)"
    return ROLES[role], content


def parse_conversation(entry: dict, n_images: int, where: str) -> tuple[list[dict[str, str]], list[str]]:
    """Normalised turns of ``entry`` and the problems found (each one line naming ``where`` and the fix)."""
    raw = entry.get("conversations", entry.get("messages"))
    if not isinstance(raw, list) or not raw:
        return [], [f"{where}: needs a non-empty 'conversations' (or 'messages') list; add the question and answer"]
    turns: list[dict[str, str]] = []
    problems: list[str] = []
    for i, item in enumerate(raw):
        parsed = _turn(item)
        if isinstance(parsed, str):
            problems.append(f"{where}: turn {i} {parsed}")
            continue
        turns.append({"role": parsed[0], "content": parsed[1]})
    if problems:
        return [], problems

    answers = [t for t in turns if t["role"] == "assistant"]
    if not answers:
        problems.append(f"{where}: the conversation has no assistant turn ('from': 'gpt' / 'role': 'assistant'), so "
                        "there is nothing to learn or to evaluate; add the answer")
    elif any(not t["content"].strip() for t in answers):
        problems.append(f"{where}: an assistant turn is empty; write the answer or drop the turn")
    if turns and turns[0]["role"] == "assistant":
        problems.append(f"{where}: the conversation starts with an assistant turn; it must start with the question")

    placeholders = sum(t["content"].count(IMAGE_PLACEHOLDER) for t in turns)
    in_answers = sum(t["content"].count(IMAGE_PLACEHOLDER) for t in answers)
    first_answer = next((i for i, t in enumerate(turns) if t["role"] == "assistant"), len(turns))
    before_answer = sum(t["content"].count(IMAGE_PLACEHOLDER) for t in turns[:first_answer])
    if in_answers:
        problems.append(f"{where}: '{IMAGE_PLACEHOLDER}' inside an assistant turn; images belong to the question")
    elif n_images and placeholders == 0:
        problems.append(f"{where}: the sample has an image but its conversation has no '{IMAGE_PLACEHOLDER}' "
                        f"placeholder, so the model would never see it; put '{IMAGE_PLACEHOLDER}\\n' at the start of "
                        "the first human turn")
    elif placeholders != n_images:
        problems.append(f"{where}: {placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) for {n_images} image(s); "
                        "use exactly one placeholder per image")
    elif before_answer != placeholders:
        problems.append(f"{where}: images must be given before the first answer (in the first human turn); "
                        "move the placeholder there")
    return turns, problems


def final_answer(turns: list[dict[str, str]]) -> str:
    """The last assistant turn's text: the reference an evaluation compares a generated answer with."""
    return next(t["content"] for t in reversed(turns) if t["role"] == "assistant")


def question_turns(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation up to (not including) its last assistant turn: the prompt for generating that answer."""
    last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
    return turns[:last]
