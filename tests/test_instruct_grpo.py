"""GRPO on answers (task instruct): with the weights held fixed, the policy that updates is the policy that sampled."""
from __future__ import annotations

import json

import pytest
import torch
from vlm_helpers import instruct_cfg, write_vqa

from medtune.runs.files import read_metrics

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

DROPOUT = 0.5
TRAINED_LORA_B = 0.3  # a fresh adapter (LoRA-B = 0) would hide any dropout on its input


def test_grpo_ratio_is_exactly_one_and_weights_unchanged_with_dropout_configured(tmp_path, monkeypatch):
    """lr 0, lora.dropout 0.5 and attention dropout 0.5 in the language model's config: answers are sampled in eval
    mode and updated in train mode, so every dropout must be off for the second inner epoch's log-probs to equal the
    first's (ratio exactly 1). Measured before the fix: ratio 1.114."""
    import medtune.train.rl_answers as rl_answers
    from medtune.models.vlm.tiny import save_tiny_vlm

    data = write_vqa(tmp_path / "data", n=8)
    base = save_tiny_vlm(tmp_path / "base", "llava", seed=0, overrides={"text_config": {"attention_dropout": DROPOUT}})
    assert json.loads((base / "config.json").read_text())["text_config"]["attention_dropout"] == DROPOUT
    build = rl_answers.build_run_model
    built = {}

    def build_with_trained_adapter(cfg):
        model = build(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(TRAINED_LORA_B)
        built["model"] = model
        built["start"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    monkeypatch.setattr(rl_answers, "build_run_model", build_with_trained_adapter)
    cfg = instruct_cfg(tmp_path, "objective=rl", f"lora.dropout={DROPOUT}", "optim.lr=0", "rl.group_size=2",
                       "rl.inner_epochs=2", "train.preflight=false", "data.batch_size=2", "rl.kl_coef=0.1",
                       data=data, model=base, steps=3, name="grpo")
    run = rl_answers.train(cfg)
    ratios = [r["ratio"] for r in read_metrics(run) if "ratio" in r]
    assert ratios == [1.0, 1.0, 1.0]
    model = built["model"]
    assert any("lora_B" in n for n in built["start"])
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), built["start"][name]), name
