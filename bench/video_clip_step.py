"""The clip training step of family ``sam2_video``: B clips in one batch against the same B clips one at a time.

    .venv/bin/python bench/video_clip_step.py                      # CPU, tiny SAM 2 video model at 64², 4 x 8 frames
    .venv/bin/python bench/video_clip_step.py --clips 4 --frames 8 --device cuda

Both sides run ``forward_clip`` + backward of the same loss on the same clips (semantic mode: every frame decodes its
three masks and keeps the one with the best predicted IoU) and give the same logits and gradients (checked in eval
mode, printed); what differs is that the batch decodes all clips of a frame in one mask-decoder call
(``models.video._best_mask_per_clip`` makes the best-of-three choice per clip, which transformers' own indexing gets
wrong for several clips), where one clip at a time is what the clip forward did before. Prints seconds per step of
each and their ratio.
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from medtune.config import build_config
    from medtune.models.registry import build_model

    torch.manual_seed(0)
    cfg = build_config({"data": {"channels": 1}, "model": {"family": "sam2_video", "finetune": "full",
                                                            "config": {"preset": "tiny"}}})
    seg = build_model(cfg).to(args.device).train()
    size = seg.image_size
    gen = torch.Generator().manual_seed(0)
    frames = torch.rand(args.clips, args.frames, 1, size, size, generator=gen).to(args.device)
    masks = (torch.rand(args.clips, args.frames, 1, size, size, generator=gen) > 0.9).float().to(args.device)
    params = [p for p in seg.parameters() if p.requires_grad]

    def step(rows: list[slice]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for p in params:
            p.grad = None
        logits = []
        for r in rows:
            out = seg.forward_clip(frames[r])
            # one loss over all clips, so that the gradients of both sides are the same sum
            (torch.nn.functional.binary_cross_entropy_with_logits(out.mask_logits, masks[r], reduction="sum")
             / masks.numel()).backward()
            logits.append(out.mask_logits.detach())
        return torch.cat(logits), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    sides = {"one batch": [slice(0, args.clips)],
             "one clip at a time": [slice(i, i + 1) for i in range(args.clips)]}
    # the outputs to compare come from eval mode: in training mode the memory attention's dropout draws other
    # random numbers for a batch than for its clips one by one
    seg.eval()
    results = {name: step(rows) for name, rows in sides.items()}
    seg.train()
    seconds = {}
    for name, rows in sides.items():
        step(rows)  # warm-up
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            step(rows)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds[name] = (time.perf_counter() - start) / args.repeats
    (a_logits, a_grads), (b_logits, b_grads) = results.values()
    logit_delta = (a_logits - b_logits).abs().max().item()
    grad_delta = max((a - b).abs().max().item() for a, b in zip(a_grads, b_grads)) / max(
        b.abs().max().item() for b in b_grads)
    print(f"{args.clips} clips x {args.frames} frames at {size}², {args.device}, {torch.get_num_threads()} threads; "
          f"max |logit delta| {logit_delta:.1e}, max |gradient delta| / max |gradient| {grad_delta:.1e}")
    for name, s in seconds.items():
        print(f"  {name:<20} {s:.3f} s/step")
    print(f"  one batch / one clip at a time: x{seconds['one batch'] / seconds['one clip at a time']:.2f}")


if __name__ == "__main__":
    main()
