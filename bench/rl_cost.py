"""Cost of one RL iteration vs one supervised step (not a test), same LoRA U-Net, same batch, measured alternately.

    .venv/bin/python bench/rl_cost.py [--iters 20] [--group 8] [--size 96] [--batch 8]

RL iteration = policy forward (with grad) + reference forward (adapters disabled, no grad) + G masks sampled per image
+ vectorised rewards + clipped objective + KL + backward + optimizer step (inner_epochs=1). With inner_epochs=2 the
second update adds one forward/backward; its cost per optimizer update is printed too. Target: ratio <= 1.5.
LoRA dropout is 0 in both (the RL recipe turns dropout off; the supervised step gets the same model, so the ratio is
the cost of RL's extra work, not of dropout). FLOPs per step are counted (torch.utils.flop_counter) and MFU printed
against the fp32 (GPU: tf32/fp32) matmul peak measured in the same run.

Each measurement runs twice, in two processes: with glibc's default malloc thresholds and with freed host memory
kept in the process (what every medtune recipe sets, train/setup.py). "RL before" runs the same iteration
with the sampling, log-probability and reward code of commit f33d689 (read from git history, so that comparison
needs a clone with history), alternated with the current code.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from history import old_module


def build(tmp: Path, args, device):
    from medtune.config import build_config
    from medtune.models.registry import build_model

    base = build_config({}, ["model.family=unet"])
    build_model(base).save_base(tmp / "base")
    cfg = build_config({}, [f"model.path={tmp / 'base'}", "lora.preset=small", f"lora.dropout={args.lora_dropout}",
                            f"rl.group_size={args.group}", "rl.reward=multi_objective"])
    model = build_model(cfg).to(device)
    # the supervised recipe keeps the adapter's dropout (lora.dropout default); the RL recipe turns it off
    sft_model = build_model(cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"dropout": 0.05})})).to(device)
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(args.batch, 1, args.size, args.size, generator=g) > 0.88).float()
    batch = {"image": (torch.rand(args.batch, 3, args.size, args.size, generator=g) * 0.5 + mask * 0.5),
             "mask": mask, "fov": torch.ones_like(mask), "box": torch.zeros(args.batch, 4)}
    return cfg, model, sft_model, {k: v.to(device) for k, v in batch.items()}


BEFORE = "f33d689"  # the last commit with the old sampling / log-prob / reward code


@contextlib.contextmanager
def old_rl_pieces():
    """medtune.train.rl with the sampling, log-probs and rewards of BEFORE (gt repeated G times, float skeletons)."""
    import medtune.train.rl as rl

    policy = old_module(BEFORE, "src/medtune/policy.py", "policy_before")
    rewards = old_module(BEFORE, "src/medtune/rewards.py", "rewards_before")

    def combined_reward(pred, gt, fov, weights, precision_floor, precision_floor_k, group_size):
        return rewards.combined_reward(pred, gt.repeat_interleave(group_size, 0), fov.repeat_interleave(group_size, 0),
                                       weights, precision_floor=precision_floor, precision_floor_k=precision_floor_k)

    saved = rl.sample_group, rl.group_logprob, rl.combined_reward
    rl.sample_group, rl.group_logprob, rl.combined_reward = policy.sample_group, policy.group_logprob, combined_reward
    try:
        yield
    finally:
        rl.sample_group, rl.group_logprob, rl.combined_reward = saved


def print_parts(model, batch, cfg, weights, opt, combo, iters: int) -> None:
    """Median time of each part of an RL iteration and of a supervised step, timed inside the same loop."""
    import medtune.train.rl as rl
    from medtune.tasks.masks import TASK as MASKS

    parts: dict[str, list[float]] = {}

    def mark(name, since):
        now = time.perf_counter()
        parts.setdefault(name, []).append(now - since)
        return now

    def rl_parts():
        t = time.perf_counter()
        logits, target, fov = rl.policy_logits(model, MASKS, batch)
        t = mark("RL policy forward", t)
        with torch.no_grad(), model.adapters_disabled():
            ref = rl.policy_logits(model, MASKS, batch)[0]
        t = mark("RL reference forward", t)
        masks = rl.sample_group(logits, cfg.rl.group_size, cfg.rl.temperature)
        t = mark("RL sampling", t)
        n, g = masks.shape[:2]
        total, _ = rl.combined_reward(masks.flatten(0, 1), target, fov, weights, precision_floor=cfg.rl.precision_floor,
                                      precision_floor_k=cfg.rl.precision_floor_k, group_size=g)
        t = mark("RL rewards", t)
        roll = {"ref_logits": ref, "masks": masks, "target": target, "fov": fov,
                "advantages": rl.group_advantages(total.view(n, g)),
                "old_logprob": rl.group_logprob(logits.detach(), masks, fov, cfg.rl.temperature,
                                                cfg.rl.logprob_reduction)}
        t = mark("RL advantages + old log-probs", t)
        loss, _ = rl.rl_loss(logits, roll, cfg, None)
        t = mark("RL loss", t)
        loss.backward()
        t = mark("RL backward", t)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("RL optimizer", t)

    def supervised_parts():
        t = time.perf_counter()
        out = model(batch["image"])
        t = mark("SFT forward", t)
        loss, _ = combo(out, batch["mask"], batch["fov"])
        t = mark("SFT loss", t)
        loss.backward()
        t = mark("SFT backward", t)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("SFT optimizer", t)

    for _ in range(3):
        rl_parts(), supervised_parts()
    parts.clear()
    for _ in range(iters):
        rl_parts(), supervised_parts()
    for name, values in parts.items():
        print(f"  {name:30s} {statistics.median(values) * 1000:7.2f} ms")


def main() -> None:
    from medtune.losses import ComboLoss
    from medtune.rewards import resolve_weights
    from medtune.tasks.masks import TASK as MASKS
    from medtune.train.rl import rl_loss, rollout

    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--parts", action="store_true", help="also time each part of an iteration")
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="in both the supervised step and RL (the bench before issue 10 had 0.05 in both)")
    parser.add_argument("--allocator", choices=["both", "default", "kept"], default="both",
                        help="kept: freed host memory stays in the process, as the recipes set it "
                             "(setup.keep_freed_host_memory); both: one process each, default first")
    args = parser.parse_args()
    if args.allocator == "both":
        for allocator in ("default", "kept"):
            argv = [a for a in sys.argv[1:] if not a.startswith("--allocator")]
            print(f"--- glibc malloc {allocator}", flush=True)
            subprocess.run([sys.executable, __file__, *argv, f"--allocator={allocator}"], check=True)
        return
    if args.allocator == "kept":
        from medtune.train.setup import keep_freed_host_memory

        assert keep_freed_host_memory(), "not glibc: nothing to compare"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, model, sft_model, batch = build(Path(tmp), args, device)
    combo = ComboLoss(cfg.loss)
    weights = resolve_weights(cfg.rl.reward)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def supervised_step(net=model, optimizer=opt):
        loss, _ = combo(net(batch["image"]), batch["mask"], batch["fov"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sft_opt = torch.optim.AdamW([p for p in sft_model.parameters() if p.requires_grad], lr=1e-4)
    sft_model.train()

    def rl_iteration(inner_epochs: int):
        roll = rollout(model, model, MASKS, batch, cfg, weights)
        logits = roll["logits"]
        for epoch in range(inner_epochs):
            if epoch:
                logits = model(batch["image"])
            loss, _ = rl_loss(logits, roll, cfg, None)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def timed(fn):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    def rl_before():
        with old_rl_pieces():
            rl_iteration(1)

    for _ in range(3):  # warm-up
        supervised_step(), rl_iteration(1), rl_before(), supervised_step(sft_model, sft_opt)
    sup, rl1, rl2, rl0, sft = [], [], [], [], []
    for _ in range(args.iters):
        sup.append(timed(supervised_step))
        sft.append(timed(lambda: supervised_step(sft_model, sft_opt)))
        rl1.append(timed(lambda: rl_iteration(1)))
        rl2.append(timed(lambda: rl_iteration(2)))
        rl0.append(timed(rl_before))
    s, r1, r2, r0 = statistics.median(sup), statistics.median(rl1), statistics.median(rl2), statistics.median(rl0)
    from medtune.train.utilisation import count_flops, measure_matmul_peak

    flops = {"sup": count_flops(supervised_step), "rl1": count_flops(lambda: rl_iteration(1)),
             "rl2": count_flops(lambda: rl_iteration(2)), "rl0": count_flops(rl_before)}
    peak = measure_matmul_peak(device).flops_per_s

    def saved_mb(fn) -> float:
        """Activation memory: bytes autograd keeps for backward while ``fn`` runs (peak of what is held at once is
        at most this)."""
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            fn()
        return sum(sizes) / 1e6

    memory = {"sup": saved_mb(supervised_step), "rl1": saved_mb(lambda: rl_iteration(1)),
              "rl2": saved_mb(lambda: rl_iteration(2)), "rl0": saved_mb(rl_before)}

    def util(key, seconds):
        return f"{flops[key] / 1e9:6.2f} GFLOP  MFU {flops[key] / seconds / peak:5.1%}  saved {memory[key]:5.0f} MB"

    print(f"device {device}, batch {args.batch}x{args.size}^2, G={args.group}, {torch.get_num_threads()} threads, "
          f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    print(f"supervised step           {s * 1000:8.1f} ms   {util('sup', s)}")
    print(f"RL before ({BEFORE}), 1 upd {r0 * 1000:6.1f} ms   {util('rl0', r0)}   ratio {r0 / s:.2f}")
    print(f"RL iteration, 1 update    {r1 * 1000:8.1f} ms   {util('rl1', r1)}   ratio {r1 / s:.2f}")
    print(f"RL iteration, 2 updates   {r2 * 1000:8.1f} ms   {util('rl2', r2)}   ratio {r2 / s:.2f} "
          f"({r2 / 2 / s:.2f} per update)")
    if args.parts:
        print_parts(model, batch, cfg, weights, opt, combo, args.iters)
    f = statistics.median(sft)
    print(f"supervised step as the SFT recipe runs it (LoRA dropout 0.05): {f * 1000:.1f} ms; RL iteration (1 update, "
          f"no dropout, as the RL recipe runs it) / that: {r1 / f:.2f}")


if __name__ == "__main__":
    main()
