"""Model FLOP utilisation (MFU): FLOPs the training steps execute against the device's peak, measured and published.

FLOPs come from the model itself: ``torch.utils.flop_counter.FlopCounterMode`` records every matmul, convolution and
attention kernel (forward and backward) that a training step dispatches. A step's FLOPs depend on its batch's shapes
only, so each distinct shape (a VLM batch padded to its longest conversation has its own length) is counted the first
time it runs and reused after; beyond MAX_COUNTED_SHAPES distinct shapes a step is estimated from the counted ones'
FLOPs per image. So LoRA's skipped weight
gradients, frozen encoders and a task's extra forwards (RL's reference pass) are counted as they run, for every
family alike. Elementwise ops (norms, activations, the optimizer) are not counted: they are not what the peak
measures. With activation checkpointing the recomputed forward is counted too (hardware FLOPs, not model FLOPs).

Two peaks. ``mfu``: against a peak measured when the run starts, the best of a few large matmuls in the dtype the run
computes in (bf16 under bf16 mixed precision, else fp32) on the run's device: what this machine can do now.
``mfu_published``: against the device's published dense bf16 peak (PUBLISHED_BF16_PEAKS, by GPU name), the figure
published MFU numbers divide by; a CPU has no such figure, so there it is the measured peak, labelled as measured.
MFU = achieved FLOP/s / (peak x processes), where achieved = the FLOPs of the logging window's steps / its training
time (validation and checkpoint time excluded).

Counting must not change what a step computes: ``FlopCounterMode`` itself runs every op that has a composite
decomposition (``silu_backward``, ...) through that decomposition, so that the matmuls it is made of are counted --
other arithmetic than the op's own kernel, so a counted step's gradients differed from an uncounted one's in the last
bits, and a resumed run (which counts the first step of each shape it sees again) was not bit-identical to the
uninterrupted one. ``count_flops`` / ``StepFlops`` therefore run each op with its own kernel, as without counting, and
count it as FlopCounterMode does: by its FLOP formula, or, where it decomposes, by running the decomposition on meta
tensors (shapes only, nothing computed).
"""
from __future__ import annotations

import contextlib
import functools
import re
import time
from dataclasses import asdict, dataclass

import torch
from torch._C import DispatchKey
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
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


# Distinct batch shapes counted per run; a step of yet another shape is estimated from the counted FLOPs per image
# (counting costs a slower step, and a VLM's batch lengths can take hundreds of values).
MAX_COUNTED_SHAPES = 64


def shape_key(batch: dict | None):
    """What a step's FLOPs depend on: the shapes of its batch's tensors (None: one shape for the whole run)."""
    if batch is None:
        return None
    return tuple(sorted((k, tuple(v.shape)) for k, v in batch.items() if torch.is_tensor(v)))


def _on_meta(value):
    if torch.is_tensor(value):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    return value


class FlopCountingAsRun(TorchDispatchMode):
    """``with FlopCountingAsRun() as mode: <block>``; ``mode.total``: the FLOPs FlopCounterMode counts in the block,
    while every op runs with the kernel it runs uncounted (see the module's docstring)."""

    def __init__(self):
        super().__init__()
        self.total = 0
        self._meta_counter = FlopCounterMode(display=False)  # counts a decomposition run on meta tensors
        self._formulas = self._meta_counter.flop_registry  # op -> FLOPs from its arguments' and output's shapes
        self._decomposes: dict = {}

    def _has_decomposition(self, func) -> bool:
        known = self._decomposes.get(func)
        if known is None:  # what OpOverload.decompose looks for
            key = DispatchKey.CompositeImplicitAutograd
            known = key in func.py_kernels or torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key)
            self._decomposes[func] = known
        return known

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)  # the op's own kernel: the result an uncounted step gets
        if self._has_decomposition(func):
            try:
                with self._meta_counter:  # (entering resets its counts)
                    func.decompose(*tree_map(_on_meta, args), **tree_map(_on_meta, kwargs))
            except (RuntimeError, NotImplementedError):
                return out  # a decomposition that reads tensor values cannot run on shapes: not counted
            self.total += self._meta_counter.get_total_flops()
        elif func._overloadpacket in self._formulas:
            self.total += self._formulas[func._overloadpacket](*args, **kwargs, out_val=out)
        return out


