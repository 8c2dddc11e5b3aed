"""RL recipe for instruction-tuned VLMs (``objective: rl`` with task instruct): GRPO on sampled answers.

Read it top to bottom: run folder (+ the supervised parent, ``rl.init_from``) -> data -> policy = parent + fresh
LoRA, reference = the same model with adapters disabled -> preflight -> loop. One iteration: G answers sampled per
prompt (temperature ``rl.temperature``, no top-k/top-p, seeded by (seed, step, rank) so a resumed run samples what
the uninterrupted one did) -> rewards (correct label, well-formed answer) -> group-relative advantages -> the
reference's token log-probs -> ``rl.inner_epochs`` clipped updates (the first defines the "old" log-probs, so it is
exactly on-policy) with the k3 KL to the reference and an optional entropy bonus.

Why the project's own pieces and not TRL's GRPOTrainer: TRL's trainer is built on transformers' Trainer, which owns
the loop, checkpoints and resume; medtune's run folder, preflight, exact resume, SIGTERM handling and reports would
all have to be rebuilt around it. What is taken from TRL (1.16) is its loss, made explicit in ``text_policy``: token
log-probs at the sampling temperature, the k3 KL estimator against the adapters-disabled model, token-level
normalisation by the global number of active tokens ("dapo"), group-std advantage scaling, completions masked after
their first stop token.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset

from medtune.answers import answer_rewards, answer_vocabulary, resolve_answer_weights
from medtune.config import Config
from medtune.data.datasets import StepBatchSampler
from medtune.data.loading import records
from medtune.data.run_split import check_readable, load_split_samples, prepare_split
from medtune.data.types import LoadedSample
from medtune.errors import UserError
from medtune.models.registry import build_run_model
from medtune.models.vlm.logits import LOGITS_AT
from medtune.models.vlm.model import DEFAULT_SEQUENCE_KEYS, SEQUENCE_KEYS, ChatCodec, collate
from medtune.models.vlm.processing import to_pil
from medtune.policy import group_advantages
from medtune.tasks import selection, task_for
from medtune.tasks.instruct import reference_label, require_conversations, resolve_labels
from medtune.text_policy import clipped_token_loss, completion_mask, token_entropy, token_kl, token_logprobs
from medtune.train.loop import Bookkeeping
from medtune.train.preflight import run_preflight
from medtune.train.rl import disable_dropout, sampling_generator, start_rl_run
from medtune.train.setup import (
    StopFlag,
    batch_to,
    init_trackers,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    resume_state,
    training_session,
)

log = logging.getLogger("medtune")


class PromptDataset(Dataset):
    """The generation prompt of each training conversation's last answer (keys may be ``(index, epoch)``)."""

    def __init__(self, samples: Sequence[LoadedSample], codec: ChatCodec):
        require_conversations(records(samples))  # decoded on access, in the loader's workers
        self.samples, self.codec = samples, codec

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> dict:
        s = self.samples[key[0] if isinstance(key, (tuple, list)) else key]
        return self.codec.encode(s.conversations, to_pil(s.image), s.id, for_generation=True)


def check_supported(cfg: Config) -> None:
    unsupported = [(cfg.rl.sft_mix > 0, "rl.sft_mix"), (cfg.rl.curriculum, "rl.curriculum")]
    named = [name for bad, name in unsupported if bad]
    if named:
        raise UserError(f"{', '.join(named)} is not supported by GRPO on answers (task instruct); set it to its "
                         "default")


def answer_weights(cfg: Config) -> dict[str, float]:
    # rl.reward left at its default names a mask preset: answers get the answer preset instead
    return resolve_answer_weights(cfg.rl.reward if "reward" in cfg.rl.model_fields_set else "answer")


def _normaliser(mask: torch.Tensor) -> torch.Tensor:
    """Active tokens in the global batch / processes (see text_policy)."""
    import torch.distributed as dist

    n = mask.sum().detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return n


