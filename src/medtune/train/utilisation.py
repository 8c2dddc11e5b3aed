"""Model FLOP utilisation (MFU): FLOPs one training step executes, per image, against the device's measured peak.

FLOPs come from the model itself: ``torch.utils.flop_counter.FlopCounterMode`` records every matmul, convolution and
attention kernel (forward and backward) that the first training step of a run dispatches, so LoRA's skipped weight
gradients, frozen encoders and a task's extra forwards (RL's reference pass) are counted as they run, for every
family alike. Elementwise ops (norms, activations, the optimizer) are not counted: they are not what the peak
measures. With activation checkpointing the recomputed forward is counted too (hardware FLOPs, not model FLOPs).

The peak is measured, not looked up: the best of a few large matmuls in the dtype the run computes in (bf16 under
bf16 mixed precision, else fp32), on the run's device, when the run starts. MFU = achieved FLOP/s / (peak x
processes), where achieved = FLOPs per image x images per second of training (validation and checkpoint time
excluded).
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

# Square matmul sizes for the peak: large enough to reach the device's steady-state throughput, small enough to
# take well under a second. CPU: 2*1024^3 = 2.1 GFLOP per product; GPU: 2*8192^3 = 1.1 TFLOP.
PEAK_MATMUL_SIZE = {"cpu": 1024, "cuda": 8192}
PEAK_MIN_SECONDS = 0.3  # time the products for at least this long (after one warm-up product) ...
PEAK_MIN_REPEATS = 3  # ... and at least this many times; the fastest one is the peak


@dataclass
class Peak:
    flops_per_s: float
    dtype: str
    device: str
    matmul_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def compute_dtype(mixed_precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def measure_matmul_peak(device: torch.device | str, dtype: torch.dtype = torch.float32,
                        size: int | None = None, again: bool = False) -> Peak:
    """The best achieved FLOP/s of an n x n by n x n matmul, n = PEAK_MATMUL_SIZE[device type] unless given;
    measured once per process, device and dtype (a second run in the same process reuses it) unless ``again``."""
    if again:
        _measure.cache_clear()
    return _measure(str(torch.device(device)), dtype, size)


@functools.lru_cache(maxsize=None)
def _measure(device: str, dtype: torch.dtype, size: int | None) -> Peak:
    device = torch.device(device)
    n = size or PEAK_MATMUL_SIZE.get(device.type, PEAK_MATMUL_SIZE["cuda"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator(device="cpu").manual_seed(0)  # its own generator: the run's RNG stream is not touched
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: kernel selection, thread pool start
    sync()
    best, spent, repeats = float("inf"), 0.0, 0
    while spent < PEAK_MIN_SECONDS or repeats < PEAK_MIN_REPEATS:
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        took = time.perf_counter() - start
        best, spent, repeats = min(best, took), spent + took, repeats + 1
    return Peak(2.0 * n**3 / best, str(dtype).removeprefix("torch."), str(device), n)


class StepFlops:
    """Counts the FLOPs of the first step(s) it is asked to, then stays out of the way.

    ``with counter.counting(n_images): <forward + backward>`` counts that block (once per run); afterwards
    ``counter.per_image`` holds FLOPs per image and the context is a no-op."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.per_image: float | None = None
        self.total: int | None = None

    @contextlib.contextmanager
    def counting(self, n_images: int):
        if not self.enabled or self.per_image is not None or n_images <= 0:
            yield
            return
        mode = FlopCounterMode(display=False)
        with mode:
            yield
        self.total = int(mode.get_total_flops())
        self.per_image = self.total / n_images


def count_flops(fn) -> int:
    """FLOPs that ``fn()`` dispatches (matmul, convolution, attention; forward and backward)."""
    mode = FlopCounterMode(display=False)
    with mode:
        fn()
    return int(mode.get_total_flops())


def mfu(flops_per_image: float, images_per_s: float, peak_flops_per_s: float, processes: int = 1) -> float:
    return flops_per_image * images_per_s / (peak_flops_per_s * processes)

