"""Building blocks both recipes share: accelerator and run folder, optimizer, schedule, validation, SIGTERM."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import signal
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import broadcast_object_list
from transformers import get_cosine_schedule_with_warmup

from medtune.atomic import write_text_atomic
from medtune.config import Config
from medtune.errors import ConfigError, UserError
from medtune.runs.checkpoint import (
    TrainerState,
    keep_weights_out_of_engine_state,
    latest_checkpoint,
    load_checkpoint,
    recover_checkpoints,
)
from medtune.runs.files import (
    config_differences,
    different_config_error,
    forget_progress,
    load_run_config,
    named_run_dir,
    new_run_dir,
    read_written_config,
    with_operational_settings,
    write_run_files,
)
from medtune.threads import configure as configure_threads
from medtune.threads import keep_run_threads

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


def images_in(batch: dict) -> int:
    """Images in a batch, for throughput: its ids (instruct, segvlm: no image tensor), the frames of its clips
    (video: every frame goes through the encoder), else its images."""
    if "ids" in batch:
        return len(batch["ids"])
    if "frames" in batch:
        return batch["frames"].shape[0] * batch["frames"].shape[1]
    return batch["image"].shape[0]


def batch_to(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def warn(msg: str) -> None:
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=2)


class TrainingStopped(UserError, RuntimeError):
    """Training stopped on purpose (too many non-finite losses); the last checkpoint was written first."""


class StopFlag:
    """SIGTERM -> finish the current step, write `last`, exit cleanly (a scheduler's pre-emption must lose nothing)."""

    _NOT_INSTALLED = object()

    def __init__(self):
        self.requested = False
        self._previous = self._NOT_INSTALLED

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside a notebook worker): no handler, no harm
            self._previous = self._NOT_INSTALLED
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not self._NOT_INSTALLED:
            # None: the previous handler was not set from Python; the default is the closest we can put back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
            self._previous = self._NOT_INSTALLED


@contextlib.contextmanager
def training_session(accelerator: Accelerator):
    """SIGTERM is caught from the very start (a SIGTERM during data loading or the preflight stops the run cleanly
    after its first step). On any exit, an exception included, the previous handler comes back, the trackers are
    closed and accelerate's process-wide state is reset, so a long-lived process (a notebook, `medtune cv`) keeps no
    dead handler and can run another config (another mixed precision, say) next."""
    with StopFlag() as stop:
        try:
            yield stop
        finally:
            accelerator.end_training()
            # accelerate keeps its state in process-wide singletons and refuses a second Accelerator with other settings
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()


# glibc malloc serves every block above M_MMAP_THRESHOLD (128 KiB at start) with fresh mmap'd pages and hands freed
# heap tops above M_TRIM_THRESHOLD back to the kernel. A CPU training step allocates and frees megabyte-sized
# activations and reward maps many times, so each step pays page faults for memory it just released (a quarter of
# an elementwise op's time on a 64 x 96^2 float map). Keeping freed memory in the process removes that: from no
# difference to -15 % per step on the 2-core CPU, run to run (bench/rl_cost.py). The cost: RSS does not shrink after
# a peak until the process ends. CUDA memory is unaffected (PyTorch's caching allocator already keeps it).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
MMAP_THRESHOLD_BYTES = 32 * 1024**2  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD_BYTES = 1024**3


