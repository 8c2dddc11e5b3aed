"""RL on masks: a toy problem with a known optimum, the KL pull, the reference path, and the recipe end to end."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_cfg
from peft import LoraConfig, get_peft_model
from torch import nn

from medtune.config import build_config
from medtune.models.base import SegModel
from medtune.policy import group_logprob
from medtune.runs.files import read_metrics
from medtune.tasks.masks import TASK as MASKS
from medtune.train.rl import rl_loss, rollout


class ToySeg(SegModel):
    """One 3x3 conv: the optimum (reward 1) is a sharp identity filter on an image that equals the mask."""

    family = "toy"

    def __init__(self):
        conv = nn.Conv2d(1, 1, 3, padding=1)
        super().__init__(get_peft_model(nn.Sequential(conv), LoraConfig(r=2, lora_alpha=4, target_modules=["0"],
                                                                         lora_dropout=0.0)), 1)

    def forward_logits(self, image, box=None):
        return self.net(image)


def toy_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(4, 1, 12, 12, generator=g) > 0.7).float()
    return {"image": mask * 2 - 1, "mask": mask, "fov": torch.ones_like(mask), "box": torch.zeros(4, 4)}


def run_toy(kl_coef: float, steps: int = 60, seed: int = 0):
    torch.manual_seed(seed)
    model = ToySeg()
    cfg = build_config({}, ["rl.reward=dice", "rl.group_size=8", f"rl.kl_coef={kl_coef}", "rl.inner_epochs=2"])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    batch = toy_batch()
    history = []
    for _ in range(steps):
        roll = rollout(model, model, MASKS, batch, cfg, {"dice": 1.0})
        logits = roll["logits"]
        for epoch in range(cfg.rl.inner_epochs):
            if epoch:
                logits = model(batch["image"])
            loss, stats = rl_loss(logits, roll, cfg, None)
            opt.zero_grad()
            loss.backward()
            opt.step()
        history.append((float(roll["rewards"].mean()), stats["kl"]))
    return history


def test_rl_alone_raises_reward_on_a_toy_problem():
    history = run_toy(kl_coef=0.0)
    start = sum(r for r, _ in history[:5]) / 5
    end = sum(r for r, _ in history[-5:]) / 5
    # measured (seed 0): mean reward 0.44 over the first 5 iterations -> 1.00 over the last 5 (60 iterations)
    assert start < 0.5
    assert end > 0.85 and end - start > 0.4, (start, end)


def test_large_kl_weight_pulls_toward_the_reference():
    free = run_toy(kl_coef=0.0)
    anchored = run_toy(kl_coef=20.0)
    kl_free, kl_anchored = free[-1][1], anchored[-1][1]
    reward_free, reward_anchored = free[-1][0], anchored[-1][0]
    # measured (seed 0): KL 0.81 without the term, 4e-6 with weight 20; reward 1.00 vs 0.35
    assert kl_anchored < 0.01 * kl_free, (kl_anchored, kl_free)
    assert reward_anchored < reward_free


def test_reference_runs_with_adapters_disabled_and_leaves_no_gradient():
    torch.manual_seed(0)
    model = ToySeg()
    with torch.no_grad():  # give LoRA-B a value so adapted != reference
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.5)
    batch = toy_batch()
    cfg = build_config({}, ["rl.reward=dice", "rl.kl_coef=1.0"])
    roll = rollout(model, model, MASKS, batch, cfg, {"dice": 1.0})
    base_conv = model.net.get_base_model()[0].base_layer
    with torch.no_grad():
        expected = nn.functional.conv2d(batch["image"], base_conv.weight, base_conv.bias, padding=1)
    assert torch.allclose(roll["ref_logits"], expected, atol=1e-6)
    assert not torch.allclose(roll["logits"], roll["ref_logits"])
    assert not roll["ref_logits"].requires_grad and roll["ref_logits"].grad_fn is None
    loss, _ = rl_loss(roll["logits"], roll, cfg, None)
    loss.backward()
    assert base_conv.weight.grad is None  # the frozen base received nothing, neither from the policy nor the KL


def test_sum_reduction_scales_every_term_like_the_policy_term():
    """logprob_reduction: sum multiplies the policy gradient by the pixel count N; KL, entropy and the ComboLoss mix
    must scale the same way, so that kl_coef / entropy_coef / sft_mix mean the same under both reductions."""
    from medtune.losses import ComboLoss

    torch.manual_seed(0)
    batch = toy_batch()
    n_pixels = batch["fov"][0].sum()  # every image has the same FOV size, so "sum" = N x "mean" exactly
    start, ref_logits = torch.randn(4, 1, 12, 12), torch.randn(4, 1, 12, 12)
    masks = torch.bernoulli(torch.sigmoid(start).unsqueeze(1).expand(-1, 8, -1, -1, -1))
    advantages = torch.randn(4, 8)
    grads = {}
    for reduction in ("mean", "sum"):
        cfg = build_config({}, [f"rl.logprob_reduction={reduction}", "rl.kl_coef=0.3", "rl.entropy_coef=0.1",
                                "rl.sft_mix=0.5"])
        logits = start.clone().requires_grad_(True)
        roll = {"masks": masks, "ref_logits": ref_logits, "advantages": advantages, "fov": batch["fov"],
                "target": batch["mask"],
                "old_logprob": group_logprob(start, masks, batch["fov"], reduction=reduction)}  # ratio 1
        loss, _ = rl_loss(logits, roll, cfg, ComboLoss(cfg.loss))
        loss.backward()
        grads[reduction] = logits.grad
    assert torch.allclose(grads["sum"], n_pixels * grads["mean"], rtol=1e-4, atol=1e-7)


def test_rl_policy_ratio_is_exactly_one_while_the_weights_do_not_change(tmp_path, monkeypatch):
    """lr 0 and a trained-looking adapter (LoRA-B != 0, lora.dropout 0.5): the second inner epoch's forward must give
    the sampling forward's log-probs exactly; with adapter dropout on, each forward would draw its own mask."""
    import medtune.train.rl as rl

    build = rl.build_run_model

    def build_with_trained_adapter(cfg):
        model = build(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.3)  # a fresh adapter (B = 0) would hide any dropout on its input
        return model

    monkeypatch.setattr(rl, "build_run_model", build_with_trained_adapter)
    cfg = tiny_cfg(tmp_path, "objective=rl", "model.finetune=lora", "lora.r=4", "lora.dropout=0.5", "optim.lr=0",
                   "rl.group_size=2", "rl.inner_epochs=2", "train.preflight=false", "train.eval_every=100",
                   "data.batch_size=2", steps=3, name="rl")
    run = rl.train(cfg)
    ratios = [r["ratio"] for r in read_metrics(run) if "ratio" in r]
    assert ratios == [1.0, 1.0, 1.0]


