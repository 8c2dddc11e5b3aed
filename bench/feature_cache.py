"""Frozen-encoder feature cache (not a test): decoder-only SAM training with and without ``train.feature_cache``,
side by side in one process on the same batches, from the same initial weights.

    OMP_NUM_THREADS=1 .venv/bin/python bench/feature_cache.py                      # CPU: a small SAM at 256^2
    python bench/feature_cache.py --vit-b                                           # GPU: SAM ViT-B at 1024^2, bf16

The set-up is the MedSAM-style "train the decoder" one: ``model.finetune=full model.freeze_image_encoder=true``, whole
images, no augmentation, box prompts. A fixed set of ``--images`` random images is visited epoch by epoch (batches
from one permutation per epoch); the two models take their steps alternately, so machine noise hits both alike.
Reported: steps/s and images/s in the first epoch (the cache is filled: every image a miss) and after it (hits),
their ratio, the time the cache's lookups take, and the largest loss difference over all steps (the cache must not
change training beyond float noise).
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

# Small enough for a CPU, big enough that the encoder dominates a step as it does at ViT-B scale.
SMALL_SAM = {
    "vision_config": {"hidden_size": 384, "output_channels": 256, "num_hidden_layers": 6, "num_attention_heads": 6,
                      "mlp_dim": 1536, "image_size": 256, "patch_size": 16, "window_size": 8,
                      "global_attn_indexes": [2, 5], "initializer_range": 0.02},
    "prompt_encoder_config": {"image_size": 256, "patch_size": 16},
}


def build_pair(vit_b: bool, patch: int):
    from medtune.config import build_config
    from medtune.models.feature_cache import use_feature_cache
    from medtune.models.registry import build_model

    sam = {} if vit_b else SMALL_SAM  # {}: transformers' SamConfig() = ViT-B, 1024^2
    cfg = build_config({}, ["model.family=sam", f"model.config={json.dumps(sam)}", "model.finetune=full",
                            "model.freeze_image_encoder=true", "model.prompt=box", "data.sampling=whole_image",
                            "data.augment.enabled=false", f"data.patch_size={patch}", "train.feature_cache=memory"])
    torch.manual_seed(0)
    plain = build_model(cfg)
    cached = copy.deepcopy(plain)
    use_feature_cache(cached, cfg)
    return cfg, plain, cached


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vit-b", action="store_true", help="SAM ViT-B at 1024^2 (needs a GPU to be practical)")
    parser.add_argument("--images", type=int, default=16, help="distinct training images (one epoch)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for cuda)")
    args = parser.parse_args()
    device = torch.device(args.device)
    bf16 = args.bf16 if args.bf16 is not None else device.type == "cuda"
    if args.images % args.batch:
        parser.error("--images must be a multiple of --batch (whole epochs)")
    patch = 1024 if args.vit_b else 256

    from medtune.losses import ComboLoss

    cfg, plain, cached = build_pair(args.vit_b, patch)
    plain, cached = plain.to(device), cached.to(device)
    loss_fn = ComboLoss(cfg.loss)
    optimizers = {m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for m in (plain, cached)}
    g = torch.Generator().manual_seed(1)
    images = torch.rand(args.images, 3, patch, patch, generator=g)
    masks = torch.zeros(args.images, 1, patch, patch)
    boxes = []
    for i in range(args.images):  # one random rectangle per image, its box the prompt
        y, x = torch.randint(0, patch // 2, (2,), generator=g).tolist()
        h, w = torch.randint(patch // 8, patch // 2, (2,), generator=g).tolist()
        masks[i, 0, y:y + h, x:x + w] = 1.0
        boxes.append([float(x), float(y), float(x + w), float(y + h)])
    boxes = torch.tensor(boxes)
    steps_per_epoch = args.images // args.batch
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(model, idx) -> tuple[float, float]:
        batch = {"image": images[idx].to(device), "mask": masks[idx].to(device), "box": boxes[idx].to(device)}
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch=batch).mask_logits
        loss, _ = loss_fn(logits.float(), batch["mask"], None)
        loss.backward()
        optimizers[model].step()
        optimizers[model].zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start, float(loss.detach())

    times = {(name, phase): 0.0 for name in ("plain", "cached") for phase in ("first", "after")}
    max_diff = max_rel = 0.0
    for epoch in range(args.epochs):
        order = torch.randperm(args.images, generator=torch.Generator().manual_seed(100 + epoch))
        phase = "first" if epoch == 0 else "after"
        for s in range(steps_per_epoch):
            idx = order[s * args.batch:(s + 1) * args.batch]
            t_plain, l_plain = step(plain, idx)
            t_cached, l_cached = step(cached, idx)
            times[("plain", phase)] += t_plain
            times[("cached", phase)] += t_cached
            max_diff = max(max_diff, abs(l_plain - l_cached))
            max_rel = max(max_rel, abs(l_plain - l_cached) / max(abs(l_plain), 1e-12))
    # the cache's own overhead on a hit: digest the batch and fetch its entries
    lookup = time.perf_counter()
    for s in range(steps_per_epoch):
        batch_images = images[s * args.batch:(s + 1) * args.batch].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            cached.feature_cache.features(batch_images, cached.encoder_features)
    sync()
    lookup = (time.perf_counter() - lookup) / args.images

    stats = cached.feature_cache.stats()
    trainable, total = cached.param_counts()
    name = device.type if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"device {name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{'ViT-B' if args.vit_b else 'small SAM'} {patch}^2, batch {args.batch}, {args.images} images x "
          f"{args.epochs} epochs, bf16 {bf16}; trainable {trainable / 1e6:.2f} M of {total / 1e6:.1f} M")
    after_steps = steps_per_epoch * (args.epochs - 1)
    for phase, steps in (("first", steps_per_epoch), ("after", after_steps)):
        if steps == 0:
            continue
        rate = {m: steps / times[(m, phase)] for m in ("plain", "cached")}
        label = "epoch 1 (cache filled)" if phase == "first" else f"epochs 2-{args.epochs} (cache hits)"
        print(f"{label:26s} no cache {rate['plain']:6.2f} steps/s {rate['plain'] * args.batch:7.2f} img/s | "
              f"cache {rate['cached']:6.2f} steps/s {rate['cached'] * args.batch:7.2f} img/s | "
              f"x{rate['cached'] / rate['plain']:.2f}")
    print(f"cache lookup on a hit: {lookup * 1e3:.2f} ms per image; {stats}")
    print(f"max |loss difference| over {steps_per_epoch * args.epochs} steps: {max_diff:.3g} (relative {max_rel:.3g})")


if __name__ == "__main__":
    main()
