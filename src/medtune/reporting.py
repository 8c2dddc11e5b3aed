"""`medtune report RUN` and `medtune compare RUN RUN ...`: the runs' own task writes them (mask tasks: overlays,
calibration and per-image metrics — ``report/html.py``, ``report/compare.py``; instruction tuning: answers,
confusion matrix, McNemar — ``report/answers.py``)."""
from __future__ import annotations

from pathlib import Path

from medtune.errors import UserError
from medtune.tasks import task_of_run


def write_report(run_dir: str | Path, split: str = "test") -> Path:
    return task_of_run(run_dir).write_report(Path(run_dir), split)


def compare_runs(runs: list[str | Path], out_dir: str | Path | None = None, split: str = "test", at: str = "cal",
                 allow_eval_mismatch: bool = False) -> str:
    """Runs of one task compared on the same evaluated split (the first run is the baseline)."""
    if len(runs) < 2:
        raise UserError("compare needs at least two run folders (the first is the baseline)")
    tasks = [task_of_run(r) for r in runs]
    kinds = sorted({t.name for t in tasks})
    if len(kinds) > 1:
        raise UserError(f"compare pairs runs of one task; these are {' and '.join(kinds)} runs "
                        f"({', '.join(f'{r}: {t.name}' for r, t in zip(runs, tasks))})")
    return tasks[0].compare([Path(r) for r in runs], Path(out_dir) if out_dir is not None else None, split, at,
                            allow_eval_mismatch)
