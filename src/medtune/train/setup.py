"""Building blocks both recipes share: accelerator and run folder, optimizer, schedule, validation, SIGTERM."""
from __future__ import annotations

import logging
import signal
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from transformers import get_cosine_schedule_with_warmup

from medtune.config import Config
from medtune.runs.files import load_run_config, new_run_dir, write_run_files

log = logging.getLogger("medtune")


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config):
    return get_cosine_schedule_with_warmup(optimizer, cfg.optim.warmup_steps, max(cfg.optim.max_steps, 1))


def frozen_metric_warning(history: list[float], window: int = 3) -> str | None:
    """Pitfall 10: a validation metric identical over `window` evaluations means nothing trains or the evaluated
    weights are not the trained ones."""
    if len(history) >= window and len({round(v, 6) for v in history[-window:]}) == 1:
        return (
            f"validation metric identical ({history[-1]:.6f}) over the last {window} evaluations: either nothing "
            "trains or the evaluated weights are not the trained ones"
        )
    return None


def batch_to(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def warn(msg: str) -> None:
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=2)



class TrainingStopped(RuntimeError):
    """Training stopped on purpose (too many non-finite losses); the last checkpoint was written first."""


class StopFlag:
    """SIGTERM -> finish the current step, write `last`, exit cleanly (a scheduler's pre-emption must lose nothing)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside a notebook worker): no handler, no harm
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def make_accelerator(cfg: Config) -> Accelerator:
    """One accelerator for both recipes. Without a GPU, `cpu=True` is what makes accelerate honour torchrun's
    environment (MULTI_CPU over gloo) instead of running every process as its own rank 0. The project dir is a
    placeholder until the run folder is agreed between processes (start_run)."""
    return Accelerator(mixed_precision=cfg.train.mixed_precision, log_with=cfg.train.trackers or None, project_dir=".",
                       cpu=not torch.cuda.is_available())


def start_run(cfg: Config, resume: str | Path | None, accelerator: Accelerator) -> tuple[Config, Path]:
    """New run: a fresh folder with the resolved config. Resume: the run's own config, so nothing drifts."""
    if resume is not None:
        run_dir = Path(resume)
        cfg = load_run_config(run_dir)
    else:
        run_dir = new_run_dir(cfg) if accelerator.is_main_process else None
        run_dir = Path(broadcast_object_list([str(run_dir) if run_dir else None])[0])
        if accelerator.is_main_process:
            write_run_files(run_dir, cfg)
    accelerator.wait_for_everyone()
    return cfg, run_dir


def init_trackers(accelerator: Accelerator, cfg: Config, run_dir: Path) -> None:
    """TensorBoard / MLflow through accelerate's trackers, logging into RUN/tb, with flat scalar hyper-parameters."""
    # set_directories() keeps an already-set logging_dir (the placeholder "."), so set both explicitly
    accelerator.project_configuration.set_directories(str(run_dir))
    accelerator.project_configuration.logging_dir = str(run_dir)
    flat = {
        "lr": cfg.optim.lr, "max_steps": cfg.optim.max_steps, "batch_size": cfg.data.batch_size,
        "lora_r": cfg.lora.resolved_r(), "family": cfg.model.family, "finetune": cfg.finetune_mode(),
        "objective": cfg.objective,
    }
    accelerator.init_trackers("tb", config=flat)
