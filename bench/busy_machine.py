"""The demo's U-Net training step alone and beside a CPU hog, old and new thread settings side by side (not a test).

    PYTHONPATH=src .venv/bin/python bench/busy_machine.py [--seconds 6] [--rounds 3] [--hog-per-core 1]

One step = what `medtune demo` does per step of its base U-Net (the demo's config: the default U-Net, a batch of 8
crops of 64^2, ComboLoss, backward, clipping, AdamW) on random tensors of the demo's shapes (no data loading: the
question is how the compute holds up). Each setting runs in its own fresh process, because OpenMP reads its wait policy
once, when torch loads it:

  old            what medtune did before: torch's default thread count, OpenMP's default wait policy (spin, then sleep)
  old, 1 thread  the same with one thread (what the issue's user found faster under load)
  new            medtune.threads: OMP_WAIT_POLICY=PASSIVE set before torch loads, threads = usable cores
                 (affinity / cgroup quota) left idle by other work at start (1-minute load average), one
                 inter-op thread

Conditions: alone, and beside a hog of `--hog-per-core` busy-loop processes per usable core (started and stopped by
this script, each bounded by a deadline so none outlives it), in `--rounds` alternated windows of `--seconds /
--rounds` each, so that load from elsewhere drifting over the run hits both alike. Printed: median ms per step, and
loaded / alone. With
H hog processes per core, a process of T threads gets about T / (T + H x cores) of the machine's cores if the
scheduler shares them fairly per thread,
printed as the "fair" ratio (the threads' fair share of the cores against the cores it used alone).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 1  # the first step allocates; the old settings under load take seconds per step
HOG_LIMIT_S = 120  # a hog ends on its own after this long, even if this script dies without stopping it

VARIANTS = {
    "old": {"env": {}, "threads": None, "medtune": False},
    "old, 1 thread": {"env": {}, "threads": 1, "medtune": False},
    "new": {"env": {}, "threads": None, "medtune": True},
}


def worker(seconds: float, threads: int | None, use_medtune: bool, rounds: int) -> dict:
    """Runs in a fresh process: time the demo's step for `seconds` alone and `seconds` beside the hog, in `rounds`
    alternated windows (the parent starts and stops the hog). The thread count is chosen once, at start, as in a
    run."""
    if use_medtune:
        from medtune.threads import prepare_openmp

        prepare_openmp()
    import torch

    from medtune.demo import _cfg
    from medtune.models.registry import build_model
    from medtune.tasks import task_for
    from medtune.train.setup import make_optimizer

    if use_medtune:
        from medtune.threads import configure

        chosen = configure(threads)
    else:
        if threads is not None:
            torch.set_num_threads(threads)
        chosen = {"torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    cfg = _cfg("bench", Path("/tmp/medtune-bench-busy"), "A", 400, ["optim.lr=3e-3"])
    torch.manual_seed(0)
    model = build_model(cfg)
    loss_fn = task_for(cfg).make_loss(cfg)
    optimizer = make_optimizer(model, cfg)
    n, size = cfg.data.batch_size, cfg.data.patch_size
    batch = {"image": torch.rand(n, 3, size, size), "mask": (torch.rand(n, 1, size, size) > 0.8).float(),
             "fov": torch.ones(n, 1, size, size)}

    def step() -> float:
        t0 = time.perf_counter()
        loss, _ = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def window(seconds: float) -> list[float]:
        """Steps for `seconds` (at least one) after the first step of the window (a step straddling the switch)."""
        step()
        times, end = [], time.perf_counter() + seconds
        while not times or time.perf_counter() < end:
            times.append(step())
        return times

    for _ in range(WARMUP_STEPS):
        step()
    alone, loaded = [], []
    for _ in range(rounds):  # alternated, so that the other users' changing load hits both conditions alike
        alone += window(seconds / rounds)
        print(HOG_START, flush=True)  # the parent starts the hog, then answers on stdin
        sys.stdin.readline()
        loaded += window(seconds / rounds)
        print(HOG_STOP, flush=True)
        sys.stdin.readline()
    return {"alone_ms": 1000 * statistics.median(alone), "loaded_ms": 1000 * statistics.median(loaded), **chosen}


HOG_START, HOG_STOP = "start the hog", "stop the hog"
HOG_CODE = "import time\nend = time.time() + {limit}\nx = 0\nwhile time.time() < end:\n    x += 1\n"


def start_hog(count: int, limit_s: float) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", HOG_CODE.format(limit=limit_s)]) for _ in range(count)]


def stop_hog(hogs: list[subprocess.Popen]) -> None:
    for h in hogs:
        h.terminate()
    for h in hogs:
        h.wait(timeout=30)


def measure(name: str, seconds: float, hog_count: int, rounds: int) -> dict:
    """One fresh process per setting: the step alone, then (same process, same warm caches) beside the hog."""
    spec = VARIANTS[name]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    args = [sys.executable, __file__, "--worker", json.dumps({"seconds": seconds, "threads": spec["threads"],
                                                              "medtune": spec["medtune"], "rounds": rounds})]
    proc = subprocess.Popen(args, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    hogs = []
    try:
        for line in proc.stdout:
            if line.strip() in (HOG_START, HOG_STOP):
                stop_hog(hogs)
                hogs = start_hog(hog_count, HOG_LIMIT_S) if line.strip() == HOG_START else []
                proc.stdin.write("go\n")
                proc.stdin.flush()
            elif line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"worker for {name!r} ended without a result (exit {proc.wait()})")
    finally:
        stop_hog(hogs)
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per setting and condition")
    parser.add_argument("--hog-per-core", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="alone / loaded windows, alternated")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(worker(spec["seconds"], spec["threads"], spec["medtune"], spec["rounds"])))
        return
    sys.path.insert(0, str(REPO / "src"))
    from medtune.threads import usable_cores

    cores = usable_cores()["cores"]
    print(f"usable cores {cores}; load average before: {open('/proc/loadavg').read().split()[:4]}")
    hog = args.hog_per_core * cores
    results = {name: measure(name, args.seconds, hog, args.rounds) for name in VARIANTS}
    print(f"\n{'setting':<15} {'threads':>7} {'wait policy':>11} {'alone ms':>9} {'loaded ms':>10} "
          f"{'loaded/alone':>12} {'fair':>5}")
    print("(fair: the step-time growth a fair per-thread share of the cores predicts)")
    for name, r in results.items():
        t = t_loaded = r["torch_threads"]
        used_alone = min(t, cores)
        # the step-time growth a fair per-thread share of the cores predicts
        fair = used_alone / min(used_alone, cores * t_loaded / (t_loaded + hog))
        ratio = r["loaded_ms"] / r["alone_ms"]
        print(f"{name:<15} {t:>7} {str(r.get('omp_wait_policy') or 'default'):>11} "
              f"{r['alone_ms']:>9.1f} {r['loaded_ms']:>10.1f} {ratio:>12.2f} "
              f"{fair:>5.2f}")
    print(f"\nhog: {hog} busy-loop processes; load average after: {open('/proc/loadavg').read().split()[:4]}")


if __name__ == "__main__":
    main()
