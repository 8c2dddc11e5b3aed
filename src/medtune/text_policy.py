"""Group-relative policy optimisation over sampled answers: the language model's next-token distribution (at the
sampling temperature) is the policy. Pure functions, each tested on its own:

  completion_mask      tokens of each sampled answer up to and including its first stop token
  token_logprobs       log pi(token) of the completion tokens from teacher-forced logits
  clipped_token_loss   PPO's clipped surrogate per token, weighted by the answer's group-relative advantage
  token_kl             per-token KL(pi || pi_ref) by the k3 estimator exp(r) - r - 1, r = log pi_ref - log pi
  token_entropy        per-token entropy of pi
Token terms are summed over the active tokens and divided by ``normaliser`` (the number of active tokens in the
global batch divided by the number of processes, as TRL's default "dapo" loss does): no length bias between short
and long answers, and 2 processes give the gradient of 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def completion_mask(completion_ids: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """completion_ids [N, T] -> (mask [N, T] float: 1 up to and including the first stop token, finished [N] bool:
    whether a stop token was generated at all, i.e. the answer was not cut by max_new_tokens)."""
    is_stop = torch.isin(completion_ids, torch.tensor(stop_ids, device=completion_ids.device))
    finished = is_stop.any(dim=1)
    first = torch.where(finished, is_stop.int().argmax(dim=1), torch.full_like(finished, completion_ids.shape[1],
                                                                                dtype=torch.long))
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device).expand_as(completion_ids)
    return (positions <= first[:, None]).float(), finished


def sampling_logprobs(logits: torch.Tensor, temperature: float = 1.0, suppress_ids: list[int] | None = None):
    """Log-probabilities [..., V] of the sampling distribution: logits / temperature, suppressed tokens removed."""
    scaled = logits.float() / temperature
    if suppress_ids:
        scaled = scaled.index_fill(-1, torch.tensor(suppress_ids, device=scaled.device), float("-inf"))
    return F.log_softmax(scaled, dim=-1)


def token_logprobs(logits: torch.Tensor, completion_ids: torch.Tensor, temperature: float = 1.0,
                   suppress_ids: list[int] | None = None) -> torch.Tensor:
    """logits [N, T, V] where logits[:, t] predicts completion_ids[:, t] -> log-probabilities [N, T] at
    ``temperature`` with ``suppress_ids`` never sampled (the distribution the answers were drawn from)."""
    logp = sampling_logprobs(logits, temperature, suppress_ids)
    return logp.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


def _masked_sum(values: torch.Tensor, mask: torch.Tensor, normaliser) -> torch.Tensor:
    if normaliser is None:
        normaliser = mask.sum()
    if torch.is_tensor(normaliser):
        normaliser = normaliser.to(values.device, values.dtype).clamp(min=1.0)
    else:
        normaliser = max(float(normaliser), 1.0)
    return (values * mask).sum() / normaliser


def _active(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Values with the inactive positions set to 0 *before* any arithmetic: padding after a stop token may hold a
    token the policy never samples (log-prob -inf), and -inf - -inf = NaN would poison the gradient even when
    masked afterwards."""
    return values.masked_fill(mask == 0, 0.0)


def clipped_token_loss(new: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                       clip_eps: float, normaliser=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO loss to minimise over [N, T] token log-probs with one advantage [N] per answer; returns (loss, fraction of
    active tokens whose ratio was clipped, mean ratio over active tokens)."""
    new, old = _active(new, mask), _active(old.detach(), mask)
    ratio = torch.exp(new - old)
    adv = advantages.detach()[:, None]
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)
    active = mask.sum().clamp(min=1.0)
    clipped = (((ratio - 1.0).abs() > clip_eps).float() * mask).sum() / active
    return _masked_sum(per_token, mask, normaliser), clipped.detach(), ((ratio * mask).sum() / active).detach()


def token_kl(new: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, normaliser=None) -> torch.Tensor:
    """k3 estimate of KL(pi || pi_ref) on the sampled tokens: unbiased, always >= 0, exact 0 where pi = pi_ref."""
    r = _active(ref.detach(), mask) - _active(new, mask)
    return _masked_sum(torch.exp(r) - r - 1.0, mask, normaliser)


def token_entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0, normaliser=None,
                  suppress_ids: list[int] | None = None) -> torch.Tensor:
    logp = sampling_logprobs(logits, temperature, suppress_ids)
    plogp = torch.where(torch.isfinite(logp), logp.exp() * logp, torch.zeros_like(logp))
    return _masked_sum(-plogp.sum(-1), mask, normaliser)
