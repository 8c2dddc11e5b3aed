"""`medtune cv CONFIG --folds k`: k group-aware folds, each trained and evaluated as an ordinary run folder, then
mean ± sd of every metric across folds.

A fold whose run folder already holds an evaluation made with the same config is reused, so an interrupted
cross-validation continues where it stopped instead of retraining finished folds.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

from medtune.config import Config, ConfigError, build_config
from medtune.errors import UserError

log = logging.getLogger("medtune")

SUMMARY_METRICS = ["dice", "iou", "precision", "recall", "specificity", "auc", "cldice", "betti0_error",
                   "betti1_error", "hd95"]


def fold_config(cfg: Config, folds: int, fold: int) -> Config:
    return build_config(cfg.model_dump(mode="json"), [
        f"data.split.folds={folds}", f"data.split.fold={fold}", f"run.name={cfg.run.name}-cv{folds}-fold{fold}",
    ])


def _finished_fold(cfg_i: Config, split: str = "test") -> Path | None:
    """The fold's run folder when it was trained with exactly this config and evaluated; else None.

    An interrupted earlier attempt leaves `<name>` unfinished and the retry writes `<name>-1` (new_run_dir never
    overwrites), so every `<name>[-N]` is a candidate; the newest finished one wins.
    """
    base = Path(cfg_i.run.output_dir) / cfg_i.run.name
    suffixed = [p for p in base.parent.glob(f"{base.name}-*") if p.name[len(base.name) + 1:].isdigit()]
    candidates = [base] + sorted(suffixed, key=lambda p: int(p.name[len(base.name) + 1:]))
    for run_dir in reversed(candidates):
        if not (run_dir / "eval" / split / "summary.json").is_file() or not (run_dir / "config.yaml").is_file():
            continue
        try:
            stored = build_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
        except (ConfigError, yaml.YAMLError):
            continue
        if stored == cfg_i:
            return run_dir
    return None


def _default_train(cfg: Config) -> Path:
    from medtune.train import train

    return train(cfg)


def _default_evaluate(run_dir: Path) -> dict:
    from medtune.evaluate import evaluate_run

    return evaluate_run(run_dir)


def _mean_sd(values: list[float]) -> dict:
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if not len(v):
        return {"mean": None, "sd": None, "n": 0}
    # sample sd (ddof=1): the folds are a sample of the possible train/test partitions
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else None, "n": int(len(v))}


def _pm(stat: dict) -> str:
    if stat["mean"] is None:
        return "—"
    sd = f" ± {stat['sd']:.4f}" if stat["sd"] is not None else ""
    return f"{stat['mean']:.4f}{sd}"


def summarize_folds(summaries: list[dict]) -> dict:
    """{"pooled@cal": {metric: {mean, sd, n, folds: [...]}}, "per_image@cal": {...}} across fold summaries."""
    out: dict[str, dict] = {}
    for key in ("pooled@cal", "per_image@cal"):
        names = [m for m in SUMMARY_METRICS if any(m in (s.get(key) or {}) for s in summaries)]
        table = {}
        for m in names:
            vals = []
            for s in summaries:
                v = (s.get(key) or {}).get(m)
                v = v.get("mean") if isinstance(v, dict) else v
                vals.append(float(v) if v is not None else float("nan"))
            table[m] = {**_mean_sd(vals), "folds": [v if math.isfinite(v) else None for v in vals]}
        out[key] = table
    return out


def format_cv_table(stats: dict, folds: int, run_dirs: list[Path]) -> str:
    width = max([len(m) for m in SUMMARY_METRICS] + [6])
    lines = [f"{folds}-fold cross-validation (test fold of each run, calibrated threshold), mean ± sd across folds",
             f"{'metric':<{width}}  {'pooled':>20}  {'per-image mean':>20}  per fold (per-image mean)"]
    names = list(dict.fromkeys([*stats["pooled@cal"], *stats["per_image@cal"]]))
    for m in names:
        pooled = stats["pooled@cal"].get(m, {"mean": None, "sd": None})
        per = stats["per_image@cal"].get(m, {"mean": None, "sd": None, "folds": []})
        folds_txt = " ".join("—" if v is None else f"{v:.4f}" for v in per.get("folds", []))
        lines.append(f"{m:<{width}}  {_pm(pooled):>20}  {_pm(per):>20}  {folds_txt}")
    lines.append("fold runs:")
    lines += [f"  fold {i}: {d}" for i, d in enumerate(run_dirs)]
    return "\n".join(lines)


def _markdown(stats: dict, folds: int, run_dirs: list[Path], name: str) -> str:
    lines = [f"# {name}: {folds}-fold cross-validation", "",
             "Each fold's test set is scored at the threshold calibrated on that fold's validation split. "
             "Values are mean ± sd across folds (sample sd).", "",
             "| metric | pooled | per-image mean | " + " | ".join(f"fold {i}" for i in range(folds)) + " |",
             "|---|---:|---:|" + "---:|" * folds]
    for m in dict.fromkeys([*stats["pooled@cal"], *stats["per_image@cal"]]):
        pooled = stats["pooled@cal"].get(m, {"mean": None, "sd": None})
        per = stats["per_image@cal"].get(m, {"mean": None, "sd": None, "folds": [None] * folds})
        cells = ["—" if v is None else f"{v:.4f}" for v in per["folds"]]
        lines.append(f"| {m} | {_pm(pooled)} | {_pm(per)} | " + " | ".join(cells) + " |")
    lines += ["", "Fold run folders (per-fold reports: `medtune report RUN`):", ""]
    lines += [f"- fold {i}: `{d}`" for i, d in enumerate(run_dirs)]
    return "\n".join(lines) + "\n"


def run_cv(cfg: Config, folds: int, train_fn: Callable[[Config], Path] | None = None,
           evaluate_fn: Callable[[Path], dict] | None = None) -> str:
    """Train + evaluate every fold, write <output_dir>/<name>-cv<k>/{cv_summary.json, cv.md}, return the table.

    ``train_fn`` / ``evaluate_fn`` default to the recipe of ``cfg.objective`` and ``evaluate_run``; they are
    parameters so a caller (or a test) can run the bookkeeping around other training code.
    """
    if folds < 2:
        raise UserError(f"cross-validation needs at least 2 folds (got {folds})")
    if cfg.objective == "rl" and cfg.rl.init_from:
        # adopt_parent copies the parent's split.json, so every fold would be tested on the parent's test images
        raise UserError(f"objective rl with rl.init_from={cfg.rl.init_from} reuses that run's split in "
                         "every fold, so the folds would not differ; cross-validate the supervised config instead, "
                         "or train RL from each fold's run (rl.init_from=<name>-cv<k>-fold<i>) yourself")
    train_fn = train_fn or _default_train
    evaluate_fn = evaluate_fn or _default_evaluate
    run_dirs: list[Path] = []
    summaries: list[dict] = []
    for i in range(folds):
        cfg_i = fold_config(cfg, folds, i)
        done = _finished_fold(cfg_i)
        if done is not None:
            log.info("cv fold %d/%d: reusing the finished run %s", i + 1, folds, done)
            run_dir = done
            summary = json.loads((done / "eval" / "test" / "summary.json").read_text())
        else:
            log.info("cv fold %d/%d: training %s", i + 1, folds, cfg_i.run.name)
            run_dir = Path(train_fn(cfg_i))
            summary = evaluate_fn(run_dir)
        run_dirs.append(run_dir)
        summaries.append(summary)

    stats = summarize_folds(summaries)
    out_dir = Path(cfg.run.output_dir) / f"{cfg.run.name}-cv{folds}"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"name": cfg.run.name, "folds": folds, "split_seed": cfg.data.split.seed if cfg.data.split.seed
              is not None else cfg.run.seed, "runs": [str(d) for d in run_dirs],
              "thresholds": [s.get("threshold") for s in summaries],
              "n_images": [s.get("n_images") for s in summaries], **stats}
    (out_dir / "cv_summary.json").write_text(json.dumps(result, indent=2))
    (out_dir / "cv.md").write_text(_markdown(stats, folds, run_dirs, cfg.run.name))
    return format_cv_table(stats, folds, run_dirs) + f"\nwritten: {out_dir / 'cv_summary.json'}, {out_dir / 'cv.md'}"
