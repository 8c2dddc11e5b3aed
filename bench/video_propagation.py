"""Propagation through a whole video: frames/s and peak memory against sequence length, medtune's bounded memory
bank (`models.video.propagate`) side by side with transformers' own streaming session (every frame's outputs kept).

    .venv/bin/python bench/video_propagation.py                          # CPU, tiny SAM 2 video model at 64²
    .venv/bin/python bench/video_propagation.py --frames 100 1000
    .venv/bin/python bench/video_propagation.py --device cuda --sam2-tiny-size --frames 100 1000   # GPU: Hiera-T 1024²

Each (mode, length) runs in a fresh process, so peak memory is that run's alone: peak RSS on CPU
(resource.getrusage), torch.cuda.max_memory_allocated on a GPU. Flat memory = the 1,000-frame peak equals the
100-frame one; the stock session's grows with every frame. The frames are one noisy disk image moved a pixel per frame
(content does not change the cost), generated on the fly so the video itself never sits in memory.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MB = 2**20


def one_run(mode: str, n_frames: int, device: str, tiny: bool, threads: int) -> dict:
    import torch

    from medtune.config import build_config
    from medtune.models import video as V
    from medtune.models.registry import build_model

    torch.set_num_threads(threads)
    model_cfg = {"family": "sam2_video", "finetune": "full", "prompt": "mask",
                 "config": {"preset": "tiny"} if tiny else {}}
    seg = build_model(build_config({"data": {"channels": 3, "sampling": "whole_image"}, "model": model_cfg}))
    seg = seg.to(device).eval()
    size = seg.image_size
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    noise = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0)) * 0.3

    def frame(i: int) -> torch.Tensor:
        cx = size / 2 + (size / 8) * torch.sin(torch.tensor(i / 10.0))
        disk = ((xx - cx) ** 2 + (yy - size / 2) ** 2 < (size / 6) ** 2).float()
        return (noise + 0.6 * disk).clamp(0, 1)

    prompt_mask = (frame(0)[0] > 0.5).float()
    bank = {"frames": 0, "bytes": 0}

    def after(session) -> None:
        bank["frames"] = max(bank["frames"], V.memory_bank_frames(session))
        bank["bytes"] = max(bank["bytes"], V.memory_bank_bytes(session))

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if mode == "bounded":
        for _ in V.propagate(seg, (frame(i) for i in range(n_frames)), V.VideoPrompt(mask=prompt_mask),
                             after_frame=after):
            pass
    else:  # transformers' streaming session as it is: nothing is ever dropped from its bank
        from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

        net = seg.base_network
        session = Sam2VideoInferenceSession(inference_device=device, inference_state_device=device,
                                            video_storage_device=device, dtype=torch.float32)
        obj = session.obj_id_to_idx(V.OBJECT_ID)
        session.add_mask_inputs(obj, 0, V.prompt_mask_input(prompt_mask[None, None].to(device), size))
        session.obj_with_new_inputs = [V.OBJECT_ID]
        with torch.inference_mode():
            for i in range(n_frames):
                pixels = seg._encoder_input(frame(i).to(device)[None])
                net(inference_session=session, frame_idx=i, frame=pixels[0])
                after(session)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"mode": mode, "frames": n_frames, "frames_per_s": n_frames / seconds, "peak_mb": peak / MB,
            "bank_frames": bank["frames"], "bank_mb": bank["bytes"] / MB, "size": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sam2-tiny-size", action="store_true",
                    help="transformers' default Sam2VideoConfig (Hiera-T, 1024²) instead of the 64² test model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", nargs=2, metavar=("MODE", "FRAMES"), help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one[0], int(args.one[1]), args.device, not args.sam2_tiny_size, args.threads)))
        return
    rows = []
    for n in args.frames:
        for mode in ("bounded", "stock"):
            cmd = [sys.executable, __file__, "--one", mode, str(n), "--device", args.device, "--threads",
                   str(args.threads)] + (["--sam2-tiny-size"] if args.sam2_tiny_size else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"device {args.device}, input {rows[0]['size']}², {args.threads} thread(s)")
    print(f"{'mode':8} {'frames':>6} {'frames/s':>9} {'peak MB':>9} {'bank frames':>11} {'bank MB':>8}")
    for r in rows:
        print(f"{r['mode']:8} {r['frames']:6d} {r['frames_per_s']:9.1f} {r['peak_mb']:9.1f} {r['bank_frames']:11d} "
              f"{r['bank_mb']:8.2f}")
    lo, hi = min(args.frames), max(args.frames)
    for mode in ("bounded", "stock"):
        a = next(r for r in rows if r["mode"] == mode and r["frames"] == lo)
        b = next(r for r in rows if r["mode"] == mode and r["frames"] == hi)
        print(f"{mode}: peak {hi} / {lo} frames = x{b['peak_mb'] / a['peak_mb']:.2f}, "
              f"bank x{b['bank_mb'] / a['bank_mb']:.2f}, frames/s x{b['frames_per_s'] / a['frames_per_s']:.2f}")


if __name__ == "__main__":
    main()
