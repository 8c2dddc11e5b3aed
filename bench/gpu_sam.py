"""GPU benchmark (not a test; needs CUDA): SAM ViT-B at its real size (randomly initialised from SamConfig():
speed does not depend on weight values) at 1024^2, bf16 autocast, LoRA r=32 (+ trained mask decoder) vs full
fine-tuning, QLoRA (4-bit NF4 base) when bitsandbytes is available, and LoRA with activation checkpointing.
Images/s and peak GPU memory.

    python bench/gpu_sam.py [--batch 4] [--steps 20]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def save_random_sam(folder: Path) -> Path:
    """SAM ViT-B (transformers' SamConfig() default) with random weights, saved like a downloaded checkpoint, so
    every mode goes through the real from_pretrained path (QLoRA quantises at load time)."""
    from transformers import SamConfig, SamModel

    if not (folder / "config.json").exists():
        config = SamConfig()
        config.vision_config.initializer_range = 0.02
        SamModel(config).save_pretrained(folder)
    return folder


def measure(mode: str, batch: int, steps: int, base: Path) -> dict:
    from medtune.config import build_config
    from medtune.losses import ComboLoss
    from medtune.models.registry import build_model

    overrides = ["model.family=sam", f"model.path={base}", "lora.preset=medium", "data.patch_size=1024"]
    overrides.append("model.finetune=full" if mode == "full" else "model.finetune=lora")
    if mode == "qlora":
        overrides.append("model.quantize_4bit=true")
    if mode == "lora-gc":  # non-reentrant activation checkpointing: memory for compute
        overrides.append("model.gradient_checkpointing=true")
    cfg = build_config({}, overrides)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_model(cfg)
    if mode == "qlora":  # 4-bit weights are placed on the GPU at load time; only the wrapper's buffers move
        for module in model.modules():
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = buf.cuda()
    else:
        model = model.cuda()
    trainable, total = model.param_counts()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = ComboLoss(cfg.loss)
    g = torch.Generator(device="cuda").manual_seed(0)
    image = torch.rand(batch, 3, 1024, 1024, device="cuda", generator=g)
    mask = (torch.rand(batch, 1, 1024, 1024, device="cuda", generator=g) > 0.9).float()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(image)
        loss, _ = loss_fn(logits, mask, None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()  # build_model returns training mode; without it transformers skips checkpointing (issue 10)
    for _ in range(3):
        step()
    from medtune.train.utilisation import count_flops

    flops_per_image = count_flops(step) / batch
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    result = {"mode": mode, "images_per_s": batch * steps / elapsed, "flops_per_image": flops_per_image,
              "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
              "trainable_params_m": trainable / 1e6, "total_params_m": total / 1e6}
    model = opt = None  # noqa: F841 -- free GPU memory before the next mode
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--modes", default="lora,full,qlora,lora-gc")
    args = parser.parse_args()
    from medtune.train.utilisation import measure_matmul_peak

    peak = measure_matmul_peak("cuda", torch.bfloat16)
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, batch {args.batch} x 1024^2, bf16; "
          f"measured bf16 matmul peak {peak.flops_per_s / 1e12:.0f} TFLOP/s (n={peak.matmul_size})")
    rows = []
    base = save_random_sam(Path(tempfile.mkdtemp()) / "sam-vit-b")
    for mode in args.modes.split(","):
        try:
            rows.append(measure(mode, args.batch, args.steps, base))
        except Exception as err:  # noqa: BLE001 -- a missing bitsandbytes must not hide the other rows
            print(f"{mode}: failed: {type(err).__name__}: {err}")
            continue
        r = rows[-1]
        achieved = r["flops_per_image"] * r["images_per_s"]
        print(f"{mode:6s} {r['images_per_s']:7.2f} img/s  {r['flops_per_image'] / 1e12:.2f} TFLOP/img  "
              f"{achieved / 1e12:6.1f} TFLOP/s  MFU {achieved / peak.flops_per_s:5.1%}  peak {r['peak_gb']:6.2f} GB  "
              f"trainable {r['trainable_params_m']:.2f} M / {r['total_params_m']:.1f} M")
    by = {r["mode"]: r for r in rows}
    if "lora" in by and "full" in by:
        print(f"LoRA / full: throughput x{by['lora']['images_per_s'] / by['full']['images_per_s']:.2f}, "
              f"peak memory x{by['lora']['peak_gb'] / by['full']['peak_gb']:.2f}")


if __name__ == "__main__":
    main()
