"""Peak memory and time to the first training step against data-set size: training data decoded up front (the code
before issue 16, read from git history) against decoded on access in the loader (now); and steps/s of the lazy
loader with 0 and 2 DataLoader workers. Two tasks: the U-Net mask task on synthetic 512² images + masks (generic
layout), and instruction tuning of the tiny LLaVA on conversations about those images (llava_json, two questions
per image, so N conversations use N/2 images).

Every (size, variant) runs in its own process, so its peak RSS (``ru_maxrss``) is its own: discover + split
(near-duplicate hashing, intensity scale), the training split, the task's dataset and loader, one batch and one
optimizer step, then timed steps. "before" runs 8b8a650's run_split / inspect (hashing) / instruct dataset; where the
eager split would not fit in memory (``--eager-max``), "before: split only" times its split preparation alone.

    python bench/data_scale.py                                          # 200 and 2000 images (minutes on 2 cores)
    python bench/data_scale.py --sizes 1000 10000 --conversations 1000 10000 --data-root /tmp/medtune-scale
        # the issue's sizes; --data-root keeps the written PNGs (10k: ~7 GB, minutes to write) for the next run
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


def _config(data_dir: str, task: str, workers: int):
    from medtune.config import build_config

    common = [f"data.num_workers={workers}", "run.seed=0"]
    if task == "masks":
        return build_config({}, [
            "data.layout=generic", f"data.path={data_dir}", "data.patch_size=96", "data.batch_size=8",
            "data.patches_per_image=4", "model.config={channels: [8, 16, 32], strides: [2, 2], num_res_units: 1}",
            *common])
    conversations, image_root = data_dir.split("::")
    return build_config({}, [
        "data.layout=llava_json", f"data.path={conversations}", f"data.image_root={image_root}", "data.batch_size=4",
        "data.derive_fov=false", "model.family=vlm", "model.config={preset: tiny, vlm: llava}",
        "model.vlm.max_length=512", *common])


def child(data_dir: str, task: str, variant: str, workers: int, steps: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from medtune.data.datasets import StepBatchSampler
    from medtune.data.run_split import load_split_samples, prepare_split
    from medtune.models.registry import build_run_model
    from medtune.tasks import collate_for, task_for

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    run_dir = Path(tempfile.mkdtemp(prefix="run-"))
    cfg = _config(data_dir, task, workers)
    if variant.startswith("before"):
        old = old_module(BEFORE, "src/medtune/data/run_split.py", "run_split_before")
        # its near-duplicate hashing too (the module looks the function up in its own globals)
        old.find_near_duplicates = old_module(BEFORE, "src/medtune/data/inspect.py",
                                              "inspect_before").find_near_duplicates
        data = old.prepare_split(cfg, run_dir)
    else:
        data = prepare_split(cfg, run_dir)
    t_split = time.perf_counter()
    if variant == "before-split":
        return {"images_train": len(data.split["train"]), "split_s": t_split - t0, "load_s": None,
                "first_step_s": None, "steps_per_s": None,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "worker_rss_mb": None}
    if variant == "before":
        train = old.load_split_samples(cfg, data, "train", run_dir)
    else:
        train = load_split_samples(cfg, data, "train", run_dir, lazy=True)
    t_load = time.perf_counter()
    task_ = task_for(cfg)
    model = build_run_model(cfg)
    t_model = time.perf_counter()
    if variant == "before" and task == "instruct":
        dataset = old_module(BEFORE, "src/medtune/tasks/instruct.py", "instruct_before").InstructDataset(
            train, model.text_codec())
    else:
        dataset = task_.train_dataset(train, cfg, model)
    t_dataset = time.perf_counter()
    loss_fn = task_.make_loss(cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sampler = StepBatchSampler(len(dataset), cfg.data.batch_size, cfg.run.seed)
    loader = {"batches": iter(DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                         collate_fn=collate_for(task_, dataset), generator=torch.Generator()))}

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
            "dataset_s": t_dataset - t_model, "first_step_s": t_first - t0,
            "steps_per_s": steps / (t_end - t_first) if steps else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if workers else None}


def run_child(data_dir: str, task: str, variant: str, workers: int, steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, __file__, "--child", data_dir, task, variant, str(workers), str(steps)],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{task} {variant} with {workers} workers failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def images_at(root: Path, n: int) -> Path:
    """root/n{n}: n synthetic images + masks, written unless a finished copy is there (marker file DONE)."""
    data_dir = root / f"n{n}"
    if not (data_dir / "DONE").exists():
        t = time.perf_counter()
        write_images(data_dir, n)
        (data_dir / "DONE").write_text(f"{n} images\n")
        print(f"# {n} images of {SIZE}² written in {time.perf_counter() - t:.1f} s", flush=True)
    return data_dir


def conversations_at(root: Path, n: int, sizes: list[int]) -> str:
    """n conversations, two questions about each of n/2 images (of the largest image set asked for when it has
    enough, else of root/n{n/2}): 'json::image root'."""
    needed = (n + 1) // 2
    images = images_at(root, max(sizes) if sizes and max(sizes) >= needed else needed)
    path = root / f"conversations{n}.json"
    if not path.exists():
        rng = np.random.default_rng(0)
        questions = ("<image>\nIs the lesion benign or malignant?", "<image>\nDescribe the finding in one word.")
        entries = []
        for i in range(n):
            label = "benign" if rng.random() < 0.5 else "malignant"
            entries.append({"id": f"c{i:05d}", "image": f"images/img{i // 2:05d}.png", "label": label,
                            "conversations": [{"from": "human", "value": questions[i % 2]},
                                              {"from": "gpt", "value": label}]})
        path.write_text(json.dumps(entries))
    return f"{path}::{images}"


def print_row(n: int, task: str, label: str, r: dict) -> None:
    def num(key, fmt):
        return format(r[key], fmt) if r.get(key) is not None else "-"

    print(f"{n:>7} {task:<9} {label:<24} {r['images_train']:>10} {num('split_s', '8.1f')} {num('load_s', '7.1f')} "
          f"{num('dataset_s', '9.1f')} {num('first_step_s', '10.1f')} {num('peak_rss_mb', '11.0f')} "
          f"{num('worker_rss_mb', '9.0f')} {num('steps_per_s', '8.2f')}", flush=True)


def rows(n: int, eager_max: int) -> list[tuple[str, str, int, int]]:
    before = [("before: eager", "before", 0, 0)] if n <= eager_max else [("before: split only", "before-split", 0, 0)]
    return before + [("now: lazy, 0 workers", "now", 0, STEPS_TIMED), ("now: lazy, 2 workers", "now", 2, STEPS_TIMED)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[200, 2000], help="image counts (mask task)")
    ap.add_argument("--conversations", type=int, nargs="*", default=[], help="conversation counts (instruct)")
    ap.add_argument("--data-root", help="keep the written data here and reuse it (default: a temporary folder)")
    ap.add_argument("--eager-max", type=int, default=2000,
                    help="largest size run eagerly (the eager split holds ~3.5 MB per 512² training image)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        data_dir, task, variant, workers, steps = args.child
        print(json.dumps(child(data_dir, task, variant, int(workers), int(steps))))
        return
    print(f"# load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    print(f"{'size':>7} {'task':<9} {'variant':<24} {'train':>10} {'split s':>8} {'load s':>7} {'dataset s':>9} "
          f"{'1st step s':>10} {'peak RSS MB':>11} {'worker MB':>9} {'steps/s':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_root or tmp)
        for n in args.sizes:
            data_dir = str(images_at(root, n))
            for label, variant, workers, steps in rows(n, args.eager_max):
                print_row(n, "masks", label, run_child(data_dir, "masks", variant, workers, steps))
        for n in args.conversations:
            data = conversations_at(root, n, args.sizes)
            for label, variant, workers, steps in rows(n, args.eager_max):
                print_row(n, "instruct", label, run_child(data, "instruct", variant, workers, steps))
        print(f"# load average at end: {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
