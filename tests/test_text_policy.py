"""GRPO pieces for sampled answers and the answer rewards, against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from medtune.answers import answer_rewards, answer_vocabulary, resolve_answer_weights
from medtune.text_policy import clipped_token_loss, completion_mask, token_entropy, token_kl, token_logprobs

STOP = [2, 9]


def test_completion_mask_stops_after_the_first_stop_token():
    ids = torch.tensor([[5, 2, 7, 2], [5, 5, 5, 5], [9, 0, 0, 0]])
    mask, finished = completion_mask(ids, STOP)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert finished.tolist() == [True, False, True]


def test_token_logprobs_at_the_sampling_temperature():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])
    ids = torch.tensor([[0, 2]])
    lp = token_logprobs(logits, ids, temperature=2.0)
    expected = torch.log_softmax(logits / 2.0, -1).gather(-1, ids[..., None]).squeeze(-1)
    assert torch.allclose(lp, expected)
    assert lp[0, 0] == pytest.approx(1.0 - math.log(math.exp(1.0) + 1 + math.exp(-0.5)))


def test_clipped_token_loss_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -2.0])
    # on-policy: ratio 1 -> loss = -(sum of advantages over active tokens) / active tokens = -(1 + 1 - 2) / 3
    loss, clipped, ratio = clipped_token_loss(old.clone().requires_grad_(), old, adv, mask, 0.2)
    assert float(loss) == pytest.approx(0.0) and float(clipped) == 0.0 and float(ratio) == pytest.approx(1.0)
    # ratio 1.5 on every token: positive advantage is clipped at 1.2, negative one is not (min of the two)
    new = torch.full((2, 3), math.log(1.5), requires_grad=True)
    loss, clipped, _ = clipped_token_loss(new, old, adv, mask, 0.2)
    assert float(loss) == pytest.approx(-(1.2 + 1.2 - 2 * 1.5) / 3)
    assert float(clipped) == pytest.approx(1.0)
    loss.backward()
    # clipped tokens pass no gradient; the padded token none either
    assert new.grad[0].abs().sum() == 0 and new.grad[1, 0] != 0 and new.grad[1, 1:].abs().sum() == 0
    # a global normaliser: two halves give what the whole batch gives
    whole, _, _ = clipped_token_loss(new, old, adv, mask, 0.2, normaliser=mask.sum())
    halves = [clipped_token_loss(new[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], 0.2,
                                 normaliser=mask.sum() / 2)[0] for i in range(2)]
    assert float(sum(halves) / 2) == pytest.approx(float(whole))


def test_padding_with_impossible_tokens_gives_finite_loss_and_gradients():
    """Padding after a stop token may hold a suppressed token (log-prob -inf under the sampling distribution)."""
    logits = torch.randn(2, 3, 5, requires_grad=True)
    ids = torch.tensor([[1, 2, 0], [1, 1, 1]])  # row 0: stop token 2, then padding id 0
    mask, _ = completion_mask(ids, [2])
    new = token_logprobs(logits, ids, suppress_ids=[0])
    assert torch.isinf(new[0, 2])
    ref = new.detach() - 0.1
    loss = clipped_token_loss(new, new.detach(), torch.tensor([1.0, -1.0]), mask, 0.2)[0] + token_kl(new, ref, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_token_kl_and_entropy():
    mask = torch.ones(1, 2)
    same = torch.tensor([[-0.5, -1.0]])
    assert float(token_kl(same, same, mask)) == 0.0
    ref = torch.tensor([[-1.5, -1.0]])
    r = -1.0
    assert float(token_kl(same, ref, mask)) == pytest.approx((math.exp(r) - r - 1) / 2)
    uniform = torch.zeros(1, 2, 4)
    assert float(token_entropy(uniform, mask)) == pytest.approx(math.log(4))


def test_answer_rewards_and_weights():
    vocab = answer_vocabulary(["benign", "malignant"])
    answers = ["benign", "benign or malignant", "malignant", "I am not sure", "benign", "Cannot rule out malignancy.",
               "No evidence of malignancy; benign."]
    finished = [True, True, True, True, False, True, True]
    refs = ["benign", "benign", "benign", "benign", "benign", "malignant", "benign"]
    totals, parts = answer_rewards(answers, finished, refs, vocab, {"correct": 1.0, "format": 0.5})
    # a hedge naming both labels and an uncertain mention get no correctness reward (the parser's rules)
    assert parts["correct"] == [1, 0, 0, 0, 1, 0, 1]
    # two labels named / cut off by max_new_tokens / no committed label: badly formed
    assert parts["format"] == [1, 0, 1, 0, 0, 0, 1]
    assert totals == [1.5, 0.0, 0.5, 0.0, 1.0, 0.0, 1.5]
    assert resolve_answer_weights("answer") == {"correct": 1.0, "format": 0.25}
    with pytest.raises(ValueError, match="not an answer reward preset"):
        resolve_answer_weights("multi_objective")
    with pytest.raises(ValueError, match="unknown"):
        resolve_answer_weights({"dice": 1.0})
