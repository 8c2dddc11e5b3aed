"""Gradient-flow preflight: prove, before the first real step, that what is meant to train can train.

Runs on one real batch and restores model, optimizer (with its fp16 loss scaler) and RNG afterwards, so the real run
is the same with or without it. Checks, in order:
  1. the optimizer holds exactly the trainable tensors, and more than zero of them;
  2. one forward/backward gives a finite loss that requires grad;
  3. every trainable tensor gets a finite gradient, non-zero for all but LoRA-A (LoRA-B starts at zero, so dL/dA = 0
     on the very first step: expected, pitfall 2);
  4. after k optimizer steps every trainable tensor has had a non-zero gradient and changed (LoRA-A included, now that
     B moved), and every frozen tensor is bit-identical.
Any failure raises ``PreflightError`` naming the dead tensors and the usual causes.
"""
from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from medtune.errors import UserError

USUAL_CAUSES = (
    "usual causes: the forward runs under torch.no_grad()/inference_mode() (e.g. generate() or a predict helper in "
    "the training path); an output was .detach()ed, thresholded, rounded or converted to numpy and then "
    ".requires_grad_(True) was set on it; an in-place op on a view of a leaf; the module is bypassed by a fused "
    "kernel; PEFT froze a module that should train (use modules_to_save)"
)

_LORA_A = re.compile(r"\.lora_A\.")
_FROZEN_SNAPSHOT_LIMIT = 2 * 1024**3  # bytes; above this, frozen tensors are compared by a float64 fingerprint


class PreflightError(UserError, RuntimeError):
    """The message names the dead tensors and the usual causes; the CLI shows it without a traceback."""


@dataclass
class PreflightReport:
    passed: bool = False
    n_trainable: int = 0
    n_trainable_params: int = 0
    n_frozen: int = 0
    loss: float | None = None
    zero_grad_first_step: list[str] = field(default_factory=list)  # expected: LoRA-A on step one
    steps: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().flatten().double()
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    return torch.stack([flat.sum(), (flat * weights).sum(), flat.abs().max() if flat.numel() else flat.sum()]).cpu()


def selected_by_prediction(model: nn.Module) -> str | None:
    """The model's regex of parameters that reach the loss only when its own prediction selects them (or None)."""
    base = getattr(model, "module", model)  # DDP / accelerate wrappers
    hook = getattr(base, "selected_by_prediction", None)
    return hook() if callable(hook) else None


def _fail(report: PreflightReport, what: str, names: list[str]) -> None:
    shown = ", ".join(names[:20]) + (f" ... (+{len(names) - 20} more)" if len(names) > 20 else "")
    raise PreflightError(f"preflight failed: {what}: {shown}\n{USUAL_CAUSES}")


