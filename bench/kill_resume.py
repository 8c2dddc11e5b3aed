"""kill -9 at random moments, then the same command again: does every run end with an uninterrupted run's weights?

    .venv/bin/python bench/kill_resume.py [--runs 20] [--seed 0] [--max-kills 3] [--workdir DIR]

A tiny U-Net on the embedded synthetic vessels (a few seconds of training; `last` every 4 steps and every 0.2 s, so
kills land in checkpoint writes too). First one uninterrupted run. Then, for each of --runs runs, the command a
scheduler would re-run after a pre-emption, `medtune train CONFIG --resume auto`, is started and SIGKILLed at a
moment drawn with a seeded RNG (a random delay, soon after it first writes to the run folder, or during its n-th
checkpoint write), 1 to --max-kills times (a kill drawn after the process already finished is drawn again), and
finally run to completion. Each kill is classified by what the run folder held right after it. Prints one line per
run and the number of runs whose final weights (checkpoints/last) are bit-identical to the uninterrupted run's.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = 40
# how a kill's moment is chosen: a random delay, soon after config.yaml is written, or during a checkpoint write
KILL_MOMENTS = ("random", "early", "mid-write")
# "random" delays are uniform over this fraction of the uninterrupted run's wall time (most of it is start-up)
DELAY_SPAN = 0.9
EARLY_WINDOW_S = 0.5  # "early": up to this long after config.yaml appears (data, preflight, first steps)
MAX_WRITES_BEFORE_KILL = 6  # "mid-write": killed during the n-th checkpoint write of the process, n uniform in 1..this
POLL_S = 0.001
FINISHED_FIRST = "finished first (not counted)"
MAX_TRIES_PER_RUN = 10
FINISH_TIMEOUT_S = 600


def write_config(workdir: Path, name: str) -> Path:
    from medtune.config import build_config

    cfg = build_config({}, [
        f"run.name={name}", f"run.output_dir={workdir / 'runs'}", "run.seed=0",
        "data.layout=synthetic", f"data.path={workdir / 'data'}", "data.synthetic.n_images=8",
        "data.synthetic.size=64", "data.patch_size=32", "data.batch_size=4", "data.patches_per_image=2",
        "data.split.val_fraction=0.25", "data.split.test_fraction=0.25",
        "model.config={channels: [4, 8, 16], strides: [2, 2], num_res_units: 1}",
        f"optim.max_steps={STEPS}", "optim.warmup_steps=2", "optim.lr=0.01",
        "train.eval_every=10", "train.save_every=4", "train.save_every_minutes=0.0033", "train.log_every=1",
        "train.trackers=[]",
    ])
    path = workdir / f"{name}.yaml"
    path.write_text(cfg.to_yaml())
    return path


def command(config: Path) -> list[str]:
    return [sys.executable, "-m", "medtune.cli", "train", str(config), "--resume", "auto"]


def leftovers(run_dir: Path) -> set[str]:
    """Half-written / half-renamed / half-deleted checkpoint folders (names carry the writer's pid)."""
    ckpts = run_dir / "checkpoints"
    return {p.name for p in ckpts.glob(".*")} if ckpts.is_dir() else set()


def classify(run_dir: Path, leftovers_before: set[str]) -> str:
    """What a kill interrupted, judged by what it left behind."""
    ckpts = run_dir / "checkpoints"
    if not (run_dir / "config.yaml").is_file():
        return "before config.yaml"
    if leftovers(run_dir) - leftovers_before:
        return "during a checkpoint write"
    if not (ckpts.is_dir() and any(not p.name.startswith(".") for p in ckpts.iterdir())):
        return "before the first checkpoint"
    return "between checkpoints"


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    wa = load_file(str(a / "checkpoints" / "last" / "model" / "model.safetensors"))
    wb = load_file(str(b / "checkpoints" / "last" / "model" / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def run_to_end(config: Path, env: dict) -> None:
    proc = subprocess.run(command(config), env=env, capture_output=True, text=True, timeout=FINISH_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command(config))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def wait_for(proc: subprocess.Popen, ready, timeout: float) -> bool:
    """Poll until ready() or the process ends; True when ready() came first."""
    deadline = time.perf_counter() + timeout
    while proc.poll() is None and time.perf_counter() < deadline:
        if ready():
            return True
        time.sleep(POLL_S)
    return False


def mtimes(run_dir: Path) -> list[int]:
    return [(run_dir / n).stat().st_mtime_ns if (run_dir / n).exists() else 0 for n in ("config.yaml", "metrics.jsonl")]


def kill_once(config: Path, run_dir: Path, how: str, rng: random.Random, reference_s: float, env: dict) -> str:
    """Start the command, SIGKILL it at a moment chosen by `how`; returns what the kill interrupted."""
    before, files_before = leftovers(run_dir), mtimes(run_dir)

    def writing() -> bool:
        return bool(leftovers(run_dir) - before)

    proc = subprocess.Popen(command(config), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if how == "random":  # anywhere: imports, data, preflight, steps, checkpoint writes
        time.sleep(rng.uniform(0.0, DELAY_SPAN * reference_s))
    elif how == "early":  # soon after the process first writes to the run folder (config.yaml or metrics.jsonl)
        wait_for(proc, lambda: mtimes(run_dir) != files_before, 3 * reference_s)
        time.sleep(rng.uniform(0.0, EARLY_WINDOW_S))
    else:  # "mid-write": during the n-th checkpoint write of this process
        for n in range(rng.randint(1, MAX_WRITES_BEFORE_KILL)):
            if n:
                wait_for(proc, lambda: not writing(), reference_s)
            wait_for(proc, writing, 3 * reference_s)
    if proc.poll() is not None:
        return FINISHED_FIRST
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return classify(run_dir, before)


def trial(workdir: Path, index: int, rng: random.Random, max_kills: int, reference_s: float, env: dict) -> dict:
    name = f"killed-{index}"
    config = write_config(workdir, name)
    run_dir = workdir / "runs" / name
    moments, landed = [], 0
    wanted = rng.randint(1, max_kills)
    while landed < wanted and len(moments) < MAX_TRIES_PER_RUN:
        how = rng.choice(KILL_MOMENTS)
        moments.append((how, kill_once(config, run_dir, how, rng, reference_s, env)))
        landed += moments[-1][1] != FINISHED_FIRST  # a kill after the end does not count: try again
    run_to_end(config, env)
    folders = sorted(p.name for p in (workdir / "runs").iterdir() if p.name.startswith(f"{name}"))
    return {"name": name, "moments": moments, "identical": same_weights(run_dir, workdir / "runs" / "reference"),
            "folders": folders}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-kills", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kill-resume-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(args.seed)

    start = time.perf_counter()
    run_to_end(write_config(workdir, "reference"), env)
    reference_s = time.perf_counter() - start
    print(f"uninterrupted run: {reference_s:.1f} s ({STEPS} steps) in {workdir}", flush=True)

    results = []
    for i in range(args.runs):
        res = trial(workdir, i, rng, args.max_kills, reference_s, env)
        results.append(res)
        verdict = "bit-identical" if res["identical"] else "DIFFERENT"
        extra = "" if res["folders"] == [res["name"]] else f" (run folders: {res['folders']})"
        kills = "; ".join(f"{how} kill: {what}" for how, what in res["moments"])
        print(f"{res['name']}: {kills} => {verdict}{extra}", flush=True)

    kills = [what for r in results for _, what in r["moments"]]
    print("kills by moment: " + ", ".join(f"{k} {kills.count(k)}" for k in sorted(set(kills))))
    ok = sum(r["identical"] and r["folders"] == [r["name"]] for r in results)
    landed = sum(what != FINISHED_FIRST for what in kills)
    print(f"{ok}/{len(results)} runs, killed {landed} times in all, finished with final weights bit-identical to the "
          f"uninterrupted run (one run folder each); {time.perf_counter() - start:.0f} s in all")
    sys.exit(0 if ok == len(results) else 1)


if __name__ == "__main__":
    main()
