"""`medtune eval RUN`: the run's own task evaluates it and writes RUN/eval/<split>/ (mask tasks: threshold calibrated
on val, metrics at 0.5 and calibrated with bootstrap CIs — ``tasks/mask_eval.py``; instruction tuning: greedy answers
parsed into labels — ``tasks/instruct.py``)."""
from __future__ import annotations

from pathlib import Path

from medtune.tasks import task_named, task_of_run


def evaluate_run(run_dir: str | Path, split: str = "test", checkpoint: str = "best", device=None,
                 strategy: str | None = None, data_file: str | Path | None = None,
                 image_root: str | Path | None = None) -> dict:
    """Evaluate ``split`` of a run with its ``checkpoint`` into RUN/eval/<split>/; ``strategy`` overrides
    ``eval.calibration`` (mask tasks). With ``data_file`` (`medtune eval RUN --data FILE`), every sample of another
    data set in the run's layout, into RUN/eval/data-<its name>/, leaving the run's own evaluations as they are."""
    return task_of_run(run_dir).evaluate_run(Path(run_dir), split, checkpoint, device, strategy, data_file,
                                             image_root)


def format_summary(summary: dict) -> str:
    """The text `medtune eval` prints for a summary.json (summaries written before tasks were recorded are masks)."""
    return task_named(summary.get("task", "masks")).format_summary(summary)
