"""Group-aware, seeded train/val/test splits, saved as ``RUN/split.json`` and reused by evaluation."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np

from medtune.config import SplitCfg
from medtune.data.types import DataError, Sample

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")


class _UnionFind:
    def __init__(self, items: list[str]):
        self.parent = {i: i for i in items}

    def find(self, item: str) -> str:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # smallest id is the root: deterministic group keys


def sample_groups(samples: list[Sample], duplicate_groups: dict[str, str] | None = None) -> dict[str, list[str]]:
    """{group key: [ids]}: samples sharing a ``group`` or a near-duplicate group are one unit."""
    ids = [s.id for s in samples]
    uf = _UnionFind(ids)
    for linking in (
        {s.id: f"group:{s.group}" for s in samples if s.group is not None},
        {i: f"dup:{g}" for i, g in (duplicate_groups or {}).items() if i in uf.parent},
    ):
        first_of: dict[str, str] = {}
        for sample_id, key in linking.items():
            if key in first_of:
                uf.union(first_of[key], sample_id)
            else:
                first_of[key] = sample_id
    groups: dict[str, list[str]] = {}
    for i in ids:
        groups.setdefault(uf.find(i), []).append(i)
    return {k: sorted(v) for k, v in sorted(groups.items())}


def _count(fraction: float, n_groups: int) -> int:
    n = round(fraction * n_groups)
    # A requested split should not vanish through rounding when there are groups to spare for training.
    if fraction > 0 and n == 0 and n_groups >= 3:
        n = 1
    return n


def make_split(
    samples: list[Sample], split_cfg: SplitCfg, seed: int, duplicate_groups: dict[str, str] | None = None
) -> dict[str, list[str]]:
    """{"train", "val", "test": [ids]}: deterministic for a seed, groups never straddle two splits.

    With ``use_layout_split`` and samples whose layout split is "test", those are the test set and val is carved
    from the rest. Fractions count groups (so only approximately samples).
    """
    if len({s.id for s in samples}) != len(samples):
        raise DataError("make_split: sample ids are not unique; check the data layout")
    if split_cfg.val_fraction + split_cfg.test_fraction >= 1.0:
        raise DataError("data.split.val_fraction + data.split.test_fraction must be < 1; lower one of them")
    rng = np.random.default_rng(split_cfg.seed if split_cfg.seed is not None else seed)
    groups = sample_groups(samples, duplicate_groups)
    by_id = {s.id: s for s in samples}
    out: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}

    layout_test = split_cfg.use_layout_split and any(s.split == "test" for s in samples)
    if layout_test:
        free_groups = []
        for key, members in groups.items():
            tested = [m for m in members if by_id[m].split == "test"]
            if not tested:
                free_groups.append(key)
                continue
            out["test"] += tested
            leaking = [m for m in members if by_id[m].split != "test"]
            if leaking:
                # The shipped test set stays as published; its group-mates (same patient / near-duplicates) are
                # left out of training rather than leaking the test images into it.
                log.warning("left out of train/val because their group is in the layout's test split: %s", leaking)
        order = [free_groups[i] for i in rng.permutation(len(free_groups))]
        n_val = _count(split_cfg.val_fraction, len(order))
        n_val = min(n_val, max(0, len(order) - 1))
        val_groups, train_groups = order[:n_val], order[n_val:]
    else:
        keys = list(groups)
        order = [keys[i] for i in rng.permutation(len(keys))]
        n_test = _count(split_cfg.test_fraction, len(order))
        n_val = _count(split_cfg.val_fraction, len(order))
        while n_test + n_val >= len(order) and n_test + n_val > 0:
            # Keep at least one group for training; give up val first (test is what gets reported).
            if n_val >= n_test and n_val > 0:
                n_val -= 1
            else:
                n_test -= 1
        test_groups = order[:n_test]
        val_groups = order[n_test:n_test + n_val]
        train_groups = order[n_test + n_val:]
        out["test"] = [m for g in test_groups for m in groups[g]]
    out["val"] = [m for g in val_groups for m in groups[g]]
    out["train"] = [m for g in train_groups for m in groups[g]]
    if not out["train"] and len(samples) >= 2:
        raise DataError(
            f"the split leaves no training samples ({len(out['test'])} test, {len(out['val'])} val of "
            f"{len(samples)}); set data.split.use_layout_split=false, lower the fractions, or relax "
            "data.split.group_by so that more than one group exists"
        )
    _say_empty(out, split_cfg, layout_test, len(samples), len(groups), bool(duplicate_groups))
    return {name: sorted(ids) for name, ids in out.items()}


def _say_empty(out: dict[str, list[str]], split_cfg: SplitCfg, layout_test: bool, n_samples: int, n_groups: int,
               grouped_duplicates: bool) -> None:
    """One warning line when a split the config asks for comes out empty: training would run without validation and
    evaluation would find no test images, and nothing else says why."""
    asked = {"val": split_cfg.val_fraction, "test": 0.0 if layout_test else split_cfg.test_fraction}
    empty = [name for name, fraction in asked.items() if fraction > 0 and not out[name]]
    if not empty:
        return
    why = (f"{n_samples} samples form only {n_groups} unit(s) that may not straddle splits"
           + (" (near-duplicate images are kept together: see `medtune data inspect`, or set "
              "data.split.keep_duplicates_together=false)" if grouped_duplicates and n_groups < n_samples else "")
           if n_groups < n_samples else f"{n_samples} samples are too few for the fractions asked")
    msg = (f"the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty although "
           + ", ".join(f"data.split.{name}_fraction={asked[name]:g}" for name in empty) + f": {why}; training "
           "keeps at least one")
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def save_split(path: str | Path, split: dict[str, list[str]]) -> None:
    from medtune.atomic import write_text_atomic  # a reader in another process never sees half a file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({name: list(split.get(name, [])) for name in SPLIT_NAMES}, indent=1) + "\n")


def load_split(path: str | Path) -> dict[str, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found; run training first or point to the run folder")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}); delete it to make a new split") from None
    bad = [n for n in SPLIT_NAMES if not isinstance(data.get(n) if isinstance(data, dict) else None, list)]
    if bad or not all(isinstance(i, str) for n in SPLIT_NAMES for i in data[n]):
        raise DataError(f"{path}: needs lists of ids under {', '.join(SPLIT_NAMES)}; delete it to make a new split")
    return {n: list(data[n]) for n in SPLIT_NAMES}


def check_split(split: dict[str, list[str]], samples: list[Sample]) -> None:
    """DataError when the split names ids the data does not have, or puts one id in two splits."""
    known = {s.id for s in samples}
    problems = []
    seen: dict[str, str] = {}
    for name in SPLIT_NAMES:
        for i in split.get(name, []):
            if i not in known:
                problems.append(f"'{i}' in split '{name}' is not in the data")
            if i in seen:
                problems.append(f"'{i}' is in both '{seen[i]}' and '{name}'")
            seen.setdefault(i, name)
    if problems:
        shown = problems[:50] + ([f"... and {len(problems) - 50} more"] if len(problems) > 50 else [])
        raise DataError(
            f"the split does not match the data ({len(problems)} problem(s)); it was made for other data or files "
            "were renamed: point data.path at the original data or delete split.json to make a new split:\n"
            + "\n".join(f"  - {p}" for p in shown)
        )
