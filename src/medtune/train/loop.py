"""Per-step bookkeeping shared by the recipes: metrics log, validation + best, checkpoints, SIGTERM, non-finite.

The recipes keep the optimisation itself (forward, loss, backward, step) visible; after each optimizer step they call
``bookkeeping.after_step(...)``, which decides whether to log, validate, save or stop.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from medtune.atomic import write_text_atomic
from medtune.config import Config
from medtune.runs.checkpoint import TrainerState, rotate_step_checkpoints, save_checkpoint
from medtune.runs.files import MetricsLog
from medtune.train.gradient_watch import DeadGradientWatch, dead_gradient_message
from medtune.train.preflight import selected_by_prediction
from medtune.train.setup import StopFlag, TrainingStopped, frozen_metric_warning, warn
from medtune.train.utilisation import StepFlops, compute_dtype, measure_matmul_peak, mfu, reference_peak

log = logging.getLogger("medtune")

# An fp16 gradient that is non-finite although the loss scale is already at most this is not an overflow the scaler
# can fix by lowering its scale: it counts as non-finite (else a NaN gradient would skip updates forever).
MIN_OVERFLOW_SCALE = 1.0


class Bookkeeping:
    def __init__(self, accelerator: Accelerator, cfg: Config, run_dir: Path, model, optimizer, scheduler,
                 state: TrainerState, resumed: bool, validate: Callable[[torch.nn.Module], dict[str, float]],
                 select: tuple[str, bool], stop: StopFlag):
        """``validate(model) -> {"val_*": value}`` (empty when there is no validation data); ``select`` = (the key
        of it that picks `best`, whether higher is better); ``stop``: the session's SIGTERM flag."""
        self.acc, self.cfg, self.run_dir = accelerator, cfg, run_dir
        self.model, self.optimizer, self.scheduler, self.state = model, optimizer, scheduler, state
        self.unwrapped = accelerator.unwrap_model(model)
        self.validate_fn = validate
        self.select_key, self.higher_is_better = select
        self.ckpt_root = run_dir / "checkpoints"
        self.is_main = accelerator.is_main_process
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=state.step if resumed else None) \
            if self.is_main else None
        self.progress = tqdm(total=cfg.optim.max_steps, initial=state.step, disable=not self.is_main,
                             desc=f"train ({cfg.objective})", unit="step")
        self.stop = stop
        # MFU: FLOPs of the steps (counted once per batch shape) against the device's matmul peak, measured now, and
        # against its published peak (utilisation.reference_peak)
        self.flops = StepFlops(enabled=cfg.train.log_mfu and self.is_main)
        self.peak = measure_matmul_peak(accelerator.device, compute_dtype(cfg.train.mixed_precision)) \
            if self.flops.enabled else None
        self.reference = reference_peak(accelerator.device, self.peak) if self.peak is not None else None
        self._utilisation_written, self._written_shapes = False, (0, 0)
        self._window_start, self._window_images, self._window_excluded = time.perf_counter(), 0, 0.0
        self._last_saved = time.monotonic()
        checks = cfg.train.dead_gradient_checks
        self.gradient_watch = DeadGradientWatch(model, checks, selected_by_prediction(model)) \
            if checks and self.is_main else None

    # -- the recipe calls these -------------------------------------------------------------------------------
    def counting_flops(self, n_local_images: int, batch: dict | None = None):
        """Context around one step's forward + backward: FLOP-counted (for MFU) the first time its batch's shapes
        run, its FLOPs taken from that count after (batch None: one count for the whole run)."""
        return self.flops.counting(n_local_images, batch)

    def count_images(self, n_local: int) -> None:
        self._window_images += n_local * self.acc.num_processes

    def watch_gradients(self) -> None:
        """Call after backward, before the gradients are cleared: on the steps that are logged, warn about trainable
        tensors whose gradient has been exactly zero at the last ``train.dead_gradient_checks`` of them."""
        step, every = self.state.step + 1, self.cfg.train.log_every
        if self.gradient_watch is None or step % every:
            return
        newly = self.gradient_watch.check()
        if newly:
            warn(dead_gradient_message(step, newly, self.gradient_watch.checks, every))

    def update_allowed(self, global_loss: torch.Tensor, grad_norm) -> bool:
        """True when the step's loss (already averaged over processes, so every process decides alike) and gradient
        norm are finite; otherwise the update is skipped. An fp16 overflow (finite loss, overflowed scaled gradient)
        is routine: the loss scaler lowers its scale. Anything else is counted, and too many in a row stop the run."""
        finite_loss = bool(torch.isfinite(global_loss))
        finite = finite_loss and (grad_norm is None or bool(torch.isfinite(grad_norm)))
        scaler = self.acc.scaler
        if finite:
            self.state.nonfinite_in_a_row = 0
        elif finite_loss and scaler is not None and scaler.get_scale() > MIN_OVERFLOW_SCALE:
            # fp16: the scaled gradient overflowed. Routine: the loss scaler skips this update and lowers its scale.
            self.state.fp16_overflows += 1
            log.info("fp16 overflow at step %d: update skipped by the loss scaler (scale %g, lowered next)",
                     self.state.step + 1, scaler.get_scale())
        else:
            self.state.nonfinite_in_a_row += 1
            self.state.nonfinite_total += 1
            warn(f"non-finite loss/gradient at step {self.state.step + 1}: update skipped "
                 f"({self.state.nonfinite_in_a_row} in a row, {self.state.nonfinite_total} in total)")
        return finite

    def after_step(self, record: dict) -> bool:
        """Call once per optimizer step (after state.step += 1). Returns True when the run must stop now."""
        state, cfg = self.state, self.cfg
        self.progress.update(1)
        if self.is_main and (state.step % cfg.train.log_every == 0 or state.step == cfg.optim.max_steps):
            elapsed = time.perf_counter() - self._window_start - self._window_excluded
            record = {"step": state.step, **record, "lr": self.scheduler.get_last_lr()[0],
                      "images_per_s": self._window_images / max(elapsed, 1e-9)}
            record.update(self._utilisation(self.flops.window * self.acc.num_processes / max(elapsed, 1e-9)))
            if self.acc.scaler is not None:
                record.update(loss_scale=self.acc.scaler.get_scale(), fp16_overflows=state.fp16_overflows)
            if self.gradient_watch is not None:
                record["dead_gradient_tensors"] = len(self.gradient_watch.dead)
            self.log(record)
            postfix = {"loss": f"{record.get('loss', float('nan')):.4f}", "img/s": f"{record['images_per_s']:.1f}"}
            if "mfu" in record:
                postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
            self.progress.set_postfix(postfix)
            self._window_start, self._window_images, self._window_excluded = time.perf_counter(), 0, 0.0
            self.flops.window = 0.0
        paused = time.perf_counter()  # validation and checkpoints are not training throughput

        if state.nonfinite_in_a_row >= cfg.train.max_nonfinite:
            self.checkpoint("last", reason="non-finite")
            raise TrainingStopped(
                f"{state.nonfinite_in_a_row} non-finite losses in a row at step {state.step}; stopped with a "
                f"checkpoint in {self.ckpt_root / 'last'}. Lower optim.lr, use mixed_precision=bf16 instead of fp16, "
                "or check the data for NaNs"
            )
        if state.step % cfg.train.eval_every == 0 or state.step == cfg.optim.max_steps:
            self.validate()
        if state.step % cfg.train.save_every == 0:
            self.checkpoint(f"step-{state.step}")
            self.checkpoint("last")
            if self.is_main:
                rotate_step_checkpoints(self.ckpt_root, cfg.train.keep_last)
        # every process must agree to stop (and to save), or the next collective op hangs
        flags = torch.tensor([float(self.stop.requested), float(self._save_due())], device=self.acc.device)
        stop, save = (float(v) > 0 for v in self.acc.reduce(flags, reduction="sum"))
        if stop:
            self.checkpoint("last", reason="SIGTERM")
            log.warning("SIGTERM: wrote %s at step %d; continue with `medtune train --resume %s`",
                        self.ckpt_root / "last", state.step, self.run_dir)
            return True
        if save:  # just another `last`: a resume from it is as exact as from any other
            self.checkpoint("last")
        self._window_excluded += time.perf_counter() - paused
        return False

    def finish(self, completed: bool) -> None:
        if completed:
            self.checkpoint("last")
            if self.state.best_step < 0:  # no (finite) validation to choose by: the final weights are the best known
                self.checkpoint("best")
        self.progress.close()

    # -- internals ---------------------------------------------------------------------------------------------
    def _utilisation_info(self) -> dict:
        return {"flops_per_image": self.flops.per_image, "flops_counted_step": self.flops.total,
                "counted_shapes": self.flops.shapes, "estimated_steps": self.flops.estimated_steps,
                "flop_count": "torch.utils.flop_counter.FlopCounterMode's count (matmul, conv, attention; fwd + bwd), "
                              "once per batch shape",
                "peak": self.peak.to_dict(), "reference_peak": self.reference.to_dict(),
                "processes": self.acc.num_processes}

    def _utilisation(self, achieved: float) -> dict:
        """`achieved`: FLOP/s of all processes over the logging window (this process's counted FLOPs x processes)."""
        if self.flops.per_image is None or self.peak is None:
            return {}
        processes = self.acc.num_processes
        if achieved > self.peak.flops_per_s * processes:
            # the peak was measured while something else held the cores: measure again, keep the higher one
            again = measure_matmul_peak(self.acc.device, compute_dtype(self.cfg.train.mixed_precision), again=True)
            if again.flops_per_s > self.peak.flops_per_s:
                self.peak, self._utilisation_written = again, False
                if self.reference.source.startswith("measured"):
                    self.reference = reference_peak(self.acc.device, again)
        shapes = self.flops.shapes  # (estimated steps grow every step: not a reason to rewrite the file)
        if not self._utilisation_written or shapes != self._written_shapes:  # this session's counts and peaks
            write_text_atomic(self.run_dir / "utilisation.json", json.dumps(self._utilisation_info(), indent=2))
            self._utilisation_written, self._written_shapes = True, shapes
        return {"tflops_per_s": achieved / 1e12, "mfu": mfu(achieved, self.peak.flops_per_s, processes),
                "mfu_published": mfu(achieved, self.reference.flops_per_s, processes)}

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        self.metrics.write(record)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.acc.log(scalars, step=self.state.step)

    def validate(self) -> None:
        val = self.validate_fn(self.unwrapped)
        if not val:
            return
        if self.select_key not in val:
            raise KeyError(f"train.selection_metric {self.select_key!r} is not among the validation metrics "
                           f"{sorted(val)}; set train.selection_metric to one of them")
        score = val[self.select_key]
        self.state.val_history.append(score)
        self.log({"step": self.state.step, **val})
        message = frozen_metric_warning(self.state.val_history)
        if message and self.is_main:
            warn(message)
            self.log({"step": self.state.step, "warning": message})
        # best_metric is stored as "higher is better" so one comparison (and one resume format) serves both modes
        signed = score if self.higher_is_better else -score
        if math.isfinite(score) and signed > self.state.best_metric:
            self.state.best_metric, self.state.best_step = signed, self.state.step
            self.checkpoint("best", **val)

    def _save_due(self) -> bool:
        minutes = self.cfg.train.save_every_minutes
        return minutes is not None and time.monotonic() - self._last_saved >= minutes * 60

    def checkpoint(self, name: str, **meta) -> None:
        # every process takes part: FSDP gathers the weights, ZeRO / FSDP write their optimizer shards, and each
        # rank writes its own RNG state
        save_checkpoint(self.ckpt_root, name, self.unwrapped, self.optimizer, self.scheduler, self.state, meta,
                        scaler=self.acc.scaler, accelerator=self.acc, engine_model=self.model)
        if name == "last":
            self._last_saved = time.monotonic()
