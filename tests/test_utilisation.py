"""MFU: FLOP counts checked by hand, the measured peak, and what a run logs."""
from __future__ import annotations

import json
import time

import pytest
import torch
from helpers import tiny_cfg

from medtune.runs.files import read_metrics
from medtune.train.utilisation import (
    StepFlops,
    count_flops,
    measure_matmul_peak,
    mfu,
    published_bf16_peak,
    reference_peak,
)


def test_linear_flops_by_hand_full_and_frozen_weight():
    """y = x W^T: forward 2*B*I*O; backward adds dL/dx (2*B*I*O) and, only when W trains, dL/dW (2*B*I*O)."""
    b, i, o = 5, 7, 3
    x = torch.randn(b, i, requires_grad=True)
    layer = torch.nn.Linear(i, o, bias=False)
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * b * i * o
    layer.weight.requires_grad_(False)  # frozen base weight, as under LoRA: no weight gradient is computed
    assert count_flops(lambda: layer(x).sum().backward()) == 2 * 2 * b * i * o
    with torch.no_grad():
        assert count_flops(lambda: layer(x)) == 2 * b * i * o


def test_a_counted_step_computes_exactly_what_an_uncounted_one_does():
    """torch's FlopCounterMode runs silu_backward through its decomposition (other rounding): a counted step's
    gradients differed in the last bits, and a resumed run, which counts other steps, was not bit-identical. Counting
    here runs every op with its own kernel and still counts what FlopCounterMode counts (by hand: the matmul forward,
    dL/dx and dL/dW)."""
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g, requires_grad=True)
    w = torch.randn(128, 128, generator=g, requires_grad=True)
    up = torch.randn(64, 128, generator=g)

    def step():
        x.grad = w.grad = None
        (torch.nn.functional.silu(x @ w) * up).sum().backward()
        return x.grad.clone(), w.grad.clone()

    uncounted = step()
    with FlopCounterMode(display=False) as torch_count:
        step()
    flops = count_flops(step)
    assert all(torch.equal(a, b) for a, b in zip((x.grad, w.grad), uncounted))
    assert flops == torch_count.get_total_flops() == 3 * 2 * 64 * 128 * 128


def test_conv_flops_by_hand():
    """3x3 conv, C_in 2 -> C_out 4 on 8x8 (same padding), batch 1, forward only: 2 * 8*8 * 4 * 2*3*3."""
    conv = torch.nn.Conv2d(2, 4, 3, padding=1, bias=False)
    with torch.no_grad():
        assert count_flops(lambda: conv(torch.randn(1, 2, 8, 8))) == 2 * 64 * 4 * 18


def test_step_flops_counts_only_the_first_step():
    layer = torch.nn.Linear(4, 4, bias=False)
    counter = StepFlops()
    with counter.counting(n_images=2):
        layer(torch.randn(2, 4)).sum().backward()
    first = counter.total
    assert first == 2 * 2 * 2 * 4 * 4 and counter.per_image == first / 2  # forward + dL/dW (the input needs no grad)
    with counter.counting(n_images=2):
        layer(torch.randn(8, 4)).sum().backward()  # a larger step later must not replace the count
    assert counter.total == first


def test_matmul_peak_is_measured_and_mfu_is_the_ratio():
    peak = measure_matmul_peak("cpu", torch.float32, size=256)
    assert peak.flops_per_s > 1e8 and peak.dtype == "float32" and peak.matmul_size == 256
    assert mfu(1e9 * 10.0, peak_flops_per_s=4e10, processes=2) == pytest.approx(0.125)  # 1 GFLOP/image, 10 img/s


def test_run_logs_mfu_from_its_own_first_step_and_excludes_validation_time(tmp_path, monkeypatch):
    """The run's FLOPs per image equal a stand-alone count of the same model on the same batch shape, and a slow
    validation does not drag the logged throughput (hence MFU) down."""
    import medtune.tasks.masks as masks
    from medtune.train.sft import train

    slow_validation_s = 0.5
    real_validation = masks.pooled_validation

    def slow_validation(*args, **kwargs):
        time.sleep(slow_validation_s)
        return real_validation(*args, **kwargs)

    monkeypatch.setattr(masks, "pooled_validation", slow_validation)  # what the masks task's validate calls
    run = train(tiny_cfg(tmp_path, "train.eval_every=1", "train.log_every=2", steps=6))
    info = json.loads((run / "utilisation.json").read_text())
    records = [r for r in read_metrics(run) if "mfu" in r]
    assert len(records) == 3
    for r in records:
        assert 0 < r["mfu"] < 1 and r["tflops_per_s"] == pytest.approx(info["flops_per_image"] * r["images_per_s"] / 1e12)
        # 2 steps of 4 tiny 32^2 patches take milliseconds: with 2 slow validations inside the window the throughput
        # would be below 8 images / 1 s
        assert r["images_per_s"] > 8 / (2 * slow_validation_s)
    assert info["peak"]["device"] == "cpu" and info["peak"]["flops_per_s"] > 0
    # a CPU has no published peak: the reference is the measured one, said so, and both MFUs agree
    assert info["reference_peak"]["source"].startswith("measured")
    assert all(r["mfu_published"] == pytest.approx(r["mfu"]) for r in records)
    assert info["counted_shapes"] == 1  # the U-Net's patches all have one shape: counted once

    from medtune.config import load_config
    from medtune.models.registry import build_model

    model = build_model(load_config(run / "config.yaml"))
    model.train()
    image = torch.rand(4, 3, 32, 32)
    from medtune.losses import ComboLoss

    cfg = load_config(run / "config.yaml")
    combo = ComboLoss(cfg.loss)
    flops = count_flops(lambda: combo(model(image), torch.zeros(4, 1, 32, 32), torch.ones(4, 1, 32, 32))[0].backward())
    assert info["flops_per_image"] == pytest.approx(flops / 4)


