"""Peak memory and time to the first training step against data-set size: training data decoded up front (the code
before issue 16, read from git history) against decoded on access in the loader (now); and steps/s of the lazy
loader with 0 and 2 DataLoader workers.

Synthetic 512² images + masks (generic layout) are written to a temp folder once per size. Every (size, variant) runs
in its own process, so its peak RSS (``ru_maxrss``) is its own: discover + split (near-duplicate hashing, intensity
scale), the training split loaded, the U-Net task's dataset and loader, one batch and one optimizer step.

    python bench/data_scale.py                       # 200 and 2000 images (about 3 minutes on 2 cores)
    python bench/data_scale.py --sizes 1000 10000    # the issue's sizes (writes ~10k PNGs: minutes and GBs)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from history import REPO, old_module  # noqa: E402

BEFORE = "8b8a650"  # main before issue 16: every split decoded into memory before training starts
SIZE = 512
STEPS_TIMED = 20  # steps/s is measured over this many steps after the first
BLOB = 40  # side of the synthetic lesion in pixels


def write_images(root: Path, n: int) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        mask = np.zeros((SIZE, SIZE), np.uint8)
        y, x = rng.integers(0, SIZE - BLOB, 2)
        mask[y:y + BLOB, x:x + BLOB] = 255
        # random texture per image, so no two images are near-duplicates (grouping would merge them)
        image = (rng.random((SIZE, SIZE, 3)) * 120 + 60 + (mask[..., None] > 0) * 60).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"img{i:05d}.png", compress_level=1)
        Image.fromarray(mask).save(root / "masks" / f"img{i:05d}.png", compress_level=1)


def child(data_dir: str, variant: str, workers: int, steps: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from medtune.config import build_config
    from medtune.data.datasets import StepBatchSampler
    from medtune.data.run_split import load_split_samples, prepare_split
    from medtune.models.registry import build_run_model
    from medtune.tasks import collate_for, task_for

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    run_dir = Path(tempfile.mkdtemp(prefix="run-"))
    cfg = build_config({}, [
        "data.layout=generic", f"data.path={data_dir}", "data.patch_size=96", "data.batch_size=8",
        "data.patches_per_image=4", f"data.num_workers={workers}", "run.seed=0",
        "model.config={channels: [8, 16, 32], strides: [2, 2], num_res_units: 1}",
    ])
    data = prepare_split(cfg, run_dir)
    t_split = time.perf_counter()
    if variant == "before":
        old = old_module(BEFORE, "src/medtune/data/run_split.py", "run_split_before")
        train = old.load_split_samples(cfg, data, "train", run_dir)
    else:
        train = load_split_samples(cfg, data, "train", run_dir, lazy=True)
    t_load = time.perf_counter()
    task = task_for(cfg)
    model = build_run_model(cfg)
    dataset = task.train_dataset(train, cfg, model)
    loss_fn = task.make_loss(cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sampler = StepBatchSampler(len(dataset), cfg.data.batch_size, cfg.run.seed)
    loader = {"batches": iter(DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                         collate_fn=collate_for(task, dataset), generator=torch.Generator()))}

    def step():
        loss, _ = loss_fn(model, next(loader["batches"]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    t_first = time.perf_counter()
    for _ in range(steps):
        step()
    t_end = time.perf_counter()
    loader.clear()  # shuts the workers down, so their peak RSS is counted below
    return {"images_train": len(train), "split_s": t_split - t0, "load_s": t_load - t_split,
            "first_step_s": t_first - t0, "steps_per_s": steps / (t_end - t_first) if steps else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if workers else None}


def run_child(data_dir: Path, variant: str, workers: int, steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, __file__, "--child", str(data_dir), variant, str(workers), str(steps)],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{variant} with {workers} workers failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 2000])
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))))
        return
    print(f"{'images':>7} {'variant':<22} {'train imgs':>10} {'split s':>8} {'load s':>7} {'1st step s':>10} "
          f"{'peak RSS MB':>11} {'worker MB':>9} {'steps/s':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            data_dir = Path(tmp) / f"n{n}"
            t = time.perf_counter()
            write_images(data_dir, n)
            print(f"# {n} images of {SIZE}² written in {time.perf_counter() - t:.1f} s", flush=True)
            rows = [("before: eager", "before", 0, 0), ("now: lazy, 0 workers", "now", 0, STEPS_TIMED),
                    ("now: lazy, 2 workers", "now", 2, STEPS_TIMED)]
            for label, variant, workers, steps in rows:
                r = run_child(data_dir, variant, workers, steps)
                sps = f"{r['steps_per_s']:.2f}" if r["steps_per_s"] else "-"
                worker = f"{r['worker_rss_mb']:.0f}" if r["worker_rss_mb"] else "-"
                print(f"{n:>7} {label:<22} {r['images_train']:>10} {r['split_s']:>8.1f} {r['load_s']:>7.1f} "
                      f"{r['first_step_s']:>10.1f} {r['peak_rss_mb']:>11.0f} {worker:>9} {sps:>8}", flush=True)


if __name__ == "__main__":
    main()
