"""Group-aware, seeded k-fold splits for ``medtune cv``: fold ``i`` of ``k`` is the test set, val is carved from the rest.

The fold assignment depends only on (samples, k, seed), never on ``fold``, so the k runs of one cross-validation
partition the data: every sample is tested exactly once.
"""
from __future__ import annotations

import logging

import numpy as np

from medtune.config import SplitCfg
from medtune.data.splits import _count, sample_groups
from medtune.data.types import DataError, Sample
from medtune.errors import ConfigError

log = logging.getLogger(__name__)


def assign_folds(samples: list[Sample], k: int, seed: int,
                 duplicate_groups: dict[str, str] | None = None) -> list[list[str]]:
    """k lists of group keys (of ``sample_groups``), balanced by sample count, deterministic for a seed."""
    groups = sample_groups(samples, duplicate_groups)
    if k > len(groups):
        raise DataError(
            f"{k}-fold cross-validation needs at least {k} groups but the data has {len(groups)} "
            f"({len(samples)} samples); lower the number of folds or relax data.split.group_by"
        )
    rng = np.random.default_rng(seed)
    keys = list(groups)
    order = [keys[i] for i in rng.permutation(len(keys))]
    # Largest groups first, each into the currently smallest fold: folds stay close in size even when one patient
    # contributes many images. The stable sort keeps the seeded order among equal-sized groups.
    order.sort(key=lambda g: -len(groups[g]))
    folds: list[list[str]] = [[] for _ in range(k)]
    sizes = [0] * k
    for g in order:
        j = int(np.argmin(sizes))
        folds[j].append(g)
        sizes[j] += len(groups[g])
    return folds


def kfold_split(samples: list[Sample], split_cfg: SplitCfg, seed: int,
                duplicate_groups: dict[str, str] | None = None) -> dict[str, list[str]]:
    """{"train", "val", "test": [ids]} for fold ``split_cfg.fold`` of ``split_cfg.folds``.

    Groups (``Sample.group``; None = its own group) never straddle two folds or two splits. A layout's shipped test
    split is ignored: cross-validation tests every sample once.
    """
    k, fold = split_cfg.folds, split_cfg.fold
    if k is None or k < 2:
        raise ValueError(f"data.split.folds must be >= 2 for a k-fold split (got {k})")
    if not 0 <= fold < k:
        raise ConfigError(f"data.split.fold={fold} is out of range for {k} folds; use 0..{k - 1}")
    if len({s.id for s in samples}) != len(samples):
        raise DataError("kfold_split: sample ids are not unique; check the data layout")
    seed = split_cfg.seed if split_cfg.seed is not None else seed
    if split_cfg.use_layout_split and any(s.split == "test" for s in samples):
        log.info("k-fold cross-validation ignores the layout's shipped test split: every sample is tested once")
    groups = sample_groups(samples, duplicate_groups)
    folds = assign_folds(samples, k, seed, duplicate_groups)
    rest = [g for j, f in enumerate(folds) if j != fold for g in f]
    # Val depends on the fold too (its own stream), so different folds do not reuse one val set by construction.
    rng = np.random.default_rng([seed, fold])
    rest = [rest[i] for i in rng.permutation(len(rest))]
    n_val = min(_count(split_cfg.val_fraction, len(rest)), max(0, len(rest) - 1))
    out = {
        "train": [m for g in rest[n_val:] for m in groups[g]],
        "val": [m for g in rest[:n_val] for m in groups[g]],
        "test": [m for g in folds[fold] for m in groups[g]],
    }
    return {name: sorted(ids) for name, ids in out.items()}
