"""The dead-gradient watch: a trainable part that stops reaching the loss during training is reported, by name."""
from __future__ import annotations

import torch
from torch import nn

from medtune.train.gradient_watch import DeadGradientWatch, dead_gradient_message


class TwoInputAttention(nn.Module):
    """A query attends to two inputs, each through its own value projection; ``gap`` is the attention-logit gap in
    favour of the first. At a gap of 1000 float32's softmax gives the second input a weight of exactly 0: the way a
    memory attention whose logits grew stops reading its spatial memories (the sam2_video demo)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)
        self.gap = 0.0

    def forward(self, x):
        weights = torch.softmax(torch.tensor([self.gap, 0.0]), dim=0)
        return weights[0] * self.first(x) + weights[1] * self.second(x)


def _backward(model, gap: float) -> None:
    model.gap = gap
    model.zero_grad(set_to_none=True)
    model(torch.ones(2, 4)).sum().backward()


def test_a_part_that_stops_reaching_the_loss_is_reported_once_by_name():
    model = TwoInputAttention()
    watch = DeadGradientWatch(model, checks=3)
    _backward(model, 5.0)  # saturating but not saturated: the second input still gets a (small) gradient
    assert watch.check() == [] and model.second.weight.grad.abs().max() > 0
    found = []
    for _ in range(4):
        _backward(model, 1000.0)
        found.append(watch.check())
    assert found[:2] == [[], []] and found[3] == []  # on the third zero check, once
    assert sorted(found[2]) == ["second.bias", "second.weight"] and watch.dead == ["second.bias", "second.weight"]
    _backward(model, 0.0)  # it reads the second input again: no longer dead, and reported again if it dies again
    assert watch.check() == [] and watch.dead == []
    for _ in range(3):
        _backward(model, 1000.0)
        found = watch.check()
    assert sorted(found) == ["second.bias", "second.weight"]


def test_steps_without_any_gradient_do_not_count_and_exempt_tensors_are_not_watched():
    model = TwoInputAttention()
    watch = DeadGradientWatch(model, checks=2, exempt=r"^second\.bias$")
    for _ in range(3):  # no gradient anywhere (e.g. an RL group whose samples all got the same reward)
        model.zero_grad(set_to_none=True)
        assert watch.check() == []
    _backward(model, 1000.0)
    assert watch.check() == []  # one zero check so far
    _backward(model, 1000.0)
    assert watch.check() == ["second.weight"]  # second.bias is exempt


def test_message_names_the_tensors_and_the_way_out():
    names = [f"net.memory_encoder.layer{i}.weight" for i in range(10)]
    msg = dead_gradient_message(120, names, 3, 10)
    assert "step 120: 10 trainable tensors" in msg and "net.memory_encoder.layer0.weight" in msg
    assert "(+2 more)" in msg and "optim.lr" in msg and "train.dead_gradient_checks=0" in msg
