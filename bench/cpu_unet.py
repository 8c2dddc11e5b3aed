"""U-Net preset training step on CPU: before/after each speed change, side by side in one run (not a test).

    .venv/bin/python bench/cpu_unet.py [--steps 20] [--rounds 3] [--data ../shared/data/DRIVE]

One step = what `medtune train configs/drive_unet.yaml` does per step: a batch of 16 random 96^2 crops of the
training images with augmentation (num_workers 0, as the preset), the U-Net forward, ComboLoss, backward, clipping,
AdamW. Variants, alternated round by round so that load on the shared machine hits them alike:

  before          MONAI dictionary transforms per patch (medtune's pipeline at f33d689, read from git), NCHW
  augment         medtune.data.augment (one grid_sample per patch), NCHW
  augment+nhwc    the same, model and input channels-last (what medtune ships: SegModel.channels_last)

Printed per variant: ms per step, images/s, FLOPs per image (torch.utils.flop_counter, fwd + bwd), achieved
GFLOP/s, MFU against the fp32 matmul peak measured in the same run, and the data pipeline's share of the step.
`--compile` adds torch.compile(model) of the shipped variant (warm-up excluded). Memory: the activation bytes one
step keeps for backward, per variant, and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import copy
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from history import old_module

REPO = Path(__file__).resolve().parents[1]


BEFORE = "f33d689"  # the last commit whose training patches went through MONAI's dictionary transforms


class MonaiAugment:
    """The augmentation medtune used before (datasets._build_augment of BEFORE, read from git history), called like
    data.augment.Augmentation."""

    def __init__(self, aug):
        old = old_module(BEFORE, "src/medtune/data/datasets.py", "datasets_before")
        self.compose, self.plain = old._build_augment(aug), old._plain

    def __call__(self, image, mask, fov, rng):
        self.compose.set_random_state(seed=int(rng.integers(0, 2**31 - 1)))
        out = self.compose({"image": image, "mask": mask, "fov": fov})
        return self.plain(out["image"]), self.plain(out["mask"]), self.plain(out["fov"])


def main() -> None:
    from medtune.config import load_config
    from medtune.data.datasets import StepBatchSampler, TrainPatchDataset
    from medtune.data.run_split import load_split_samples, prepare_split
    from medtune.losses import ComboLoss
    from medtune.models.registry import build_model
    from medtune.train.utilisation import count_flops, measure_matmul_peak

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "DRIVE"))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--channels", default=None, help="U-Net widths instead of the preset's, e.g. 16,32,64,128")
    args = parser.parse_args()

    overrides = [f"data.path={args.data}"] if Path(args.data).is_dir() else \
        ["data.layout=synthetic", "data.path=/tmp/medtune-bench-synthetic", "data.synthetic.size=256"]
    if args.channels:
        overrides.append(f"model.config={{channels: [{args.channels}]}}")
    cfg = load_config(REPO / "configs" / "drive_unet.yaml", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        split = prepare_split(cfg, Path(tmp), True, lambda: None)
        samples = load_split_samples(cfg, split, "train", Path(tmp))
    combo = ComboLoss(cfg.loss)
    shipped = build_model(cfg).train()  # channels-last, as build_model makes the unet family
    nchw = copy.deepcopy(shipped).to(memory_format=torch.contiguous_format)
    nchw.channels_last = False  # its forward then keeps the input NCHW too
    fast = TrainPatchDataset(samples, cfg.data, seed=0)
    slow = TrainPatchDataset(samples, cfg.data, seed=0)
    slow._augment = MonaiAugment(cfg.data.augment)

    # each variant trains its own copy of the same initial weights
    variants = {"before": (slow, nchw, torch.contiguous_format),
                "augment": (fast, copy.deepcopy(nchw), torch.contiguous_format),
                "augment+nhwc": (fast, shipped, torch.channels_last)}
    if args.compile:
        variants["augment+nhwc+compile"] = (fast, torch.compile(copy.deepcopy(shipped)), torch.channels_last)
    state = {name: (torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3), iter(
        StepBatchSampler(len(ds), cfg.data.batch_size, seed=0))) for name, (ds, m, _) in variants.items()}

    def load(name):
        ds, _, fmt = variants[name]
        keys = next(state[name][1])
        batch = torch.utils.data.default_collate([ds[k] for k in keys])
        batch["image"] = batch["image"].contiguous(memory_format=fmt)
        return batch

    def step(name, batch):
        _, model, _ = variants[name]
        optimizer = state[name][0]
        loss, _ = combo(model(batch["image"]), batch["mask"], batch["fov"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def saved_for_backward_mb(name, batch) -> float:
        """Activation memory of one step: bytes autograd keeps from the forward for the backward."""
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = combo(variants[name][1](batch["image"]), batch["mask"], batch["fov"])[0]
        loss.backward()
        state[name][0].zero_grad(set_to_none=True)
        return sum(sizes) / 1e6

    flops, activations = {}, {}
    for name in variants:  # warm-up (compile happens here) and the FLOP count of one step
        for _ in range(3):
            step(name, load(name))
        batch = load(name)
        flops[name] = count_flops(lambda: combo(variants[name][1](batch["image"]), batch["mask"], batch["fov"])[0]
                                  .backward()) / batch["image"].shape[0]
        state[name][0].zero_grad(set_to_none=True)
        activations[name] = saved_for_backward_mb(name, batch)
    times = {name: {"data": [], "step": []} for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                batch = load(name)
                t1 = time.perf_counter()
                step(name, batch)
                t2 = time.perf_counter()
                times[name]["data"].append(t1 - t0)
                times[name]["step"].append(t2 - t1)
    peak = measure_matmul_peak("cpu")
    b = cfg.data.batch_size
    print(f"U-Net preset ({sum(p.numel() for p in shipped.parameters()) / 1e6:.2f} M params), batch {b} x "
          f"{cfg.data.patch_size}^2, {torch.get_num_threads()} threads, fp32 matmul peak "
          f"{peak.flops_per_s / 1e9:.1f} GFLOP/s (n={peak.matmul_size}); medians over {args.rounds} x {args.steps} "
          f"steps; data: {'DRIVE' if Path(args.data).is_dir() else 'synthetic'}")
    print(f"{'variant':22s} {'ms/step':>8s} {'data ms':>8s} {'img/s':>7s} {'GFLOP/img':>9s} {'GFLOP/s':>8s} "
          f"{'MFU':>6s} {'MFU model only':>14s} {'act. MB':>8s}")
    base = None
    for name in variants:
        data = statistics.median(times[name]["data"])
        compute = statistics.median(times[name]["step"])
        total = data + compute
        base = base or total
        achieved = flops[name] * b / total
        print(f"{name:22s} {total * 1e3:8.1f} {data * 1e3:8.1f} {b / total:7.1f} {flops[name] / 1e9:9.3f} "
              f"{achieved / 1e9:8.1f} {achieved / peak.flops_per_s:6.1%} "
              f"{flops[name] * b / compute / peak.flops_per_s:14.1%} {activations[name]:8.0f}   "
              f"x{base / total:.2f} vs before")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"act. MB = tensors saved for backward in one step; process peak RSS {rss:.0f} MB (all variants together)")


if __name__ == "__main__":
    main()
