"""Supervised fine-tuning recipe: the task's loss (ComboLoss on masks; mask loss + LM loss for a segmenting VLM),
LoRA or full, run through accelerate.

Read it top to bottom: set up the run folder -> data -> model -> optimizer -> preflight -> loop -> checkpoints.
Runs unchanged on 1 CPU process, 2 CPU processes (``torchrun --nproc_per_node 2``, gloo) and GPUs
(``accelerate launch``). ``data.batch_size`` is the global batch of one forward; each process takes its slice.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from medtune.config import Config
from medtune.data.datasets import StepBatchSampler
from medtune.data.run_split import check_readable, load_split_samples, prepare_split
from medtune.models.feature_cache import use_feature_cache
from medtune.models.registry import build_run_model
from medtune.tasks import collate_for, selection, task_for
from medtune.train.loop import Bookkeeping
from medtune.train.preflight import run_preflight
from medtune.train.setup import (
    StopFlag,
    batch_to,
    images_in,
    init_trackers,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    resume_state,
    start_run,
    training_session,
)

log = logging.getLogger("medtune")


def micro_batch_weights(micro_batches: list[dict], task, accelerator) -> list[torch.Tensor]:
    """The factor each micro-batch's (mean) loss is multiplied by before backward, so that k micro-batches on N
    processes give the gradient of one batch of all their samples: its supervised units (task.loss_units: answer
    tokens, ...; else its samples) x N / the units of all micro-batches on all processes. DDP averages gradients over
    the N processes, hence the factor N. Equal micro-batches of a mask task get 1 / k, as before."""
    units = [task.loss_units(b) if task.loss_units is not None else torch.tensor(float(images_in(b)))
             for b in micro_batches]
    local = torch.stack([u.to(torch.float32).reshape(()) for u in units]).to(accelerator.device)
    total = accelerator.reduce(local.sum(), reduction="sum").clamp(min=1)  # none at all: every weight 0, not NaN
    return list(local * accelerator.num_processes / total)


def train(cfg: Config, resume: str | Path | None = None) -> Path:
    """`resume`: a run folder to continue, or "auto" to start or continue output_dir/run.name (setup.start_run)."""
    accelerator = make_accelerator(cfg)
    with training_session(accelerator) as stop:  # SIGTERM-safe from here; handler and trackers released on any exit
        return _train(cfg, resume, accelerator, stop)


def _train(cfg: Config, resume: str | Path | None, accelerator, stop: StopFlag) -> Path:
    cfg, run_dir, resume = start_run(cfg, resume, accelerator)  # resume: from here on the checkpoint, or None
    is_main, device = accelerator.is_main_process, accelerator.device
    set_seed(cfg.run.seed)
    init_trackers(accelerator, cfg, run_dir)

    # ---- data: the split is fixed in RUN/split.json; batches are a pure function of (seed, step)
    data = prepare_split(cfg, run_dir, is_main, accelerator.wait_for_everyone)
    train_samples = load_split_samples(cfg, data, "train", run_dir, lazy=True)  # decoded in the loader's workers
    # validation decodes its images each time it runs: memory between validations does not grow with the split
    val_samples = load_split_samples(cfg, data, "val", run_dir, limit=cfg.train.max_eval_images, lazy=True)
    check_readable(cfg, data, ("val", "test"), run_dir)
    task = task_for(cfg)
    model = build_run_model(cfg).to(device)  # as every later load builds it
    use_feature_cache(model, cfg, run_dir)  # train.feature_cache: a frozen image encoder runs once per image
    dataset = task.train_dataset(train_samples, cfg, model)
    accum = cfg.optim.grad_accum

    def batches(start_micro_step: int):
        sampler = StepBatchSampler(len(dataset), cfg.data.batch_size, cfg.run.seed, start_micro_step,
                                   accelerator.process_index, accelerator.num_processes)
        # its own generator: creating the iterator must not draw from the global RNG restored by a resume
        return iter(DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                               collate_fn=collate_for(task, dataset), generator=torch.Generator()))

    # ---- objective, optimizer
    loss_fn = task.make_loss(cfg)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler is stepped once per optimizer step, by us
    # the model is built alike everywhere (seeded above); from here each process draws its own random stream (dropout),
    # which a checkpoint saves and a resume restores per process
    set_seed(cfg.run.seed + accelerator.process_index)
    state = resume_state(resume, model, optimizer, scheduler, accelerator)  # after prepare: engines load collectively

    # ---- preflight: prove every trainable tensor learns before spending the night on it
    if cfg.train.preflight and resume is None:
        fixed = batch_to(next(batches(0)), device)
        report = run_preflight(
            model, optimizer,
            compute_loss=lambda: loss_fn(model, fixed)[0],
            backward=accelerator.backward, steps=cfg.train.preflight_steps,
        )
        if is_main:
            (run_dir / "preflight.json").write_text(json.dumps(report.to_dict(), indent=2))
            log.info("preflight passed: %d trainable tensors (%d params) all receive gradient and move",
                     report.n_trainable, report.n_trainable_params)

    # ---- loop
    stream = batches(state.step * accum)
    books = Bookkeeping(accelerator, cfg, run_dir, model, optimizer, scheduler, state, resume is not None,
                        validate=lambda m: task.validate(m, val_samples, cfg, device) if val_samples else {},
                        select=selection(cfg, task), stop=stop)
    completed = True
    while state.step < cfg.optim.max_steps:
        model.train()
        loss_sum, parts_sum = torch.zeros((), device=device), {}
        micro_batches = [next(stream) for _ in range(accum)]
        weights = micro_batch_weights(micro_batches, task, accelerator)
        for micro, (batch, weight) in enumerate(zip(micro_batches, weights)):
            batch = batch_to(batch, device)
            n_images = images_in(batch)
            # accelerate's accumulate: gradients are all-reduced (DeepSpeed: its engine steps) once per optimizer
            # step, on the last micro-batch. Its backward divides the loss by grad_accum (DeepSpeed's engine does
            # the same); the weights already normalise over all micro-batches, hence the factor accum.
            with accelerator.accumulate(model), books.counting_flops(n_images, batch):
                loss, parts = loss_fn(model, batch)
                accelerator.backward(loss * weight * accum)
            loss_sum += loss.detach() * weight
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v * float(weight)
            books.count_images(n_images)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm or float("inf"))
        books.watch_gradients()  # a trainable part that stopped reaching the loss since the preflight: warn
        global_loss = accelerator.reduce(loss_sum, reduction="mean")
        allowed = books.update_allowed(global_loss, grad_norm)
        if allowed or accelerator.scaler is not None:
            optimizer.step()  # fp16: the loss scaler skips an inf step itself and must see it to lower its scale
        # a skipped update still advances schedule and data position, so a resumed run stays exact
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        record = {"loss": float(global_loss), **{f"loss_{k}": v for k, v in parts_sum.items()},
                  "grad_norm": float(grad_norm), "skipped": not allowed}
        if books.after_step(record):
            completed = False
            break
    books.finish(completed)
    return run_dir
