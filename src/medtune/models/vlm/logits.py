"""Token logits only where a loss or a sample needs them.

A VLM's full logits are [B, T, V] float: with ~1k image tokens and a 150k vocabulary that is ~0.6 GB per sample, and
the loss's float copy and log-softmax each add as much again, while the LM loss reads only the few answer positions
and GRPO only the completion's. transformers' causal LMs (and the VLMs built on them: LLaVA, InternVL, Qwen-VL, the
native Hulu-Med) take ``logits_to_keep``: a 1-D position tensor slices the hidden states *before* the output head, so
the head (with its LoRA / trainable-token rows, which still get their gradients) runs only there, and any logit
post-processing of the model (soft-capping, scaling) still applies. A model whose forward does not take it computes
full logits and is sliced afterwards, with one logged note per model class.

The batch names the positions under ``LOGITS_AT``: a 1-D LongTensor of positions along T (the logits kept are
[B, P, V], P = len), or ``ALL_POSITIONS`` for every position. Absent: the positions the LM loss needs, i.e. those
whose *next* token is supervised in some row of ``labels`` (none without labels).
"""
from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
LOGITS_AT = "logits_at"
ALL_POSITIONS = "all"
KEEP_KWARG = "logits_to_keep"
# per model class: whether its forward honours logits_to_keep (None: not tried yet)
_SUPPORT: dict[type, bool] = {}


def supervised_positions(labels: torch.Tensor | None, device=None) -> torch.Tensor:
    """1-D positions t (ascending) whose logits predict a supervised token, labels[b, t + 1] != -100, in any row."""
    if labels is None:
        return torch.zeros(0, dtype=torch.long, device=device)
    needed = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)
    return needed.nonzero().flatten().to(device if device is not None else labels.device)


def logit_positions(batch: dict, labels: torch.Tensor | None, device=None) -> torch.Tensor | None:
    """The positions ``batch[LOGITS_AT]`` asks for (None: every position); absent: ``supervised_positions``."""
    wanted = batch.get(LOGITS_AT)
    if isinstance(wanted, str):
        if wanted != ALL_POSITIONS:
            raise ValueError(f"batch[{LOGITS_AT!r}] = {wanted!r}: give a 1-D position tensor or {ALL_POSITIONS!r}")
        return None
    if wanted is None:
        return supervised_positions(labels, device)
    wanted = torch.as_tensor(wanted, dtype=torch.long)
    if wanted.ndim != 1:
        raise ValueError(f"batch[{LOGITS_AT!r}] must be 1-D positions along the sequence, got {tuple(wanted.shape)}")
    return wanted.to(device) if device is not None else wanted


def _accepts_keep(net) -> bool:
    params = inspect.signature(net.forward).parameters
    return KEEP_KWARG in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _fallback_note(cls: type, why: str) -> None:
    if _SUPPORT.get(cls) is not False:
        log.info("%s: %s; its full-vocabulary logits are computed at every position and sliced afterwards (more "
                 "memory, same loss)", cls.__name__, why)
    _SUPPORT[cls] = False


def forward_logits_at(call, base: torch.nn.Module, inputs: dict, positions: torch.Tensor | None):
    """``(output, logits)`` of ``call(**inputs)`` (the possibly PEFT-wrapped network) with the logits [B, P, V] at
    ``positions`` only (None: [B, T, V]). ``base`` is the unwrapped network, whose class decides whether
    ``logits_to_keep`` is passed; a model that ignores or refuses it is run again in full and sliced."""
    if positions is None:
        out = call(**inputs)
        return out, out.logits
    cls = type(base)
    if _SUPPORT.get(cls) is None and not _accepts_keep(base):
        _fallback_note(cls, f"forward() takes no {KEEP_KWARG}")
    if _SUPPORT.get(cls) is not False:
        try:
            out = call(**inputs, **{KEEP_KWARG: positions})
        except TypeError as err:  # a **kwargs forward that hands it to something that does not know it
            if KEEP_KWARG not in str(err):
                raise
            _fallback_note(cls, f"forward() refused {KEEP_KWARG} ({err})")
        else:
            if out.logits.shape[1] == len(positions):
                _SUPPORT[cls] = True
                return out, out.logits
            if out.logits.shape[1] != inputs["input_ids"].shape[1]:
                raise RuntimeError(f"{cls.__name__} returned logits for {out.logits.shape[1]} positions, asked for "
                                   f"{len(positions)} of {inputs['input_ids'].shape[1]}")
            _fallback_note(cls, f"forward() ignored {KEEP_KWARG}")
            return out, out.logits[:, positions.to(out.logits.device)]
    out = call(**inputs)
    return out, out.logits[:, positions.to(out.logits.device)]


def token_loss(logits: torch.Tensor, labels: torch.Tensor, normaliser: torch.Tensor | float | None = None,
               positions: torch.Tensor | None = None):
    """Next-token cross-entropy summed over supervised positions / ``normaliser`` (default: their number here).

    ``logits`` [B, T, V] (``positions`` None) or [B, P, V] at ``positions`` (1-D), which must include every position
    whose next token is supervised: the same loss, to rounding, as from the full logits."""
    if positions is None:
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:].to(logits.device)
    else:
        positions = positions.to(labels.device)
        missing = ~torch.isin(supervised_positions(labels), positions)
        if bool(missing.any()):
            raise ValueError(f"token_loss: the logits kept ({len(positions)} positions) miss supervised position(s) "
                             f"{supervised_positions(labels)[missing][:8].tolist()}")
        shift_logits = logits.float()
        # the last position predicts nothing: its target is ignored
        after = positions + 1
        beyond = after >= labels.shape[1]
        shift_labels = labels[:, after.clamp(max=labels.shape[1] - 1)].masked_fill(beyond, IGNORE_INDEX)
        shift_labels = shift_labels.to(logits.device)
    total = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    if normaliser is None:
        normaliser = (labels[:, 1:] != IGNORE_INDEX).sum()
    if torch.is_tensor(normaliser):
        normaliser = normaliser.to(total.device, total.dtype)
    return total / (normaliser.clamp(min=1) if torch.is_tensor(normaliser) else max(float(normaliser), 1.0))
