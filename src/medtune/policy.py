"""Group-relative policy optimisation over masks: the model's per-pixel probabilities are a Bernoulli policy.

Pure functions, each tested on its own:
  sample_group      G masks per image from one forward (no gradient: sampling is not differentiable)
  group_logprob     log pi(mask) = sum or mean over FOV pixels of the per-pixel Bernoulli log-likelihood
  group_advantages  (r - mean_group) / (std_group + eps)
  clipped_objective PPO's clipped-ratio surrogate, with the fraction of clipped ratios
  bernoulli_kl      exact KL(pi || pi_ref) per pixel, mean (or sum) over the FOV (analytic: no sampling noise)
  bernoulli_entropy per-pixel entropy, mean (or sum) over the FOV
The gradient reaches the model only through group_logprob / bernoulli_kl / bernoulli_entropy of the *live* logits.
All three take the same `reduction`: with "sum" the log-prob (hence the policy gradient) grows with the pixel count,
so KL and entropy must too, or kl_coef / entropy_coef would weigh them ~pixel-count times less than under "mean".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_group(logits: torch.Tensor, group_size: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B,1,H,W] -> masks [B,G,1,H,W] in {0,1} (float)."""
    probs = torch.sigmoid(logits.detach().float() / temperature).unsqueeze(1)
    shape = (probs.shape[0], group_size, *probs.shape[2:])
    # u < p is a Bernoulli(p) draw; one uniform kernel is ~3x faster than torch.bernoulli on CPU
    uniform = torch.rand(shape, generator=generator, device=probs.device, dtype=probs.dtype)
    return (uniform < probs).to(probs.dtype)


def _fov_weights(fov: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if fov is None:
        return torch.ones_like(like[:, :1])
    return fov.to(like.dtype)


def group_logprob(logits: torch.Tensor, masks: torch.Tensor, fov: torch.Tensor | None, temperature: float = 1.0,
                  reduction: str = "mean") -> torch.Tensor:
    """log-probability [B,G] of each sampled mask under the policy given by `logits` [B,1,H,W].

    Per pixel log p(m) = m*x - softplus(x) (x = logit / T), so the sum over the FOV is one batched product of the
    G masks with w*x minus a softplus term shared by the group: no [B,G,H,W] tensor enters the autograd graph."""
    x = logits.float() / temperature
    w = _fov_weights(fov, x)
    b, g = masks.shape[:2]
    chosen = torch.bmm(masks.reshape(b, g, -1).to(x.dtype), (w * x).reshape(b, -1, 1)).squeeze(2)  # sum w*m*x
    total = chosen - (w * F.softplus(x)).sum(dim=(1, 2, 3)).unsqueeze(1)
    if reduction == "sum":
        return total
    return total / w.sum(dim=(1, 2, 3)).clamp(min=1.0).unsqueeze(1)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """rewards [B,G] -> advantages normalised within each image's group. A group whose samples all score the same
    carries no signal and gets advantage 0."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    advantages = (rewards - mean) / (std + eps)
    # float noise of an all-equal group (std ~1e-8) must not turn into a push
    return torch.where(std > 1e-6, advantages, torch.zeros_like(advantages))


def clipped_objective(new_logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor,
                      clip_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO loss (to minimise), fraction of clipped ratios, mean ratio."""
    ratio = torch.exp(new_logprob - old_logprob.detach())
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = -torch.minimum(unclipped, clipped).mean()
    clip_fraction = ((ratio - 1.0).abs() > clip_eps).float().mean()
    return loss, clip_fraction.detach(), ratio.detach().mean()


def _masked_reduce(values: torch.Tensor, fov: torch.Tensor | None, reduction: str = "mean") -> torch.Tensor:
    """Mean (or sum) over each image's FOV pixels, then mean over images: a mean of per-sample terms, so
    data-parallel halves of a batch average to the whole batch's value (as ComboLoss does)."""
    w = _fov_weights(fov, values)
    per_sample = (values * w).sum(dim=(1, 2, 3))
    if reduction != "sum":
        per_sample = per_sample / w.sum(dim=(1, 2, 3)).clamp(min=1.0)
    return per_sample.mean()


def bernoulli_kl(logits: torch.Tensor, ref_logits: torch.Tensor, fov: torch.Tensor | None,
                 temperature: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Mean (or sum) over FOV pixels of KL(Bern(p) || Bern(q)), p from `logits`, q from the frozen reference."""
    lp, lq = logits.float() / temperature, ref_logits.detach().float() / temperature
    p = torch.sigmoid(lp)
    kl = p * (F.logsigmoid(lp) - F.logsigmoid(lq)) + (1 - p) * (F.logsigmoid(-lp) - F.logsigmoid(-lq))
    return _masked_reduce(kl, fov, reduction)


def bernoulli_entropy(logits: torch.Tensor, fov: torch.Tensor | None, temperature: float = 1.0,
                      reduction: str = "mean") -> torch.Tensor:
    lp = logits.float() / temperature
    p = torch.sigmoid(lp)
    entropy = -(p * F.logsigmoid(lp) + (1 - p) * F.logsigmoid(-lp))
    return _masked_reduce(entropy, fov, reduction)
