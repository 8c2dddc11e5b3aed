"""Tiny image + conversation data sets and VLM configs for the instruction-tuning tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from medtune.config import build_config

QUESTION = "<image>\nIs the lesion benign or malignant?"


def write_vqa(root: Path, n: int = 8, seed: int = 0, size: int = 24) -> Path:
    """root/images/*.png + root/train.json: benign images are bright, malignant ones dark (learnable in a few steps);
    answers are the label word. Returns the JSON path."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        label = "benign" if i % 2 == 0 else "malignant"
        base = 200 if label == "benign" else 40
        pixels = np.clip(base + rng.normal(0, 15, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"case{i}.png")
        entries.append({"id": f"case{i}", "image": f"images/case{i}.png", "label": label,
                        "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": label}]})
    path = root / "train.json"
    path.write_text(json.dumps(entries))
    return path


def instruct_cfg(tmp_path: Path, *overrides: str, data: Path, model: Path | None = None, kind: str = "llava",
                 steps: int = 4, name: str = "vlm"):
    """A tiny VLM run on `data`: LoRA on `model` (a saved tiny VLM folder), or the tiny VLM from config (full)."""
    model_keys = [f"model.path={model}"] if model else [f"model.config={{preset: tiny, vlm: {kind}}}"]
    return build_config({}, [
        f"run.name={name}", f"run.output_dir={tmp_path / 'runs'}", "run.seed=0",
        f"data.path={data}", "data.batch_size=4", "data.split.val_fraction=0.25", "data.split.test_fraction=0.25",
        "data.derive_fov=false",
        "model.family=vlm", *model_keys, "lora.r=4",
        f"optim.max_steps={steps}", "optim.warmup_steps=1", "optim.lr=0.01",
        f"train.eval_every={max(steps // 2, 1)}", f"train.save_every={steps}", "train.log_every=1",
        "train.trackers=[]", "eval.bootstrap=50", "task.max_new_tokens=4", *overrides,
    ])
