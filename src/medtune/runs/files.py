"""The run folder: resolved config, environment, metrics log. Everything downstream reads only this folder."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import yaml

from medtune.atomic import write_text_atomic
from medtune.config import Config, ConfigError, build_config
from medtune.threads import threads_in_use

# Settings that change how a run is logged and saved, not what it trains: `--resume auto` accepts a config that differs
# from the stored one only in these, and continues with the given values.
OPERATIONAL_KEYS = ("train.log_every", "train.save_every", "train.save_every_minutes", "train.keep_last",
                    "train.trackers", "train.preflight", "train.preflight_steps", "data.num_workers", "train.threads")
_MAX_KEYS_SHOWN = 8
# RUN/eval/<split>/: per-target metrics of free generation (text-generating tasks), next to per_image.csv
FREE_GENERATION_CSV = "per_image_free_generation.csv"


def new_run_dir(cfg: Config) -> Path:
    """RUN = output_dir/name; an existing name gets a numeric suffix so no earlier run is overwritten."""
    base = Path(cfg.run.output_dir) / cfg.run.name
    run_dir, i = base, 1
    while run_dir.exists() and any(run_dir.iterdir()):
        run_dir = base.with_name(f"{base.name}-{i}")
        i += 1
    return run_dir


def named_run_dir(cfg: Config) -> Path:
    """Exactly output_dir/name, never suffixed: the folder `--resume auto` starts or continues."""
    return Path(cfg.run.output_dir) / cfg.run.name


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a medtune run folder (no config.yaml); pass the folder `medtune train` created")
    return build_config(yaml.safe_load(path.read_text()), source=str(path))


def read_written_config(run_dir: Path) -> Config | None:
    """RUN/config.yaml, or None when it is missing, unreadable or not exactly what `write_run_files` writes (cut short:
    a truncated YAML file can still parse, with the missing keys at their defaults)."""
    path = Path(run_dir) / "config.yaml"
    try:
        text = path.read_text()
        cfg = build_config(yaml.safe_load(text), source=str(path))
    except (OSError, ConfigError, yaml.YAMLError, AttributeError, TypeError):
        return None
    return cfg if cfg.to_yaml() == text else None


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and not (prefix == "model." and key == "config"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(given: Config, stored: Config) -> list[str]:
    """'key (stored -> given)' for every setting that differs, as dotted keys, OPERATIONAL_KEYS left out."""
    a, b = _flatten(stored.model_dump(mode="json")), _flatten(given.model_dump(mode="json"))
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in OPERATIONAL_KEYS]


def different_config_error(run_dir: Path, differences: list[str]) -> ConfigError:
    shown = "; ".join(differences[:_MAX_KEYS_SHOWN])
    if len(differences) > _MAX_KEYS_SHOWN:
        shown += f"; +{len(differences) - _MAX_KEYS_SHOWN} more"
    return ConfigError(f"--resume auto: the config differs from {run_dir / 'config.yaml'} in {shown}; continue with "
                       "the config the run was started with, or give a new run.name to start another run")


def with_operational_settings(stored: Config, given: Config) -> Config:
    """The stored config with the given values of OPERATIONAL_KEYS (how to log and save from now on)."""
    tree = stored.model_dump(mode="json")
    new = given.model_dump(mode="json")
    for key in OPERATIONAL_KEYS:
        section, name = key.split(".")
        tree[section][name] = new[section][name]
    return build_config(tree)


def forget_progress(run_dir: Path) -> None:
    """A run restarting from step 0 in its own folder: drop what the killed attempt logged and left half-saved. The
    split (and scale.json) stay: they are what a fresh run of this config writes."""
    for name in ("metrics.jsonl", "preflight.json"):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


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
        **threads_in_use(),  # torch_threads and how they were chosen (medtune.threads)
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
            kept = [ln for ln, rec in _parsed_lines(path) if rec.get("step", 0) <= resume_step]
            write_text_atomic(path, "".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def _parsed_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, record) pairs; a line cut short by a kill mid-write is left out."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            continue
    return out


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [rec for _, rec in _parsed_lines(path)]