def completion_logits(model, prompts: dict, completions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits [N, Tc, V] that predict each completion token (prompt + completion in one forward),
    computed at those Tc positions only. The batch's sequence keys (``collate``) are extended by the completion:
    its ids, its mask as attention, token types 0 (the answer is text); labels are dropped (no LM loss here)."""
    full = {k: v for k, v in prompts.items() if k != "labels"}
    for key in prompts.get(SEQUENCE_KEYS, DEFAULT_SEQUENCE_KEYS):
        if key == "labels" or key not in prompts:
            continue
        value = prompts[key]
        tail = completions if key == "input_ids" else mask if key == "attention_mask" else torch.zeros_like(completions)
        full[key] = torch.cat([value, tail.to(value.dtype)], dim=1)
    t_prompt = prompts["input_ids"].shape[1]
    # left-padded prompts all end at t_prompt: position t_prompt - 1 + i predicts completion token i
    full[LOGITS_AT] = torch.arange(t_prompt - 1, t_prompt - 1 + completions.shape[1], device=completions.device)
    return model(batch=full).token_logits


def rollout(policy, prompts: dict, references: list[str | None], cfg: Config, vocab: dict[str, str],
            weights: dict[str, float], seed: int) -> dict:
    """Sample G answers per prompt (``prompts`` holds each prompt G times in a row), score them, and take the
    reference model's token log-probs."""
    codec = policy.text_codec()
    was_training = policy.training
    policy.eval()
    with torch.random.fork_rng(devices=[prompts["input_ids"].device] if prompts["input_ids"].is_cuda else []):
        torch.manual_seed(seed)
        completions = policy.generate(prompts, cfg.task.max_new_tokens, do_sample=True,
                                      temperature=cfg.rl.temperature)
    policy.train(was_training)
    mask, finished = completion_mask(completions, codec.stop_ids)
    # generate() pads finished answers with the pad token, which is never sampled (log-prob -inf): put a stop token
    # there instead (those positions are masked out of the loss and the attention either way)
    completions = torch.where(mask > 0, completions, torch.full_like(completions, codec.stop_ids[0]))
    answers = [codec.decode(row[m > 0]) for row, m in zip(completions, mask)]
    totals, components = answer_rewards(answers, finished.tolist(), references, vocab, weights)
    g = cfg.rl.group_size
    rewards = torch.tensor(totals, dtype=torch.float32, device=completions.device).view(-1, g)
    with torch.no_grad(), policy.adapters_disabled():
        ref = token_logprobs(completion_logits(policy, prompts, completions, mask), completions, cfg.rl.temperature,
                             codec.suppress_ids)
    return {"completions": completions, "mask": mask, "rewards": rewards, "suppress_ids": codec.suppress_ids,
            "advantages": group_advantages(rewards).flatten(), "ref_logprob": ref, "answers": answers,
            "components": {k: sum(v) / max(len(v), 1) for k, v in components.items()},
            "finished": float(finished.float().mean())}


def grpo_loss(model, prompts: dict, roll: dict, cfg: Config, old: torch.Tensor | None = None,
              advantages: torch.Tensor | None = None):
    """(loss, new token log-probs, stats) for one clipped update; ``old`` None = on-policy (old = new, detached)."""
    suppress = roll["suppress_ids"]
    logits = completion_logits(model, prompts, roll["completions"], roll["mask"])
    new = token_logprobs(logits, roll["completions"], cfg.rl.temperature, suppress)
    old = new.detach() if old is None else old
    mask, norm = roll["mask"], _normaliser(roll["mask"])
    adv = roll["advantages"] if advantages is None else advantages
    pg, clip_fraction, ratio = clipped_token_loss(new, old, adv, mask, cfg.rl.clip_eps, norm)
    kl = token_kl(new, roll["ref_logprob"], mask, norm)
    loss = pg + cfg.rl.kl_coef * kl
    entropy = None
    if cfg.rl.entropy_coef > 0:
        entropy = token_entropy(logits, mask, cfg.rl.temperature, norm, suppress)
        loss = loss - cfg.rl.entropy_coef * entropy
    stats = {"pg_loss": float(pg.detach()), "kl": float(kl.detach()), "clip_fraction": float(clip_fraction),
             "ratio": float(ratio)}
    if entropy is not None:
        stats["entropy"] = float(entropy.detach())
    return loss, new, stats


def train(cfg: Config, resume: str | Path | None = None) -> Path:
    """`resume`: a run folder to continue, or "auto" to start or continue output_dir/run.name (setup.start_run)."""
    accelerator = make_accelerator(cfg)
    with training_session(accelerator) as stop:  # SIGTERM-safe from here; handler and trackers released on any exit
        return _train(cfg, resume, accelerator, stop)


def _train(cfg: Config, resume: str | Path | None, accelerator, stop: StopFlag) -> Path:
    # the parent's task (labels, synonyms) comes with rl.init_from; resume: the checkpoint to continue, or None
    cfg, run_dir, resume = start_rl_run(cfg, resume, accelerator)
    is_main, device = accelerator.is_main_process, accelerator.device
    check_supported(cfg)
    set_seed(cfg.run.seed)
    init_trackers(accelerator, cfg, run_dir)
    weights = answer_weights(cfg)

    # ---- data: prompts of the training conversations, each repeated G times in a row
    data = prepare_split(cfg, run_dir, is_main)
    train_samples = load_split_samples(cfg, data, "train", run_dir, lazy=True)  # decoded in the loader's workers
    # validation decodes its images each time it runs: memory between validations does not grow with the split
    val_samples = load_split_samples(cfg, data, "val", run_dir, limit=cfg.train.max_eval_images, lazy=True)
    check_readable(cfg, data, ("val", "test"), run_dir)
    task = task_for(cfg)
    labels = resolve_labels(cfg, list(data.samples.values()))
    vocab = answer_vocabulary(labels, cfg.task.synonyms)
    references = {s.id: reference_label(s, vocab, labels) for s in records(train_samples)}
    g = cfg.rl.group_size

    # ---- policy = base (or parent) + fresh LoRA; reference = the same model with adapters disabled
    if cfg.finetune_mode() != "lora":
        raise UserError("objective: rl needs finetune: lora (the KL reference is the model with adapters disabled); "
                         "set rl.init_from to a supervised run or model.path to a pretrained VLM")
    model = build_run_model(cfg).to(device)  # as every later load builds it
    disable_dropout(model, cfg)  # as the mask recipe: sampled in eval mode, updated in train mode
    dataset = PromptDataset(train_samples, model.text_codec())

    def batches(start_step: int):
        sampler = StepBatchSampler(len(dataset), cfg.data.batch_size, cfg.run.seed, start_step,
                                   accelerator.process_index, accelerator.num_processes)
        return iter(DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                               collate_fn=lambda items: collate([it for it in items for _ in range(g)], "left"),
                               generator=torch.Generator()))

    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = resume_state(resume, model, optimizer, scheduler, accelerator)
    policy = accelerator.unwrap_model(model)

    def sample_seed(step: int) -> int:
        return int(sampling_generator("cpu", cfg.run.seed, step, accelerator.process_index).initial_seed())

    # ---- preflight: a sampled answer is not differentiable; the gradient must come through its token log-probs.
    # With all answers of a group scored alike the advantages are 0 (and KL's gradient is 0 at the start), so the
    # path is proven with fixed +-1 advantages.
    if cfg.train.preflight and resume is None:
        fixed = batch_to(next(batches(0)), device)
        fixed_roll = rollout(policy, fixed, [references[i] for i in fixed["ids"]], cfg, vocab, weights,
                             sample_seed(-1))
        probe = torch.tensor([1.0, -1.0], device=device).repeat(len(fixed["ids"]))[:len(fixed["ids"])]
        report = run_preflight(model, optimizer, lambda: grpo_loss(model, fixed, fixed_roll, cfg, advantages=probe)[0],
                               backward=accelerator.backward, steps=cfg.train.preflight_steps)
        if is_main:
            (run_dir / "preflight.json").write_text(json.dumps(report.to_dict(), indent=2))

    # ---- loop: one iteration = one rollout + inner_epochs clipped updates
    stream = batches(state.step)
    books = Bookkeeping(accelerator, cfg, run_dir, model, optimizer, scheduler, state, resume is not None,
                        validate=lambda m: task.validate(m, val_samples, cfg, device) if val_samples else {},
                        select=selection(cfg, task), stop=stop)
    completed = True
    while state.step < cfg.optim.max_steps:
        model.train()
        batch = batch_to(next(stream), device)
        with books.counting_flops(len(batch["ids"]) // g):  # the whole iteration: generation + updates
            roll = rollout(policy, batch, [references[i] for i in batch["ids"]], cfg, vocab, weights,
                           sample_seed(state.step))
            old, skipped = None, 0
            for _ in range(cfg.rl.inner_epochs):
                loss, new, stats = grpo_loss(model, batch, roll, cfg, old)
                old = new.detach() if old is None else old
                accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm or float("inf"))
                global_loss = accelerator.reduce(loss.detach(), reduction="mean")
                allowed = books.update_allowed(global_loss, grad_norm)
                skipped += not allowed
                if allowed or accelerator.scaler is not None:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.step += 1
        books.count_images(len(batch["ids"]) // g)
        rewards = roll["rewards"]
        record = {"loss": float(global_loss), "skipped_updates": skipped, **stats,
                  "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(dim=1).mean()),
                  "answers_finished": roll["finished"],
                  "answer_tokens": float(roll["mask"].sum(dim=1).mean()),
                  **{f"reward_{k}": v for k, v in roll["components"].items()}}
        if books.after_step(record):
            completed = False
            break
    books.finish(completed)
    return run_dir
