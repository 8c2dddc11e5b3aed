"""Tasks: what a model is asked to do with each sample, as one small object of plain functions per kind of job.

A task owns its training dataset and collate, its loss, its validation function and the metric that picks `best`;
the recipes (``train/sft.py``, ``train/rl.py``) stay flat and call only these. Chosen by ``cfg.task_kind()``
(``task.kind``, or from the model family), listed here by "module:attribute" so nothing imports until asked for.
"""
from __future__ import annotations

import importlib

from medtune.config import Config
from medtune.tasks.base import TargetPrediction, Task, selection

TASKS: dict[str, str] = {
    "masks": "medtune.tasks.masks:TASK",
    "segvlm": "medtune.tasks.segvlm:TASK",
    "instruct": "medtune.tasks.instruct:TASK",
}


def task_for(cfg: Config) -> Task:
    kind = cfg.task_kind()
    module_name, _, attr = TASKS[kind].partition(":")
    return getattr(importlib.import_module(module_name), attr)


__all__ = ["TASKS", "Task", "TargetPrediction", "selection", "task_for"]
