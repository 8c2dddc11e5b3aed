"""Cost of one segvlm training step vs one step of the SAM 2 family alone (not a test), side by side in one process.

    OMP_NUM_THREADS=1 .venv/bin/python bench/segvlm_cost.py [--steps 30] [--warmup 5] [--batch 8] [--size 128]
                                                             [--modes lora,full] [--no-rss]

Both sides use the same tiny SAM 2 (``medtune.models.sam.tiny_sam2_config``, 64x64 input), the same images (one
fixed batch), the same optimizer (``make_optimizer``: AdamW with the config's lr / weight decay), gradient clipping
as the recipe does, and each task's own loss (segvlm: ComboLoss with Sa2VA weights + LM cross-entropy; sam2:
ComboLoss, semantic mode). segvlm adds the tiny InternVL-style VLM (random init) in front: the teacher-forced
question + "It is [SEG]." pass, and the [SEG] hidden state as SAM 2's sparse prompt. One step = forward + loss +
backward + clip + optimizer step + zero_grad; steps of the two models alternate and the medians are compared.
Peak RSS (Linux; ``--no-rss`` skips it) is measured in a fresh child process per model that builds it and runs a
few steps, so it includes the interpreter, torch and transformers (~0.5 GB) as any run does.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch

TINY_SEGVLM = {"preset": "tiny", "vlm": "internvl"}
TINY_SAM2 = {"preset": "tiny"}
CLASS_NAME = "blood vessel"
FOREGROUND_FRACTION = 0.12  # about DRIVE's vessel fraction; the content does not change the cost
RSS_STEPS = 3


def build(family: str, mode: str, args):
    """(cfg, model, batch, loss_fn) for one family; the images are the same for every call (fixed seed)."""
    from medtune.config import build_config
    from medtune.models.registry import build_model
    from medtune.tasks import task_for
    from medtune.tasks.segvlm import collate, conversation

    model_cfg = {"family": family, "finetune": mode, "config": TINY_SEGVLM if family == "segvlm" else TINY_SAM2}
    cfg = build_config({"model": model_cfg, "data": {"sampling": "whole_image", "patch_size": args.size,
                                                     "batch_size": args.batch},
                        "task": {"class_name": CLASS_NAME}}, [])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(args.batch, 1, args.size, args.size, generator=g) > 1 - FOREGROUND_FRACTION).float()
    image = torch.rand(args.batch, 3, args.size, args.size, generator=g) * 0.5 + mask * 0.5
    fov = torch.ones_like(mask)
    if family == "segvlm":
        questions, answers = conversation([None], cfg)
        batch = collate([{**model.encode(image[i], questions, answers, f"img{i}"), "mask": mask[i], "fov": fov[i]}
                         for i in range(args.batch)])
    else:
        batch = {"image": image, "mask": mask, "fov": fov}
    return cfg, model, batch, task_for(cfg).make_loss(cfg)


def stepper(family: str, mode: str, args):
    from medtune.train.setup import make_optimizer

    cfg, model, batch, loss_fn = build(family, mode, args)
    optimizer = make_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = cfg.optim.clip_grad_norm or float("inf")

    def step() -> float:
        t = time.perf_counter()
        loss, _ = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    return step, trainable, total


def _peak_rss_child(family: str, mode: str, args, queue) -> None:
    torch.set_num_threads(args.threads)
    step, _, _ = stepper(family, mode, args)
    for _ in range(RSS_STEPS):
        step()
    queue.put(_high_water_mb())


def _high_water_mb() -> float:
    """This process's peak RSS. Not ru_maxrss: Linux carries it across exec, so a spawned child would report its
    parent's peak; VmHWM belongs to the address space the exec created."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith("VmHWM:")), float("nan"))  # kB


def peak_rss_mb(family: str, mode: str, args) -> float:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_child, args=(family, mode, args, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def main() -> None:
    import logging

    logging.disable(logging.WARNING)
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--no-rss", dest="rss", action="store_false")
    args = parser.parse_args()
    args.threads = torch.get_num_threads()
    print(f"batch {args.batch} x {args.size}^2, {args.threads} thread(s), median of {args.steps} alternated steps "
          f"after {args.warmup} warm-up; tiny SAM 2 (64^2 input) in both")
    results = []
    for mode in args.modes.split(","):
        sam2, sam2_trainable, sam2_total = stepper("sam2", mode, args)
        segvlm, seg_trainable, seg_total = stepper("segvlm", mode, args)
        for _ in range(args.warmup):
            sam2(), segvlm()
        t_sam2, t_seg = [], []
        for _ in range(args.steps):
            t_sam2.append(sam2())
            t_seg.append(segvlm())
        a, b = statistics.median(t_sam2), statistics.median(t_seg)
        row = {"mode": mode, "sam2_ms": round(a * 1000, 1), "segvlm_ms": round(b * 1000, 1), "ratio": round(b / a, 2),
               "sam2_trainable": sam2_trainable, "sam2_params": sam2_total,
               "segvlm_trainable": seg_trainable, "segvlm_params": seg_total}
        if args.rss:
            row["sam2_peak_rss_mb"] = round(peak_rss_mb("sam2", mode, args))
            row["segvlm_peak_rss_mb"] = round(peak_rss_mb("segvlm", mode, args))
        results.append(row)
        rss = (f"   peak RSS {row['sam2_peak_rss_mb']} / {row['segvlm_peak_rss_mb']} MB" if args.rss else "")
        print(f"{mode:5s} sam2 {row['sam2_ms']:7.1f} ms ({sam2_trainable}/{sam2_total} trainable)   segvlm "
              f"{row['segvlm_ms']:7.1f} ms ({seg_trainable}/{seg_total})   ratio {row['ratio']:.2f}{rss}")
    json.dump(results, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
