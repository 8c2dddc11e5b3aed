"""Where the loss of a clip reaches a ``sam2_video`` model: the memory-conditioned image embedding against the
high-resolution skip features, on a trained run and on the initial weights.

    .venv/bin/python bench/video_memory_gradient.py runs/demo-video/video         # after `medtune demo video`

SAM 2's mask decoder takes two kinds of image input: the stride-16 embedding, which is what the memory attention
conditions on earlier frames, and the stride-4 / stride-8 features of the current frame alone, added in while the
decoder upsamples. Memory can only act through the first. The script runs one clip of the run's data (its first test
video, the frames the training clips have) through the clip forward in training mode and prints the norm of the
loss gradient at each of the decoder's inputs, summed over the tracked frames, and the gradient norms of the memory
modules' parameters against the mask decoder's, for the run's best checkpoint and for the same architecture as
initialised. A memory path whose input gets orders of magnitude less gradient than the skip features barely trains.
"""
from __future__ import annotations

import argparse
from pathlib import Path

MODULES = ("memory_attention", "memory_encoder", "object_pointer_proj", "mask_decoder", "vision_encoder")


def test_clip(cfg, run: Path, frames: int) -> dict:
    """The first clip the training sampler draws from the run's first test video, as a batch of one."""
    from medtune.data.run_split import prepare_split
    from medtune.data.video import VideoClipDataset, collate_clips

    data = prepare_split(cfg, run)
    cfg.data.video.clip_length = frames
    video = data.samples[data.split["test"][0]]
    return collate_clips([VideoClipDataset([video], cfg.data, seed=cfg.run.seed)[0]])


def gradients(seg, clip: dict, loss_fn) -> dict[str, float]:
    decoder = seg.base_network.mask_decoder
    inputs: dict[str, list] = {"embedding (memory-conditioned)": [], "stride-8 skip": [], "stride-4 skip": []}

    def keep(module, args, kwargs):
        embedding, (s0, s1) = kwargs["image_embeddings"], kwargs["high_resolution_features"]
        for name, tensor in zip(inputs, (embedding, s1, s0)):
            if tensor.requires_grad:
                tensor.retain_grad()
                inputs[name].append(tensor)

    handle = decoder.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        seg.train()
        seg.zero_grad(set_to_none=True)
        loss_fn(seg, clip)[0].backward()
    finally:
        handle.remove()
    row = {name: float(sum(t.grad.norm() ** 2 for t in ts if t.grad is not None) ** 0.5) for name, ts in inputs.items()}
    for module in MODULES:
        grads = [p.grad for n, p in seg.named_parameters() if f".{module}." in f".{n}" and p.grad is not None]
        row[f"params: {module}"] = float(sum(g.norm() ** 2 for g in grads) ** 0.5) if grads else 0.0
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--frames", type=int, default=8)
    args = parser.parse_args()

    import torch

    from medtune.models.registry import build_run_model
    from medtune.runs.load import load_run_model
    from medtune.tasks.video import make_loss

    cfg, trained, ckpt = load_run_model(args.run, "best", "cpu")
    clip, loss_fn = test_clip(cfg, args.run, args.frames), make_loss(cfg)
    torch.manual_seed(cfg.run.seed)
    initial = build_run_model(cfg)
    rows = {f"trained ({ckpt.name})": gradients(trained, clip, loss_fn),
            "initial weights": gradients(initial, clip, loss_fn)}
    names = list(next(iter(rows.values())))
    print(f"{args.run}: gradient norms of one {args.frames}-frame clip's loss (training mode)")
    print(f"  {'':<34}" + "".join(f"{title:>24}" for title in rows))
    for name in names:
        print(f"  {name:<34}" + "".join(f"{row[name]:>24.2e}" for row in rows.values()))
    for title, row in rows.items():
        skip = max(row["stride-8 skip"], row["stride-4 skip"])
        print(f"  {title}: embedding / largest skip = {row['embedding (memory-conditioned)'] / skip:.1e}")


if __name__ == "__main__":
    main()