@pytest.mark.slow
@pytest.mark.ci
def test_rl_recipe_from_a_supervised_parent(tmp_path):
    from medtune.evaluate import evaluate_run
    from medtune.report.compare import compare_runs
    from medtune.runs.files import load_run_config
    from medtune.train.rl import train as train_rl
    from medtune.train.sft import train as train_sft

    parent = train_sft(tiny_cfg(tmp_path, "eval.tta=true", "eval.overlap=0.5", steps=4, name="parent"))
    cfg = build_config({}, [
        "objective=rl", "run.name=rl", f"run.output_dir={tmp_path / 'runs'}", f"rl.init_from={parent}",
        "rl.group_size=4", "rl.reward=recall_focused", "optim.max_steps=4", "optim.warmup_steps=1",
        "train.eval_every=2", "train.save_every=4", "train.log_every=1", "train.trackers=[]", "lora.r=4",
        "data.batch_size=2", "eval.bootstrap=20",
    ])
    run = train_rl(cfg)
    assert json.loads((run / "parent.json").read_text())["parent_run"] == str(parent)
    assert json.loads((run / "split.json").read_text()) == json.loads((parent / "split.json").read_text())
    assert json.loads((run / "preflight.json").read_text())["passed"]
    records = [r for r in read_metrics(run) if "reward_mean" in r]
    assert len(records) == 4 and {"kl", "clip_fraction", "entropy", "reward_recall"} <= set(records[0])
    # the parent's evaluation settings, with what the RL config set explicitly on top
    adopted = load_run_config(run).eval
    assert (adopted.tta, adopted.overlap, adopted.roi_size, adopted.bootstrap) == (True, 0.5, 32, 20)
    # `best` is chosen by what RL optimises (its reward on validation), not by Dice
    validations = [r for r in read_metrics(run) if "val_reward" in r]
    assert len(validations) == 2 and "val_dice" in validations[0]
    best = json.loads((run / "checkpoints" / "best" / "meta.json").read_text())
    assert best["val_reward"] == max(r["val_reward"] for r in validations)
    assert evaluate_run(run)["n_images"] == 2
    evaluate_run(parent)
    assert "paired over 2 common image(s)" in compare_runs([parent, run])  # evaluated alike: no refusal


