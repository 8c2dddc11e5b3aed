"""The data of one run folder: samples, RUN/split.json (and RUN/scale.json), loaded per split.

Training, evaluation, reports and RL's `init_from` all read a run's data through these functions, so every consumer
sees the same split and the same scale normalisation.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medtune.config import Config
from medtune.data.inspect import duplicate_groups, find_near_duplicates
from medtune.data.layouts import discover
from medtune.data.loading import load_all, scale_factors
from medtune.data.splits import check_split, load_split, make_split, save_split
from medtune.data.types import LoadedSample, Sample

log = logging.getLogger("medtune")


@dataclass
class RunData:
    samples: dict[str, Sample]
    split: dict[str, list[str]]
    target_scale: float | None  # scale normalisation target (FOV diameter), None when off


def prepare_split(cfg: Config, run_dir: Path, is_main: bool = True) -> RunData:
    """Discover samples and create (or reuse) RUN/split.json, so eval and resumes see the same split."""
    samples = {s.id: s for s in discover(cfg.data)}
    split_path = run_dir / "split.json"
    if split_path.exists():
        split = load_split(split_path)
        check_split(split, list(samples.values()))
    else:
        seed = cfg.data.split.seed if cfg.data.split.seed is not None else cfg.run.seed
        groups = duplicate_groups_for_split(cfg, list(samples.values()))
        if cfg.data.split.folds:
            from medtune.data.kfold import kfold_split

            split = kfold_split(list(samples.values()), cfg.data.split, seed, duplicate_groups=groups)
        else:
            split = make_split(list(samples.values()), cfg.data.split, seed, duplicate_groups=groups)
        if is_main:
            save_split(split_path, split)
    target = None
    scale_path = run_dir / "scale.json"
    if cfg.data.scale_norm.enabled and scale_path.exists():
        target = json.loads(scale_path.read_text())["target_fov_diameter"]
    return RunData(samples=samples, split=split, target_scale=target)


def duplicate_groups_for_split(cfg: Config, samples: list[Sample]) -> dict[str, str] | None:
    """Near-duplicate groups that must not straddle splits (a near-copy of a test image must not train), or None.

    Not used when the layout ships its split (the published test set stays as published; `data inspect --split`
    reports straddling pairs), nor when the hash chains a large share of the images into one group: in homogeneous
    modalities (fundus photographs) distinct images hash as close as true copies do, and grouping them would
    collapse the split."""
    if not cfg.data.split.keep_duplicates_together:
        return None
    if cfg.data.split.use_layout_split and any(s.split for s in samples) and not cfg.data.split.folds:
        return None
    pairs = find_near_duplicates(samples, cfg.data.duplicate_hash_distance)
    groups = duplicate_groups(pairs)
    largest = max(Counter(groups.values()).values(), default=0)
    if largest > max(3, 0.1 * len(samples)):
        _warn(f"near-duplicate grouping skipped: the perceptual hash (distance <= {cfg.data.duplicate_hash_distance}) "
             f"chains {largest} of {len(samples)} images into one group, so it cannot tell these images apart; "
             "check `medtune data inspect` and lower data.duplicate_hash_distance if copies are expected")
        return None
    if pairs:
        log.info("%d near-duplicate pairs kept within one split", len(pairs))
    return groups


def load_split_samples(cfg: Config, data: RunData, name: str, run_dir: Path | None = None,
                       limit: int | None = None) -> list[LoadedSample]:
    ids = data.split.get(name, [])[: limit or None]
    samples = [data.samples[i] for i in ids]
    loaded = load_all(samples, cfg.data)
    if not cfg.data.scale_norm.enabled:
        return loaded
    # The target is fixed by the training set once and stored, so val/test and later evals resample identically.
    if data.target_scale is None:
        train = load_all([data.samples[i] for i in data.split["train"]], cfg.data) if name != "train" else loaded
        data.target_scale, _ = scale_factors(train, cfg.data.scale_norm)
        if run_dir is not None:  # renamed into place: a kill mid-write must not leave half a file to resume from
            tmp = run_dir / f".scale.json.tmp-{os.getpid()}"
            tmp.write_text(json.dumps({"target_fov_diameter": data.target_scale}))
            os.replace(tmp, run_dir / "scale.json")
    _, scales = scale_factors(loaded, cfg.data.scale_norm, target=data.target_scale)
    return load_all(samples, cfg.data, scales=scales)


def check_readable(cfg: Config, data: RunData, names: tuple[str, ...] = ("test",)) -> None:
    """Read the splits training does not load, so a broken test image fails now with every problem listed, not
    after a night of training."""
    ids = [i for name in names for i in data.split.get(name, [])]
    load_all([data.samples[i] for i in ids], cfg.data)


def _warn(msg: str) -> None:
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