def run_preflight(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    compute_loss: Callable[[], torch.Tensor],
    backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward(),
    steps: int = 3,
) -> PreflightReport:
    """`compute_loss()` runs the recipe's own training forward on a fixed batch and returns the scalar loss."""
    report = PreflightReport()
    named = [(n, p) for n, p in model.named_parameters()]
    trainable = [(n, p) for n, p in named if p.requires_grad]
    frozen = [(n, p) for n, p in named if not p.requires_grad]
    report.n_trainable, report.n_frozen = len(trainable), len(frozen)
    report.n_trainable_params = sum(p.numel() for _, p in trainable)
    # parameters that reach the loss only when the model's own prediction selects them (a segmenting VLM's best-IoU
    # mask heads): a few steps may never pick one, which is not a bug; they still must receive a (zero) gradient
    selected = selected_by_prediction(model)
    may_be_zero = {n for n, _ in trainable if selected and re.search(selected, n)}

    # 1. the optimizer holds exactly the trainable set
    if not trainable:
        raise PreflightError(
            "preflight failed: the model has 0 trainable tensors. If an adapter was reloaded with "
            "PeftModel.from_pretrained, pass is_trainable=True (pitfall 4); if a module should train next to LoRA, "
            "list it in lora.modules_to_save (pitfall 6)."
        )
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, p in trainable if id(p) not in in_optimizer]
    if missing:
        _fail(report, "trainable tensors missing from the optimizer", missing)
    frozen_in_opt = [n for n, p in frozen if id(p) in in_optimizer]
    if frozen_in_opt:
        _fail(report, "frozen tensors inside the optimizer", frozen_in_opt)

    # snapshot everything the checks below will disturb
    model_state = {n: p.detach().clone() for n, p in trainable}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    opt_state = copy.deepcopy(optimizer.state_dict())
    # fp16: accelerate's optimizer wrapper carries the loss scaler, whose scale the preflight's steps would move
    scaler = getattr(optimizer, "scaler", None)
    scaler_state = scaler.state_dict() if scaler is not None else None
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    frozen_bytes = sum(p.numel() * p.element_size() for _, p in frozen)
    exact = frozen_bytes <= _FROZEN_SNAPSHOT_LIMIT
    frozen_before = {n: (p.detach().clone() if exact else _fingerprint(p)) for n, p in frozen}
    saved_lrs = [g["lr"] for g in optimizer.param_groups]
    # a warmup schedule starts at lr 0, which would make "changed after k steps" fail for the wrong reason
    for g in optimizer.param_groups:
        g["lr"] = g.get("initial_lr", g["lr"]) or 1e-3
    was_training = model.training
    model.train()
    try:
        # 2. finite loss that requires grad
        optimizer.zero_grad(set_to_none=True)
        try:
            loss = compute_loss()
        except RuntimeError as err:
            raise PreflightError(f"preflight failed: the training forward raised: {err}\n{USUAL_CAUSES}") from err
        if not torch.is_tensor(loss) or loss.ndim != 0:
            raise PreflightError("preflight failed: the loss must be a scalar tensor")
        if not loss.requires_grad or loss.grad_fn is None:
            raise PreflightError(
                "preflight failed: the loss does not require grad, so no trainable tensor can learn from it.\n"
                + USUAL_CAUSES
            )
        if not torch.isfinite(loss):
            raise PreflightError(f"preflight failed: the first loss is not finite ({loss.item()}); check inputs and lr")
        report.loss = float(loss.detach())
        try:
            backward(loss)
        except RuntimeError as err:  # e.g. "modified by an inplace operation" (pitfall 9)
            raise PreflightError(f"preflight failed: backward raised: {err}\n{USUAL_CAUSES}") from err

        # 3. every trainable tensor gets a finite gradient; all but LoRA-A non-zero
        no_grad = [n for n, p in trainable if p.grad is None]
        if no_grad:
            _fail(report, "trainable tensors received no gradient (dead)", no_grad)
        nonfinite = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
        if nonfinite:
            _fail(report, "trainable tensors with non-finite gradients", nonfinite)
        zero = [n for n, p in trainable if not p.grad.detach().abs().sum() > 0]
        dead_now = [n for n in zero if not _LORA_A.search(n + ".") and n not in may_be_zero]
        if dead_now:
            _fail(report, "trainable tensors whose gradient is exactly zero (dead)", dead_now)
        report.zero_grad_first_step = zero
        if zero:
            report.notes.append(f"{len(zero)} LoRA-A tensors have zero gradient on step one: expected, LoRA-B starts at 0")
        ever_nonzero = {n for n, p in trainable if p.grad.detach().abs().sum() > 0}
        optimizer.step()

        # 4. k steps: everything trainable gets gradient and moves, nothing frozen moves
        for _ in range(max(0, steps - 1)):
            optimizer.zero_grad(set_to_none=True)
            loss = compute_loss()
            backward(loss)
            ever_nonzero |= {n for n, p in trainable if p.grad is not None and p.grad.detach().abs().sum() > 0}
            optimizer.step()
        report.steps = max(1, steps)
        still_dead = [n for n, _ in trainable if n not in ever_nonzero and n not in may_be_zero]
        if still_dead:
            _fail(report, f"trainable tensors with zero gradient on all {report.steps} preflight steps (dead)", still_dead)
        unchanged = [n for n, p in trainable if torch.equal(p.detach(), model_state[n]) and n not in may_be_zero]
        if unchanged:
            _fail(report, f"trainable tensors unchanged after {report.steps} optimizer steps", unchanged)
        moved = [
            n for n, p in frozen
            if not torch.equal(p.detach() if exact else _fingerprint(p), frozen_before[n])
        ]
        if moved:
            _fail(report, "frozen tensors changed during the preflight (something trains that should not)", moved)
        report.passed = True
        return report
    finally:
        with torch.no_grad():
            for n, p in trainable:
                p.copy_(model_state[n])
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
        optimizer.load_state_dict(opt_state)
        if scaler is not None:
            scaler.load_state_dict(scaler_state)
        for g, lr in zip(optimizer.param_groups, saved_lrs):
            g["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        model.train(was_training)
