"""RL recipe: group-relative policy optimisation (GRPO with PPO clipping) over masks sampled from the model.

Read it top to bottom: run folder (+ parent run) -> data -> policy model with a fresh LoRA adapter -> preflight ->
loop. One iteration: one policy forward (with grad) and one reference forward (adapters disabled, no grad) on a
batch; G masks sampled per image; vectorised rewards; group-relative advantages; `rl.inner_epochs` clipped updates on
the same samples (the first reuses the sampling forward, so it costs no extra forward); KL to the reference, optional
entropy bonus and optional lambda * ComboLoss for stability.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from skimage.morphology import skeletonize
from torch.utils.data import DataLoader

from medtune.atomic import write_json_atomic
from medtune.config import Config
from medtune.data.datasets import StepBatchSampler
from medtune.data.loading import records
from medtune.data.run_split import check_readable, load_split_samples, prepare_split
from medtune.data.types import LoadedSample
from medtune.errors import ConfigError, UserError
from medtune.losses import ComboLoss
from medtune.models.lora import export_merged
from medtune.models.registry import build_run_model
from medtune.policy import bernoulli_entropy, bernoulli_kl, clipped_objective, group_advantages, group_logprob, sample_group
from medtune.rewards import combined_reward, load_reward, register_reward, resolve_weights
from medtune.runs.files import load_run_config, write_run_files
from medtune.tasks import Task, collate_for, selection, task_for
from medtune.tasks.masks import pooled_validation
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


# ---- start point ---------------------------------------------------------------------------------------------------
def adopt_parent(cfg: Config, run_dir: Path, is_main: bool) -> Config:
    """`rl.init_from: RUN`: the parent's best weights (base + merged adapter, or fully trained weights) become this
    run's frozen base = the KL reference, and a fresh LoRA adapter on top is the policy. Same split and evaluation
    settings as the parent, so the comparison is paired on the same test images, scored the same way."""
    parent = Path(cfg.rl.init_from)
    reference_dir = run_dir / "reference-model"
    if is_main and not (reference_dir / ".complete").exists():
        from medtune.runs.load import load_run_model

        _, parent_model, ckpt = load_run_model(parent, "best", "cpu")
        export_merged(parent_model, reference_dir)
        shutil.copy(parent / "split.json", run_dir / "split.json")
        if (parent / "scale.json").exists():
            shutil.copy(parent / "scale.json", run_dir / "scale.json")
        (run_dir / "parent.json").write_text(json.dumps({"parent_run": str(parent), "checkpoint": str(ckpt)}, indent=2))
        (reference_dir / ".complete").write_text(str(ckpt))  # last: a run killed before it adopts again
    adopted = adopted_config(cfg, run_dir)
    if is_main:
        write_run_files(run_dir, adopted)
    return adopted


def adopted_config(cfg: Config, run_dir: Path) -> Config:
    """What RUN/config.yaml holds for a run started from `cfg` with rl.init_from (see adopt_parent)."""
    parent_cfg = load_run_config(cfg.rl.init_from)
    reference_dir = run_dir / "reference-model"
    tree = cfg.model_dump(mode="json")
    tree["model"] = {**parent_cfg.model.model_dump(mode="json"), "path": str(reference_dir), "finetune": "lora",
                     "quantize_4bit": cfg.model.quantize_4bit, "gradient_checkpointing": cfg.model.gradient_checkpointing,
                     # the exported reference folder replaces whatever the parent was composed from
                     "config": {}}
    tree["model"]["vlm"] = {**tree["model"].get("vlm", {}), "vlm_path": None, "sam_path": None}
    # what the parent was asked (task: prompt, class, answer) and trained with (loss): RL starts where it left off
    for section in ("task", "loss"):
        parent_section, own = getattr(parent_cfg, section), getattr(cfg, section)
        tree[section] = {**parent_section.model_dump(mode="json"),
                         **own.model_dump(mode="json", include=own.model_fields_set)}
    if cfg.data.path is None:  # the parent's data, with what this config sets explicitly on top
        own = cfg.data.model_dump(mode="json", include=cfg.data.model_fields_set)
        tree["data"] = {**parent_cfg.data.model_dump(mode="json"), **own}
    # the parent's evaluation (TTA, tiling, calibration), with what this config sets explicitly on top: RL vs
    # parent must be scored the same way, or `medtune compare` measures the evaluation change, not the RL
    own_eval = cfg.eval.model_dump(mode="json", include=cfg.eval.model_fields_set)
    tree["eval"] = {**parent_cfg.eval.model_dump(mode="json"), **own_eval}
    return Config.model_validate(tree)


def start_rl_run(cfg: Config, resume, accelerator) -> tuple[Config, Path, Path | None]:
    """``setup.start_run`` for an RL run (mask or answer RL): a new run with ``rl.init_from`` adopts its parent, and
    every process then reads the config the main process wrote. Returns (config, run folder, checkpoint or None)."""
    cfg, run_dir, resume = start_run(cfg, resume, accelerator, adopted_config if cfg.rl.init_from else None)
    if cfg.rl.init_from and resume is None:
        adopt_parent(cfg, run_dir, accelerator.is_main_process)
        accelerator.wait_for_everyone()
        cfg = load_run_config(run_dir)
    return cfg, run_dir, resume


CURRICULUM_FILE = "curriculum.json"


# ---- curriculum: thick structures before thin ones ------------------------------------------------------------------
def thinness(sample: LoadedSample) -> float:
    """Skeleton length per foreground pixel: ~1/width, so higher = thinner = harder."""
    fg = (sample.mask * sample.fov) > 0
    area = fg.sum()
    return float(skeletonize(fg).sum() / area) if area else 0.0


def curriculum_order(train_samples, run_dir: Path, is_main: bool) -> list[int]:
    """Indices of the training samples, thick structures first. Each image is decoded once (one at a time) to
    measure it, and the measures are recorded in RUN/curriculum.json, so a resumed run decodes none for it."""
    path = run_dir / CURRICULUM_FILE
    ids = [s.id for s in records(train_samples)]
    recorded = json.loads(path.read_text()).get("thinness", {}) if path.exists() else {}
    if not set(ids) <= set(recorded):
        recorded = {s.id: thinness(s) for s in train_samples}
        if is_main:
            write_json_atomic(path, {"thinness": recorded})
    return sorted(range(len(ids)), key=lambda i: recorded[ids[i]])


class CurriculumBatchSampler:
    """Keys for step s drawn from the easiest fraction of images, the pool growing linearly to all images at 70 % of
    training. A pure function of (seed, step), so resume is exact."""

    def __init__(self, order: list[int], patches_per_image: int, global_batch: int, seed: int, start_step: int,
                 max_steps: int, rank: int, world: int):
        if global_batch % world:
            raise ConfigError(f"data.batch_size {global_batch} must be a multiple of the {world} processes")
        self.order, self.ppi, self.batch = order, patches_per_image, global_batch
        self.seed, self.step, self.max_steps, self.rank, self.world = seed, start_step, max_steps, rank, world

    def __iter__(self):
        n = len(self.order)
        while True:
            frac = min(1.0, 0.3 + 0.7 * self.step / max(1.0, 0.7 * self.max_steps))
            pool = np.array(self.order[: max(1, math.ceil(frac * n))])
            rng = np.random.default_rng([self.seed, self.step, 7])
            images = rng.choice(pool, size=self.batch)
            patch = rng.integers(0, max(1, self.ppi), size=self.batch)
            keys = [(int(i + n * k), self.step) for i, k in zip(images, patch)]
            yield keys[self.rank::self.world]
            self.step += 1


# ---- one RL loss -----------------------------------------------------------------------------------------------------
def sampling_generator(device, seed: int, step: int, rank: int) -> torch.Generator:
    """Mask samples depend on (seed, step, rank) only: a resumed run draws what the uninterrupted one drew, and
    processes draw independent noise."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step * 10_007 + rank) % 2**63)


