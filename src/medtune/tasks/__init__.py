"""Tasks: what a model is asked to do with each sample, as one small object of plain functions per kind of job.

A task owns its training dataset and collate, its loss, its validation function and the metric that picks `best`;
the recipes (``train/sft.py``, ``train/rl.py``) stay flat and call only these. Chosen by ``cfg.task_kind()``
(``task.kind``, or from the model family), listed here by "module:attribute" so nothing imports until asked for.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from medtune.config import Config
from medtune.errors import UserError
from medtune.tasks.base import PredictRequest, TargetPrediction, Task, collate_for, selection

TASKS: dict[str, str] = {
    "masks": "medtune.tasks.masks:TASK",
    "segvlm": "medtune.tasks.segvlm:TASK",
    "instruct": "medtune.tasks.instruct:TASK",
    "video": "medtune.tasks.video:TASK",
}


def task_named(kind: str) -> Task:
    if kind not in TASKS:
        raise UserError(f"unknown task {kind!r}; the tasks are {', '.join(TASKS)}")
    module_name, _, attr = TASKS[kind].partition(":")
    return getattr(importlib.import_module(module_name), attr)


def task_for(cfg: Config) -> Task:
    return task_named(cfg.task_kind())


def task_of_run(run_dir: str | Path) -> Task:
    """The task a run folder was trained for (from its config.yaml), which then evaluates, predicts, reports and
    compares it."""
    from medtune.runs.files import load_run_config

    return task_for(load_run_config(run_dir))


__all__ = ["TASKS", "PredictRequest", "Task", "TargetPrediction", "collate_for", "selection", "task_for", "task_named",
           "task_of_run"]