@functools.lru_cache(maxsize=None)
def keep_freed_host_memory() -> bool:
    """Set the two malloc thresholds above, once per process; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                   TRIM_THRESHOLD_BYTES))


def make_accelerator(cfg: Config) -> Accelerator:
    """One accelerator for both recipes. Without a GPU, `cpu=True` is what makes accelerate honour torchrun's
    environment (MULTI_CPU over gloo) instead of running every process as its own rank 0. The project dir is a
    placeholder until the run folder is agreed between processes (start_run)."""
    keep_freed_host_memory()  # CPU steps stop paying page faults for memory they just freed
    configure_threads(cfg.train.threads)  # from the usable cores, before env.json records them (medtune.threads)
    # gradient_accumulation_steps: accelerate's `accumulate` then decides per micro-batch whether gradients are
    # synchronised (DDP no_sync, FSDP) and tells DeepSpeed where its accumulation boundary is, so its engine steps
    # once per optimizer step and not once per micro-batch
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, log_with=cfg.train.trackers or None,
                              project_dir=".", cpu=not torch.cuda.is_available(),
                              gradient_accumulation_steps=cfg.optim.grad_accum)
    if accelerator.gradient_accumulation_steps != cfg.optim.grad_accum:
        # `accelerate launch` passes a config's deepspeed gradient_accumulation_steps through the environment, and
        # it wins over ours: the engine would then step at other boundaries than the recipe's micro-batches
        raise ConfigError(f"the accelerate launch config sets gradient_accumulation_steps="
                          f"{accelerator.gradient_accumulation_steps}, but optim.grad_accum={cfg.optim.grad_accum}; "
                          "make them equal (e.g. deepspeed_config.gradient_accumulation_steps in the accelerate YAML)")
    keep_weights_out_of_engine_state(accelerator)  # checkpoints keep weights as plain PEFT / from_pretrained folders
    return accelerator


RESUME_AUTO = "auto"


def start_run(cfg: Config, resume: str | Path | None, accelerator: Accelerator,
              stored_as: Callable[[Config, Path], Config] | None = None) -> tuple[Config, Path, Path | None]:
    """Agree on the run folder, its config and where training starts: (config, run folder, checkpoint to continue
    from, or None for step 0).

    resume=None: a new folder (an existing name gets a numeric suffix) with the resolved config.
    resume=RUN: that run with its own config.yaml, from its newest complete checkpoint; from step 0 when it has none.
    resume="auto": exactly output_dir/run.name. Nothing usable there (or a run killed before its config.yaml was
    complete): started as a new run would be. Otherwise `cfg` must equal its config.yaml (OPERATIONAL_KEYS aside),
    and it continues as with resume=RUN. What a scheduler re-running the same command after a kill or a pre-emption
    (SLURM requeue, spot instances) needs: one run folder, never a second.
    `stored_as(cfg, run_dir)`: what config.yaml holds for a run started from `cfg` when that is not `cfg` itself (RL's
    init_from stores the parent's model section)."""
    opened: tuple | UserError | None = None
    if accelerator.is_main_process:
        try:
            opened = _open_run_folder(cfg, resume, stored_as)
        except UserError as err:  # every process must raise it, or the others wait here forever
            opened = err
    opened = broadcast_object_list([opened])[0]
    if isinstance(opened, UserError):
        raise opened
    cfg, run_dir, checkpoint = opened
    if checkpoint:  # continue with the thread count the run started with (sums split alike: an exact resume)
        keep_run_threads(cfg.train.threads, Path(run_dir) / "env.json")
    accelerator.wait_for_everyone()
    return cfg, Path(run_dir), Path(checkpoint) if checkpoint else None


def _open_run_folder(cfg: Config, resume, stored_as) -> tuple[Config, str, str | None]:
    if resume is None:
        run_dir = new_run_dir(cfg)
        write_run_files(run_dir, cfg)
        return cfg, str(run_dir), None
    auto = isinstance(resume, str) and resume == RESUME_AUTO
    run_dir = named_run_dir(cfg) if auto else Path(resume)
    recover_checkpoints(run_dir / "checkpoints")
    checkpoint = latest_checkpoint(run_dir)
    if auto and checkpoint is None:  # None: nothing there yet, or a config.yaml cut short by a kill (rewritten)
        stored = read_written_config(run_dir)
    else:
        stored = load_run_config(run_dir)
    if auto and stored is not None:
        differences = config_differences(cfg, stored)
        if differences and stored_as is not None:
            differences = config_differences(stored_as(cfg, run_dir), stored)
        if differences:
            raise different_config_error(run_dir, differences)
    if checkpoint is None:  # step 0, in this folder; a split.json already there is the one this config makes
        run_cfg = cfg if auto else stored
        forget_progress(run_dir)
        write_run_files(run_dir, run_cfg)
        log.info("%s: no complete checkpoint, training from step 0", run_dir)
        return run_cfg, str(run_dir), None
    if not auto:
        return stored, str(run_dir), str(checkpoint)
    run_cfg = with_operational_settings(stored, cfg)
    if run_cfg != stored:  # how to log and save from now on: the given values
        write_text_atomic(run_dir / "config.yaml", run_cfg.to_yaml())
    return run_cfg, str(run_dir), str(checkpoint)


def resume_state(checkpoint: Path | None, model, optimizer, scheduler, accelerator: Accelerator) -> TrainerState:
    """Step 0, or all a checkpoint holds: weights, optimizer, schedule, fp16 loss scale, each rank's own RNG, counters.
    Call on every process after accelerator.prepare (FSDP / ZeRO load their shards collectively)."""
    if checkpoint is None:
        return TrainerState()
    state = load_checkpoint(checkpoint, accelerator.unwrap_model(model), optimizer, scheduler,
                            scaler=accelerator.scaler, accelerator=accelerator)
    log.info("resumed from %s at step %d", checkpoint, state.step)
    return state


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
