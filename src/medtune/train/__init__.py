"""The training recipes: `sft.py` (objective: supervised) and `rl.py` (objective: rl)."""
from __future__ import annotations

from pathlib import Path

from medtune.config import Config


def train(cfg: Config, resume: str | Path | None = None) -> Path:
    """Run the recipe of ``cfg.objective``; returns the run folder. ``resume``: a run folder to continue, or "auto"
    to start or continue output_dir/run.name (see ``medtune.train.setup.start_run``)."""
    if cfg.objective == "rl" and cfg.task_kind() == "instruct":
        from medtune.train.rl_answers import train as recipe  # GRPO on sampled answers
    elif cfg.objective == "rl":
        from medtune.train.rl import train as recipe
    else:
        from medtune.train.sft import train as recipe
    return recipe(cfg, resume=resume)