def test_selection_metric_follows_the_objective_unless_configured():
    from medtune.tasks import selection, task_for

    supervised = build_config({}, [])
    rl = build_config({}, ["objective=rl"])
    assert selection(supervised, task_for(supervised)) == ("val_dice", True)
    assert selection(rl, task_for(rl)) == ("val_reward", True)
    chosen = build_config({}, ["objective=rl", "train.selection_metric=val_auc"])
    assert selection(chosen, task_for(chosen)) == ("val_auc", True)
    lower = build_config({}, ["train.selection_metric=val_loss", "train.selection_mode=min"])
    assert selection(lower, task_for(lower)) == ("val_loss", False)


def test_reference_context_keeps_sam_trainable_set():
    """PEFT's disable_adapter() re-enables every modules_to_save parameter on exit; SAM keeps some frozen by design."""
    import json

    from medtune.models.registry import build_model
    from medtune.models.sam import tiny_sam_config_dict

    cfg = build_config({}, ["model.family=sam", f"model.config={json.dumps(tiny_sam_config_dict())}",
                            "model.finetune=lora"])
    model = build_model(cfg)
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad(), model.adapters_disabled():
        model(torch.rand(1, 3, 32, 32))
    after = {n for n, p in model.named_parameters() if p.requires_grad}
    assert after == before and not any("iou_prediction_head" in n for n in after)


@pytest.mark.slow
@pytest.mark.ci
def test_rl_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Resuming from step 3 gives the same sampled masks, rewards and losses for steps 4..6 (sampling RNG is a
    function of seed, step and rank; creating a DataLoader iterator does not consume the restored global RNG)."""
    import shutil

    from medtune.train.rl import train as train_rl
    from medtune.train.sft import train as train_sft

    parent = train_sft(tiny_cfg(tmp_path, steps=3, name="parent"))
    cfg = build_config({}, [
        "objective=rl", "run.name=rl", f"run.output_dir={tmp_path / 'runs'}", f"rl.init_from={parent}",
        "rl.group_size=4", "optim.max_steps=6", "optim.warmup_steps=1", "train.eval_every=100",
        "train.save_every=3", "train.keep_last=5", "train.log_every=1", "train.trackers=[]", "lora.r=4",
        "data.batch_size=2",
    ])
    full = train_rl(cfg)
    resumed = tmp_path / "runs" / "rl-resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "last")
    shutil.copytree(full / "checkpoints" / "step-3", resumed / "checkpoints" / "last")
    train_rl(cfg, resume=resumed)
    keys = ("loss", "reward_mean", "kl", "pg_loss")
    expected = [r[k] for r in read_metrics(full) if "reward_mean" in r for k in keys]
    got = [r[k] for r in read_metrics(resumed) if "reward_mean" in r for k in keys]
    assert [r["step"] for r in read_metrics(resumed) if "reward_mean" in r] == [1, 2, 3, 4, 5, 6]
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