class StepFlops:
    """FLOPs of each step: counted the first time a batch shape runs, reused for that shape after.

    ``with counter.counting(n_images, batch): <forward + backward>`` adds the block's FLOPs to ``window`` (the
    caller reads and resets it). ``per_image``: FLOPs per image over the counted steps; ``total``: the first counted
    step's FLOPs; ``shapes``: how many distinct shapes were counted."""

    def __init__(self, enabled: bool = True, max_shapes: int = MAX_COUNTED_SHAPES):
        self.enabled, self.max_shapes = enabled, max_shapes
        self._counted: dict = {}  # shape key -> (FLOPs, images)
        self.total: int | None = None
        self.window = 0.0
        self.estimated_steps = 0

    @property
    def per_image(self) -> float | None:
        if not self._counted:
            return None
        return sum(f for f, _ in self._counted.values()) / sum(n for _, n in self._counted.values())

    @property
    def shapes(self) -> int:
        return len(self._counted)

    @contextlib.contextmanager
    def counting(self, n_images: int, batch: dict | None = None):
        key = shape_key(batch)
        if not self.enabled or n_images <= 0:
            yield
        elif key in self._counted:
            yield
            flops, counted_images = self._counted[key]
            self.window += flops * n_images / counted_images
        elif len(self._counted) >= self.max_shapes:
            yield
            self.window += self.per_image * n_images
            self.estimated_steps += 1
        else:
            with FlopCountingAsRun() as mode:
                yield
            flops = int(mode.total)
            self._counted[key] = (flops, n_images)
            self.total = flops if self.total is None else self.total
            self.window += flops


def count_flops(fn) -> int:
    """FLOPs that ``fn()`` dispatches (matmul, convolution, attention; forward and backward)."""
    with FlopCountingAsRun() as mode:
        fn()
    return int(mode.total)


def mfu(achieved_flops_per_s: float, peak_flops_per_s: float, processes: int = 1) -> float:
    """Model FLOP utilisation: the FLOPs the run achieved per second over the peak of all its processes."""
    return achieved_flops_per_s / (peak_flops_per_s * processes)



# Published dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' datasheets; the first pattern that
# matches torch.cuda.get_device_name() wins (more specific names first: "H100 PCIe" before "H100", "A100" is not A10).
PUBLISHED_BF16_PEAKS: list[tuple[str, str, float]] = [
    (r"GH200", "NVIDIA GH200", 989.0),
    (r"H200 NVL", "NVIDIA H200 NVL", 835.0),
    (r"H200", "NVIDIA H200 SXM", 989.0),
    (r"H100 NVL", "NVIDIA H100 NVL", 835.0),
    (r"H100 PCIe", "NVIDIA H100 PCIe", 756.0),
    (r"H100", "NVIDIA H100 SXM", 989.0),
    (r"B200", "NVIDIA B200", 2250.0),
    (r"A100", "NVIDIA A100", 312.0),
    (r"\bA10\b", "NVIDIA A10", 125.0),
    (r"\bA30\b", "NVIDIA A30", 165.0),
    (r"\bA40\b", "NVIDIA A40", 149.7),
    (r"L40S", "NVIDIA L40S", 362.0),
    (r"\bL40\b", "NVIDIA L40", 181.0),
    (r"\bL4\b", "NVIDIA L4", 121.0),
]
TERA = 1e12


@dataclass
class ReferencePeak:
    flops_per_s: float
    source: str  # "published dense bf16 (<device>)" or "measured (...)"

    def to_dict(self) -> dict:
        return asdict(self)


def published_bf16_peak(device_name: str) -> tuple[str, float] | None:
    """(device, dense bf16 FLOP/s) from PUBLISHED_BF16_PEAKS for a GPU name, or None when it is not listed."""
    for pattern, name, tflops in PUBLISHED_BF16_PEAKS:
        if re.search(pattern, device_name):
            return name, tflops * TERA
    return None


def reference_peak(device: torch.device | str, measured: Peak) -> ReferencePeak:
    """The peak published MFU figures divide by: a listed GPU's published dense bf16 peak; otherwise (a CPU, an
    unlisted GPU) the measured one, labelled as measured."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = published_bf16_peak(name)
        if found is not None:
            return ReferencePeak(found[1], f"published dense bf16 ({found[0]})")
        return ReferencePeak(measured.flops_per_s, f"measured ({name} is not in PUBLISHED_BF16_PEAKS)")
    return ReferencePeak(measured.flops_per_s, f"measured ({measured.dtype} matmul; CPUs have no published peak)")
