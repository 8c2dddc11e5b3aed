"""Training-loop overhead (not a test): images/s of medtune's supervised recipe vs a minimal hand-written PyTorch
loop on the same model, data, batch, loss and optimizer, measured alternately in one run.

    .venv/bin/python bench/overhead.py [--steps 60] [--rounds 3]

medtune's throughput is read from its own metrics log (steady state: the windows after the first), the hand loop's
from the same number of steps timed after the same warm-up; the ratio medtune / hand must be >= 0.95.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader


def config(tmp: Path, steps: int, name: str):
    from medtune.config import build_config

    return build_config({}, [
        f"run.name={name}", f"run.output_dir={tmp / 'runs'}", "data.layout=synthetic", f"data.path={tmp / 'data'}",
        "data.synthetic.n_images=16", "data.synthetic.size=128", "data.patch_size=64", "data.batch_size=8",
        "data.split.val_fraction=0.0", "data.split.test_fraction=0.0", f"optim.max_steps={steps}",
        "optim.warmup_steps=5", f"train.log_every={steps // 3}", f"train.eval_every={10 * steps}",
        f"train.save_every={10 * steps}", "train.preflight=false", "train.trackers=[]",
    ])


def medtune_images_per_s(cfg) -> float:
    from medtune.runs.files import read_metrics
    from medtune.train.sft import train

    run = train(cfg)
    windows = [r["images_per_s"] for r in read_metrics(run) if "images_per_s" in r]
    return statistics.mean(windows[1:])  # the first window includes warm-up


def hand_images_per_s(cfg) -> float:
    """What a user writes by hand: same dataset, model, loss, AdamW, cosine schedule, clipping."""
    from transformers import get_cosine_schedule_with_warmup

    from medtune.data.datasets import StepBatchSampler, TrainPatchDataset
    from medtune.data.layouts import discover
    from medtune.data.loading import load_all
    from medtune.losses import ComboLoss
    from medtune.models.registry import build_model

    torch.manual_seed(0)
    samples = load_all(discover(cfg.data), cfg.data)
    dataset = TrainPatchDataset(samples, cfg.data, seed=0)
    loader = iter(DataLoader(dataset, batch_sampler=StepBatchSampler(len(dataset), cfg.data.batch_size, 0)))
    model = build_model(cfg)
    loss_fn = ComboLoss(cfg.loss)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr)
    sched = get_cosine_schedule_with_warmup(opt, cfg.optim.warmup_steps, cfg.optim.max_steps)
    warmup = cfg.train.log_every
    start, images = None, 0
    for step in range(cfg.optim.max_steps):
        if step == warmup:
            start, images = time.perf_counter(), 0
        batch = next(loader)
        loss, _ = loss_fn(model(batch["image"]), batch["mask"], batch["fov"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        images += batch["image"].shape[0]
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ours, hand = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for r in range(args.rounds):
            ours.append(medtune_images_per_s(config(tmp, args.steps, f"overhead-{r}")))
            hand.append(hand_images_per_s(config(tmp, args.steps, "hand")))
            print(f"round {r}: medtune {ours[-1]:.1f} img/s   hand-written {hand[-1]:.1f} img/s")
    ratio = statistics.median(ours) / statistics.median(hand)
    print(f"medtune / hand-written loop throughput (median of {args.rounds}): {ratio:.3f}  "
          f"({statistics.median(ours):.1f} vs {statistics.median(hand):.1f} img/s, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
