"""CPU threads: how many the process may really use, and OpenMP settings that keep throughput on a shared machine.

torch sizes its intra-op pool from the machine's core count, not from the cores the process may use (its CPU
affinity, a container's cgroup CPU quota). On a busy machine (a shared workstation, a CI runner) its OpenMP workers
also spin at every barrier waiting for a sibling the scheduler has parked, burning the time slices the process
needs: bench/busy_machine.py measures it. medtune therefore
- sizes torch's pool from ``train.threads`` when set, else OMP_NUM_THREADS when set, else the usable cores
  (``usable_cores``) that other work leaves idle at start (``idle_cores``), divided among the processes a launcher
  started on this machine. Chosen once, at start: a run's thread count stays fixed (a different count changes the
  order of floating-point sums; ``train.threads`` pins it for bit-exact comparisons between runs);
- asks OpenMP to sleep rather than spin while waiting (OMP_WAIT_POLICY=PASSIVE). OpenMP reads that once, when torch
  loads it, so the `medtune` command sets it before anything imports torch (``prepare_openmp``); a value already in
  the environment is kept;
- uses one inter-op thread: medtune runs no inter-op parallel work, so more are only idle threads.

This module imports torch lazily: ``prepare_openmp`` must run before torch is imported.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

WAIT_POLICY_VAR = "OMP_WAIT_POLICY"
THREADS_VAR = "OMP_NUM_THREADS"
WAIT_POLICY = "PASSIVE"
INTEROP_THREADS = 1
CGROUP_ROOT = Path("/sys/fs/cgroup")

# how OMP_WAIT_POLICY came to be what it is in this process (recorded in env.json)
_policy_origin = "environment" if WAIT_POLICY_VAR in os.environ else "unset"


def prepare_openmp() -> None:
    """Set OMP_WAIT_POLICY=PASSIVE unless the environment already says otherwise. Only effective before torch is
    imported (OpenMP reads it once); the `medtune` command calls it first thing."""
    global _policy_origin
    if WAIT_POLICY_VAR in os.environ:
        _policy_origin = "environment"
    elif "torch" in sys.modules:
        _policy_origin = "unset (torch was imported before medtune could set it)"
    else:
        os.environ[WAIT_POLICY_VAR] = WAIT_POLICY
        _policy_origin = "medtune"


def _cgroup_quota_cores(root: Path = CGROUP_ROOT) -> float | None:
    """CPU quota in cores (quota / period) of this process's cgroup (v2 cpu.max, else v1 cfs files); None when
    unlimited or unreadable."""
    try:
        fields = (root / "cpu.max").read_text().split()
        if fields and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def _affinity_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def usable_cores(cgroup_root: Path = CGROUP_ROOT) -> dict:
    """{"cores": the cores this process may use, "affinity": ..., "cgroup_quota": ...}: the affinity mask's size,
    lowered to the cgroup quota rounded up (a quota of 1.5 cores keeps 2 threads busy part of the time), at least 1."""
    affinity = _affinity_cores()
    quota = _cgroup_quota_cores(cgroup_root)
    cores = affinity if quota is None else min(affinity, max(1, math.ceil(quota - 1e-9)))
    return {"cores": max(1, cores), "affinity": affinity, "cgroup_quota": quota}


def idle_cores(cores: int, load: float | None = None) -> int:
    """Of `cores`, how many the machine's other work leaves idle: cores minus the 1-minute load average (runnable
    threads, this process's own few at start-up included), rounded to the nearest core, at least 1. On a machine where
    others keep every core busy, each extra thread of ours only adds a straggler every parallel region waits for."""
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # not available: assume the cores are free
            return cores
    return max(1, min(cores, round(cores - load)))


def apply_threads(configured: int | None = None) -> dict:
    """Set torch's intra-op threads (``configured`` = train.threads, else the usable cores) and, while still
    possible, its inter-op threads. Returns what env.json records."""
    import torch

    found = usable_cores()
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))  # torchrun / accelerate launch
    if configured is not None:
        threads, source = configured, "train.threads"
    elif os.environ.get(THREADS_VAR, "").strip().isdigit() and int(os.environ[THREADS_VAR]) > 0:
        threads, source = int(os.environ[THREADS_VAR]), THREADS_VAR  # the user's (or the launcher's) explicit choice
    else:  # the usable cores not already kept busy by other work, shared by the processes launched on this machine
        idle = idle_cores(found["cores"])
        threads, source = max(1, min(found["cores"], idle) // local_processes), "usable cores, less the busy ones"
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(INTEROP_THREADS)
    except RuntimeError:  # already set, or inter-op work already ran in this process: keep what it has
        pass
    return {
        "torch_threads": torch.get_num_threads(),
        "threads_source": source,
        "usable_cores": found,
        "load_average_1min": _load1(),
        "interop_threads": torch.get_num_interop_threads(),
        "omp_wait_policy": os.environ.get(WAIT_POLICY_VAR),
        "omp_wait_policy_origin": _policy_origin,
    }


def _load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


_applied: dict | None = None


def configure(configured: int | None = None) -> dict:
    """apply_threads once per setting, remembered for env.json (``threads_in_use``)."""
    global _applied
    _applied = apply_threads(configured)
    return _applied


def keep_run_threads(configured: int | None, env_json: Path) -> dict | None:
    """A resumed run keeps the thread count its first session chose (RUN/env.json), unless ``train.threads`` or
    OMP_NUM_THREADS says otherwise: on CPU the number of threads changes how sums are split, so a resume with another
    count would not continue bit for bit. None when nothing was recorded."""
    if configured is not None or os.environ.get(THREADS_VAR, "").strip():
        return None
    try:
        recorded = int(json.loads(env_json.read_text())["torch_threads"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    global _applied
    _applied = {**apply_threads(recorded), "threads_source": f"{env_json} (the run's first session)"}
    return _applied


def threads_in_use() -> dict:
    """What the last ``configure`` chose, or torch's own numbers when nothing was configured in this process."""
    if _applied is not None:
        return _applied
    import torch

    return {"torch_threads": torch.get_num_threads(), "threads_source": "torch default",
            "interop_threads": torch.get_num_interop_threads(),
            "omp_wait_policy": os.environ.get(WAIT_POLICY_VAR), "omp_wait_policy_origin": _policy_origin}
