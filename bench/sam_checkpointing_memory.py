"""Why activation checkpointing does not lower SAM's peak memory at 1024^2 (not a test; CPU is enough to show it).

    .venv/bin/python bench/sam_checkpointing_memory.py [--image 1024] [--hidden 96] [--layers 4]

A SAM image encoder shaped like ViT-B's at 1024^2 (16 px patches -> 64 x 64 = 4096 tokens, 14 px windows, every
second layer global) but narrow, so one CPU run takes seconds. Each setting runs in its own process and reports the
peak resident memory of one training forward + backward (LoRA on qkv/proj, as medtune's SAM default) above the
memory after the model was built. Settings: eager / sdpa attention x checkpointing off / on, and the same with
windowed attention only (no global layers). The global layers' decomposed relative-position bias is a dense
[batch, heads, 4096, 4096] tensor in both attention implementations (transformers' SamVisionSdpaAttention passes it
as attn_mask), and it depends on the query, so it is built again, with its gradient, inside each layer's recompute:
checkpointing drops what is stored between layers but not this transient, which sets the peak.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def one(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import SamVisionConfig, SamVisionModel

    torch.manual_seed(0)
    n_layers = args.layers
    global_layers = [] if args.windowed_only else list(range(1, n_layers, 2))
    config = SamVisionConfig(hidden_size=args.hidden, num_hidden_layers=n_layers, num_attention_heads=args.heads,
                             mlp_dim=4 * args.hidden, output_channels=32, image_size=args.image, patch_size=16,
                             window_size=14, global_attn_indexes=global_layers, initializer_range=0.02)
    config._attn_implementation = args.attention
    model = SamVisionModel(config)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["qkv", "proj"])).train()
    image = torch.rand(1, 3, args.image, args.image)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = model(pixel_values=image).last_hidden_state
    out.float().square().mean().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb_above_model": (peak - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--windowed-only", action="store_true")
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args)))
        return
    tokens = (args.image // 16) ** 2
    print(f"SAM-shaped encoder: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, {args.image}^2 -> "
          f"{tokens} tokens; one dense bias of a global layer = {args.heads * tokens**2 * 4 / 1e6:.0f} MB (fp32)")
    base = [sys.executable, __file__, "--child", f"--image={args.image}", f"--hidden={args.hidden}",
            f"--heads={args.heads}", f"--layers={args.layers}"]
    for windowed in (False, True):
        for attention in ("eager", "sdpa"):
            row = []
            for ckpt in (False, True):
                cmd = base + [f"--attention={attention}"] + (["--checkpointing"] if ckpt else []) + \
                    (["--windowed-only"] if windowed else [])
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                row.append(json.loads(out)["peak_mb_above_model"])
            kind = "windowed only" if windowed else "global every 2nd"
            print(f"{kind:17s} {attention:5s}: peak above model {row[0]:7.0f} MB without checkpointing, "
                  f"{row[1]:7.0f} MB with  (x{row[1] / row[0]:.2f})")


if __name__ == "__main__":
    main()
