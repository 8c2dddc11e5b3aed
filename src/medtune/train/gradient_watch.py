"""Trainable tensors that stop learning during training: the preflight's dead-gradient check, kept up after it.

The preflight proves that every trainable tensor gets a gradient before the first real step. A part of the model can
still drop out of the loss later: a softmax whose logits grew until it puts exactly zero weight on some inputs (SAM 2's
memory attention on its spatial memories, found in the video demo: the memory encoder then gets a gradient of exactly
0 and never recovers), a gate that closed, a branch the rest of the model learnt to bypass. Training goes on, the
loss still falls, and nothing says that the part the user meant to fine-tune has stopped learning.

``DeadGradientWatch.check`` runs on the steps the loop logs (after backward, before the gradients are cleared): a
tensor whose gradient is None or exactly zero on ``checks`` checks in a row is reported once (again only after it has
had a gradient in between); a check on which no tensor at all has a gradient (a step without signal, e.g. an RL group
whose samples all got the same reward) does not count. Tensors that reach the loss only when the model's own
prediction selects them (``selected_by_prediction``, e.g. SAM's multimask heads) are not watched: a zero there is
routine. Under DeepSpeed ZeRO the gradients live in the engine, not in ``param.grad``: the watch sees none and stays
silent there.
"""
from __future__ import annotations

import re

import torch
from torch import nn

# how many names a warning lists before "(+N more)"
NAMES_SHOWN = 8


class DeadGradientWatch:
    def __init__(self, model: nn.Module, checks: int, exempt: str | None = None):
        """``checks``: consecutive checks with a zero gradient that make a tensor dead; ``exempt``: a regex of
        parameter names not to watch."""
        self.checks = checks
        self.params = [(n, p) for n, p in model.named_parameters()
                       if p.requires_grad and p.numel() > 0 and not (exempt and re.search(exempt, n))]
        self.zero_in_a_row: dict[str, int] = {}
        self.reported: set[str] = set()

    def check(self) -> list[str]:
        """The watched tensors that have just become dead (zero gradient on the last ``checks`` checks)."""
        grads = [p.grad for _, p in self.params]
        present = [g.detach().abs().amax().float() for g in grads if g is not None]
        peaks = torch.stack(present).tolist() if present else []  # one device sync for all tensors
        if not any(peak > 0.0 for peak in peaks):
            return []  # no gradient anywhere: a step without signal (an RL group of equal rewards), not a dead part
        peaks = iter(peaks)
        newly = []
        for (name, _), grad in zip(self.params, grads):
            if grad is not None and next(peaks) > 0.0:
                self.zero_in_a_row.pop(name, None)
                self.reported.discard(name)
                continue
            self.zero_in_a_row[name] = self.zero_in_a_row.get(name, 0) + 1
            if self.zero_in_a_row[name] >= self.checks and name not in self.reported:
                self.reported.add(name)
                newly.append(name)
        return newly

    @property
    def dead(self) -> list[str]:
        return sorted(self.reported)


def dead_gradient_message(step: int, names: list[str], checks: int, every: int) -> str:
    shown = ", ".join(names[:NAMES_SHOWN]) + (f" (+{len(names) - NAMES_SHOWN} more)" if len(names) > NAMES_SHOWN else "")
    return (f"step {step}: {len(names)} trainable tensors had a gradient of exactly zero at the last {checks} checks "
            f"(one every {every} steps) and no longer learn: {shown}. Their part of the model stopped reaching the "
            "loss: a softmax or gate upstream saturated (lower optim.lr) or the model learnt to bypass it; "
            "train.dead_gradient_checks=0 turns this check off")
