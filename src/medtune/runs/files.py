"""The run folder: resolved config, environment, metrics log. Everything downstream reads only this folder."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import yaml

from medtune.config import Config, ConfigError, build_config


def new_run_dir(cfg: Config) -> Path:
    """RUN = output_dir/name; an existing name gets a numeric suffix so no earlier run is overwritten."""
    base = Path(cfg.run.output_dir) / cfg.run.name
    run_dir, i = base, 1
    while run_dir.exists() and any(run_dir.iterdir()):
        run_dir = base.with_name(f"{base.name}-{i}")
        i += 1
    return run_dir


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a medtune run folder (no config.yaml); pass the folder `medtune train` created")
    return build_config(yaml.safe_load(path.read_text()), source=str(path))


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    import torch

    versions = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "monai", "scikit-image", "numpy", "pydantic"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": _git_commit(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_run_files(run_dir: Path, cfg: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", cfg.to_yaml())
    write_text_atomic(run_dir / "env.json", json.dumps(environment(), indent=2))


class MetricsLog:
    """Append-only JSONL; on resume, lines past the resumed step are dropped so the log equals an uninterrupted run's."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            write_text_atomic(path, "".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
