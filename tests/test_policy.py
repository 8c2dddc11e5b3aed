"""GRPO pieces: sampling, log-probs, group-relative advantages, PPO clipping, KL, entropy."""
import math

import torch

from medtune.policy import bernoulli_entropy, bernoulli_kl, clipped_objective, group_advantages, group_logprob, sample_group


def test_sample_group_shape_and_frequency():
    torch.manual_seed(0)
    logits = torch.tensor([-2.0, 0.0, 3.0]).view(1, 1, 1, 3)
    masks = sample_group(logits, group_size=4000)
    assert masks.shape == (1, 4000, 1, 1, 3) and set(masks.unique().tolist()) <= {0.0, 1.0}
    freq = masks.mean(dim=(0, 1, 2, 3))
    assert torch.allclose(freq, torch.sigmoid(logits).flatten(), atol=0.03)


def test_logprob_matches_hand_computation_and_respects_fov():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 1.0]]).view(1, 1, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 1, 2, 2)
    p = torch.sigmoid(logits).flatten().tolist()
    per_pixel = [math.log(p[0]), math.log(1 - p[1]), math.log(1 - p[2]), math.log(p[3])]
    assert torch.allclose(group_logprob(logits, mask, None, reduction="sum"), torch.tensor([[sum(per_pixel)]]))
    assert torch.allclose(group_logprob(logits, mask, None, reduction="mean"), torch.tensor([[sum(per_pixel) / 4]]))
    fov = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    assert torch.allclose(group_logprob(logits, mask, fov, reduction="mean"), torch.tensor([[sum(per_pixel[:2]) / 2]]))


def test_logprob_and_its_gradient_equal_the_per_pixel_bernoulli_sum():
    """The batched m*x - softplus(x) form against the plain per-pixel log-likelihood, several images and samples."""
    torch.manual_seed(0)
    logits = (torch.randn(3, 1, 5, 6) * 4).requires_grad_(True)
    masks = (torch.rand(3, 4, 1, 5, 6) > 0.5).float()
    fov = (torch.rand(3, 1, 5, 6) > 0.3).float()
    for reduction in ("sum", "mean"):
        for temperature in (1.0, 0.7):
            x = (logits / temperature).unsqueeze(1).expand_as(masks)
            per_pixel = masks * torch.nn.functional.logsigmoid(x) + (1 - masks) * torch.nn.functional.logsigmoid(-x)
            direct = (per_pixel * fov.unsqueeze(1)).sum(dim=(2, 3, 4))
            if reduction == "mean":
                direct = direct / fov.sum(dim=(1, 2, 3)).unsqueeze(1)
            ours = group_logprob(logits, masks, fov, temperature, reduction)
            assert torch.allclose(ours, direct, atol=1e-4)
            weights = torch.randn(3, 4)
            (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
            (g_direct,) = torch.autograd.grad((direct * weights).sum(), logits)
            assert torch.allclose(g_ours, g_direct, atol=1e-5)


def test_advantages_normalised_per_group():
    rewards = torch.tensor([[0.1, 0.2, 0.3, 0.4], [5.0, 5.0, 7.0, 9.0]])
    adv = group_advantages(rewards)
    assert torch.allclose(adv.mean(dim=1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(adv.std(dim=1, unbiased=False), torch.ones(2), atol=2e-3)
    assert torch.equal(group_advantages(torch.full((1, 8), 0.7)), torch.zeros(1, 8))  # no signal, no push


def test_clipping_active_only_outside_trust_region():
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    inside = torch.log(torch.tensor([[1.1, 0.9, 1.1, 0.9]]))
    _, frac, _ = clipped_objective(inside, old, adv, clip_eps=0.2)
    assert frac == 0
    new = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]])).requires_grad_(True)
    loss, frac, _ = clipped_objective(new, old, adv, clip_eps=0.2)
    assert frac == 1.0
    loss.backward()
    # positive advantage & ratio above 1+eps, negative advantage & ratio below 1-eps: clipped, no gradient;
    # the other two are not clipped by min() (pessimistic bound) and keep their gradient
    assert new.grad[0, 0] == 0 and new.grad[0, 3] == 0
    assert new.grad[0, 1] != 0 and new.grad[0, 2] != 0
    # value: -(mean of min(r*A, clip(r)*A))
    expected = -torch.tensor([1.2, 0.5, -1.5, -0.8]).mean()
    assert torch.allclose(loss, expected)


def test_kl_zero_at_reference_positive_elsewhere_and_differentiable():
    ref = torch.randn(2, 1, 5, 5)
    assert bernoulli_kl(ref.clone(), ref, None).abs() < 1e-6
    logits = (ref + 1.0).requires_grad_(True)
    kl = bernoulli_kl(logits, ref, None)
    assert kl > 0
    kl.backward()
    assert logits.grad.abs().sum() > 0
    # analytic value for one pixel
    p, q = torch.sigmoid(torch.tensor(1.0)), torch.sigmoid(torch.tensor(0.0))
    expected = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    assert torch.allclose(bernoulli_kl(torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), None), expected)


def test_entropy_max_at_half():
    assert torch.allclose(bernoulli_entropy(torch.zeros(1, 1, 2, 2), None), torch.tensor(math.log(2)))
    assert bernoulli_entropy(torch.full((1, 1, 2, 2), 6.0), None) < 0.02


def test_kl_and_entropy_are_means_of_per_sample_terms():
    """Two processes holding half a batch each must average to the one-process value (FOV sizes differ)."""
    logits, ref = torch.randn(4, 1, 6, 6), torch.randn(4, 1, 6, 6)
    fov = torch.ones(4, 1, 6, 6)
    fov[0, :, :3] = 0
    fov[3, :, :, :1] = 0
    for fn, args in ((bernoulli_kl, (logits, ref)), (bernoulli_entropy, (logits,))):
        whole = fn(*args, fov)
        halves = (fn(*(a[:2] for a in args), fov[:2]) + fn(*(a[2:] for a in args), fov[2:])) / 2
        assert torch.allclose(whole, halves, atol=1e-6)


def test_kl_and_entropy_sum_reduction_sums_over_each_fov():
    """reduction="sum" = per-image sum over the FOV (as group_logprob's), then the mean over images."""
    logits, ref = torch.randn(3, 1, 5, 5), torch.randn(3, 1, 5, 5)
    fov = torch.ones(3, 1, 5, 5)
    fov[1, :, :2] = 0  # 15 pixels instead of 25
    counts = fov.sum(dim=(1, 2, 3))
    for fn, args in ((bernoulli_kl, (logits, ref)), (bernoulli_entropy, (logits,))):
        per_image = torch.stack([fn(*(a[i:i + 1] for a in args), fov[i:i + 1]) for i in range(3)])
        assert torch.allclose(fn(*args, fov), per_image.mean())
        assert torch.allclose(fn(*args, fov, reduction="sum"), (per_image * counts).mean())