def test_mfu_logging_can_be_turned_off(tmp_path):
    from medtune.train.sft import train

    run = train(tiny_cfg(tmp_path, "train.log_mfu=false", steps=2))
    assert not (run / "utilisation.json").exists()
    assert all("mfu" not in r for r in read_metrics(run))


def test_a_peak_measured_under_load_is_measured_again(tmp_path, monkeypatch):
    """A peak disturbed by another process (achieved > peak) is re-measured; the higher value is kept."""
    import medtune.train.loop as loop
    from medtune.train.sft import train
    from medtune.train.utilisation import Peak

    calls = []

    def disturbed_then_real(device, dtype, size=None, again=False):
        calls.append(again)
        return measure_matmul_peak(device, dtype, size, again) if again else Peak(1.0, "float32", "cpu", 1)

    monkeypatch.setattr(loop, "measure_matmul_peak", disturbed_then_real)
    run = train(tiny_cfg(tmp_path, "train.log_every=1", steps=2))
    assert calls[0] is False and True in calls
    assert json.loads((run / "utilisation.json").read_text())["peak"]["flops_per_s"] > 1e8
    assert all(0 < r["mfu"] < 1 for r in read_metrics(run) if "mfu" in r)


def test_step_flops_counts_each_batch_shape_once_and_estimates_past_the_cap():
    """Variable-length batches: each shape is counted the first time it runs (by hand: forward + dL/dW of a bias-free
    Linear(4, 4) = 2 x 2 x rows x 4 x 4), a repeat reuses its count, and past max_shapes a step is estimated from
    the counted FLOPs per image."""
    layer = torch.nn.Linear(4, 4, bias=False)
    counter = StepFlops(max_shapes=2)

    def step(rows):
        x = torch.randn(rows, 4)
        with counter.counting(n_images=rows, batch={"x": x}):
            layer(x).sum().backward()

    def by_hand(rows):
        return 2 * 2 * rows * 4 * 4

    step(2)
    step(8)
    assert counter.shapes == 2 and counter.window == by_hand(2) + by_hand(8) and counter.total == by_hand(2)
    step(8)  # the same shape again: its count, not a new one
    assert counter.shapes == 2 and counter.window == by_hand(2) + 2 * by_hand(8)
    step(5)  # a third shape beyond the cap: FLOPs per image of the counted steps (2 + 8 images) x 5
    assert counter.shapes == 2 and counter.estimated_steps == 1
    assert counter.window == pytest.approx(by_hand(2) + 2 * by_hand(8) + (by_hand(2) + by_hand(8)) / 10 * 5)
    assert counter.per_image == pytest.approx((by_hand(2) + by_hand(8)) / 10)


@pytest.mark.parametrize("name, device, tflops", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 989.0), ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H200", "NVIDIA H200 SXM", 989.0), ("NVIDIA A100-SXM4-80GB", "NVIDIA A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "NVIDIA A100", 312.0), ("NVIDIA A10", "NVIDIA A10", 125.0),
    ("NVIDIA L40S", "NVIDIA L40S", 362.0), ("NVIDIA L4", "NVIDIA L4", 121.0),
])
def test_published_bf16_peak_by_device_name(name, device, tflops):
    assert published_bf16_peak(name) == (device, tflops * 1e12)


def test_unlisted_gpus_and_cpus_fall_back_to_the_measured_peak_labelled_as_such():
    from medtune.train.utilisation import Peak

    assert published_bf16_peak("NVIDIA A10G") is None and published_bf16_peak("Tesla T4") is None
    measured = Peak(3e11, "float32", "cpu", 1024)
    ref = reference_peak("cpu", measured)
    assert ref.flops_per_s == 3e11 and ref.source.startswith("measured")