def policy_logits(model, task: Task, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask logits, target, FOV), each [N, 1, H, W] over the batch's N targets: the task decides what a target is
    (one mask per image, or one per [SEG] of a segmenting VLM, whose policy gradient then reaches the language
    model through the [SEG] hidden state)."""
    return task.mask_targets(model(batch=batch), batch)


def rollout(model, reference, task: Task, batch: dict, cfg: Config, weights: dict[str, float],
            generator: torch.Generator | None = None):
    """Policy forward (with grad), reference forward (adapters off, no grad), G samples, rewards, advantages."""
    logits, target, fov = policy_logits(model, task, batch)
    with torch.no_grad(), reference.adapters_disabled():
        # through __call__, so mixed precision (accelerate's autocast wrapper) matches the policy's forward
        ref_logits = policy_logits(reference, task, batch)[0]
    masks = sample_group(logits, cfg.rl.group_size, cfg.rl.temperature, generator)  # [N,G,1,H,W]
    n, g = masks.shape[:2]
    flat = masks.flatten(0, 1)
    total, components = combined_reward(flat, target, fov, weights, precision_floor=cfg.rl.precision_floor,
                                        precision_floor_k=cfg.rl.precision_floor_k, group_size=g)
    rewards = total.view(n, g)
    old_logprob = group_logprob(logits.detach(), masks, fov, cfg.rl.temperature, cfg.rl.logprob_reduction)
    return {
        "logits": logits, "ref_logits": ref_logits, "masks": masks, "rewards": rewards, "target": target,
        "fov": fov, "advantages": group_advantages(rewards), "old_logprob": old_logprob,
        "components": {k: float(v.mean()) for k, v in components.items()},
    }


def rl_loss(logits, roll: dict, cfg: Config, combo: ComboLoss | None):
    """With logprob_reduction "sum" every term is per image (the per-pixel ones summed over the FOV), so kl_coef,
    entropy_coef and sft_mix weigh against the policy term as they do under "mean"."""
    reduction, fov = cfg.rl.logprob_reduction, roll["fov"]
    new_logprob = group_logprob(logits, roll["masks"], fov, cfg.rl.temperature, reduction)
    pg, clip_fraction, ratio = clipped_objective(new_logprob, roll["old_logprob"], roll["advantages"], cfg.rl.clip_eps)
    kl = bernoulli_kl(logits, roll["ref_logits"], fov, cfg.rl.temperature, reduction)
    # logged always; part of the graph only when it is part of the loss (its backward is not free)
    with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.rl.entropy_coef != 0):
        entropy = bernoulli_entropy(logits, fov, cfg.rl.temperature, reduction)
    loss = pg + cfg.rl.kl_coef * kl - cfg.rl.entropy_coef * entropy
    if combo is not None and cfg.rl.sft_mix > 0:
        sft = combo(logits, roll["target"], fov)[0]
        if reduction == "sum":  # ComboLoss is a per-pixel mean (Dice alike): scale it by the FOV pixels per image
            sft = sft * fov.sum(dim=(1, 2, 3)).mean()
        loss = loss + cfg.rl.sft_mix * sft
    stats = {"pg_loss": float(pg.detach()), "kl": float(kl.detach()), "entropy": float(entropy.detach()),
             "clip_fraction": float(clip_fraction),
             "ratio": float(ratio)}
    return loss, stats


DROPOUT_LAYERS = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
                  torch.nn.FeatureAlphaDropout)
# transformers' modules also drop functionally, in training mode only, with a float probability kept on the module
# (attention: `dropout=0.0 if not self.training else self.attention_dropout`; stochastic depth: `drop_prob`), which
# the module types above do not catch: these are the attribute names its models use
FUNCTIONAL_DROPOUT_ATTRS = ("attention_dropout", "dropout", "dropout_p", "dropout_prob", "attn_drop", "attn_dropout",
                            "drop_prob")


def disable_dropout(model: torch.nn.Module, cfg: Config) -> None:
    """The PPO ratio compares later forwards with the sampling forward of the same weights: with dropout on (the
    adapter's lora.dropout included) each forward draws its own mask and the ratio drifts with unchanged weights.
    Both RL recipes (masks, answers) call this on the built model before any forward."""
    active = [m for m in model.modules() if isinstance(m, DROPOUT_LAYERS) and m.p > 0]
    for m in active:
        m.p = 0.0
    functional = 0
    for m in model.modules():
        for attr in FUNCTIONAL_DROPOUT_ATTRS:
            value = getattr(m, attr, None)
            if isinstance(value, float) and value > 0:  # a module (nn.Dropout) under that name is handled above
                setattr(m, attr, 0.0)
                functional += 1
        config = getattr(m, "config", None)  # a few read it from the config at forward time
        if isinstance(getattr(config, "attention_dropout", None), float) and config.attention_dropout > 0:
            config.attention_dropout = 0.0
            functional += 1
    if active or functional:
        log.info("RL: dropout off in %d modules and %d functional dropout settings (lora.dropout=%s not used): "
                 "rollouts and updates must see the same policy", len(active), functional, cfg.lora.dropout)


def reward_weights(cfg: Config) -> dict[str, float]:
    for name, path in cfg.rl.custom_rewards.items():
        register_reward(name, load_reward(path))
    return resolve_weights(cfg.rl.reward)


def validate_with_reward(model, task: Task, val: list[LoadedSample], cfg: Config, device,
                         weights: dict[str, float]) -> dict[str, float]:
    """The task's validation metrics plus ``val_reward``: the run's own reward of the 0.5-thresholded prediction,
    averaged over validation targets. RL picks `best` by what it optimises, not by Dice."""
    predictions = [p for s in val for p in task.target_probabilities(model, s, cfg, device)]
    if not predictions:
        return {}
    rewards = []
    for p in predictions:
        pred = torch.from_numpy(p.prob >= 0.5).float()[None, None]
        gt = torch.from_numpy(p.mask).float()[None, None]
        fov = torch.from_numpy(p.fov).float()[None, None]
        total, _ = combined_reward(pred, gt, fov, weights, precision_floor=cfg.rl.precision_floor,
                                   precision_floor_k=cfg.rl.precision_floor_k)
        rewards.append(float(total[0]))
    return {**pooled_validation(predictions), "val_reward": float(np.mean(rewards))}


# ---- the recipe ------------------------------------------------------------------------------------------------------
def train(cfg: Config, resume: str | Path | None = None) -> Path:
    """`resume`: a run folder to continue, or "auto" to start or continue output_dir/run.name (setup.start_run)."""
    accelerator = make_accelerator(cfg)
    with training_session(accelerator) as stop:  # SIGTERM-safe from here; handler and trackers released on any exit
        return _train(cfg, resume, accelerator, stop)


def _train(cfg: Config, resume: str | Path | None, accelerator, stop: StopFlag) -> Path:
    cfg, run_dir, resume = start_rl_run(cfg, resume, accelerator)  # resume: the checkpoint to continue, or None
    is_main, device = accelerator.is_main_process, accelerator.device
    set_seed(cfg.run.seed)
    init_trackers(accelerator, cfg, run_dir)
    weights = reward_weights(cfg)

    # ---- data
    data = prepare_split(cfg, run_dir, is_main, accelerator.wait_for_everyone)
    train_samples = load_split_samples(cfg, data, "train", run_dir, lazy=True)  # decoded in the loader's workers
    # validation decodes its images each time it runs: memory between validations does not grow with the split
    val_samples = load_split_samples(cfg, data, "val", run_dir, limit=cfg.train.max_eval_images, lazy=True)
    check_readable(cfg, data, ("val", "test"), run_dir)
    task = task_for(cfg)
    if task.mask_targets is None:
        raise UserError(f"objective: rl samples masks; task {task.name!r} produces none (for answers use the "
                         "instruct task's GRPO)")
    order = curriculum_order(train_samples, run_dir, is_main) if cfg.rl.curriculum else None

    def batches(start_step: int):
        if order is not None:
            sampler = CurriculumBatchSampler(order, cfg.data.patches_per_image, cfg.data.batch_size, cfg.run.seed,
                                             start_step, cfg.optim.max_steps, accelerator.process_index,
                                             accelerator.num_processes)
        else:
            sampler = StepBatchSampler(len(dataset), cfg.data.batch_size, cfg.run.seed, start_step,
                                       accelerator.process_index, accelerator.num_processes)
        return iter(DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                               collate_fn=collate_for(task, dataset), generator=torch.Generator()))

    # ---- policy = base (or parent) + fresh LoRA; reference = the same model with adapters disabled
    if cfg.finetune_mode() != "lora":
        raise ConfigError("objective: rl needs finetune: lora (the KL reference is the model with adapters disabled); "
                          "set model.path or rl.init_from to a pretrained model")
    model = build_run_model(cfg).to(device)  # as every later load builds it
    disable_dropout(model, cfg)
    dataset = task.train_dataset(train_samples, cfg, model)
    combo = ComboLoss(cfg.loss) if cfg.rl.sft_mix > 0 else None
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = resume_state(resume, model, optimizer, scheduler, accelerator)
    reference = accelerator.unwrap_model(model)

    # ---- preflight: a sampled mask is not differentiable; the gradient must come through the log-probs
    if cfg.train.preflight and resume is None:
        fixed = batch_to(next(batches(0)), device)
        fixed_roll = rollout(model, reference, task, fixed, cfg, weights,
                             sampling_generator(device, cfg.run.seed, -1, accelerator.process_index))

        def preflight_loss():
            return rl_loss(policy_logits(model, task, fixed)[0], fixed_roll, cfg, combo)[0]

        report = run_preflight(model, optimizer, preflight_loss, backward=accelerator.backward,
                               steps=cfg.train.preflight_steps)
        if is_main:
            (run_dir / "preflight.json").write_text(json.dumps(report.to_dict(), indent=2))

    # ---- loop: one iteration = one rollout + inner_epochs clipped updates
    stream = batches(state.step)
    books = Bookkeeping(accelerator, cfg, run_dir, model, optimizer, scheduler, state, resume is not None,
                        validate=lambda m: validate_with_reward(m, task, val_samples, cfg, device, weights),
                        select=selection(cfg, task), stop=stop)
    completed = True
    while state.step < cfg.optim.max_steps:
        model.train()
        batch = batch_to(next(stream), device)
        n_images = images_in(batch)
        with books.counting_flops(n_images):  # the whole iteration: rollout + inner_epochs updates
            roll = rollout(model, reference, task, batch, cfg, weights,
                           sampling_generator(device, cfg.run.seed, state.step, accelerator.process_index))
            logits = roll["logits"]
            skipped = 0
            for epoch in range(cfg.rl.inner_epochs):
                if epoch > 0:  # later epochs see the updated policy; the first reuses the sampling forward
                    logits = policy_logits(model, task, batch)[0]
                loss, stats = rl_loss(logits, roll, cfg, combo)
                accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm or float("inf"))
                if epoch == 0:
                    books.watch_gradients()  # a trainable part that stopped reaching the loss: warn
                global_loss = accelerator.reduce(loss.detach(), reduction="mean")
                allowed = books.update_allowed(global_loss, grad_norm)
                skipped += not allowed
                if allowed or accelerator.scaler is not None:
                    optimizer.step()  # fp16: the loss scaler skips an inf step itself
                optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.step += 1
        books.count_images(n_images)
        rewards = roll["rewards"]
        record = {"loss": float(global_loss), "skipped_updates": skipped, **stats, "reward_mean": float(rewards.mean()),
                  "reward_std": float(rewards.std(dim=1).mean()),
                  **{f"reward_{k}": v for k, v in roll["components"].items()}}
        if books.after_step(record):
            completed = False
            break
    books.finish(completed)
    return run_dir
