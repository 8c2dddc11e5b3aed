"""`medtune demo`: the real use case in miniature, on embedded procedural data (no downloads, no user data).

1. a base U-Net is trained from scratch on site A (synthetic retina-like vessel images);
2. it is exported as a plain model folder, the way a user holds a pretrained model on disk;
3. on site B (other colour balance, contrast, noise, thinner vessels) the base is measured, then LoRA-fine-tuned,
   calibrated on B's validation split and measured again on B's test split: before/after Dice.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from medtune.config import build_config
from medtune.evaluate import evaluate_model, evaluate_run, format_summary
from medtune.models.lora import export_merged
from medtune.models.registry import build_model
from medtune.runs.load import default_device, load_run_model
from medtune.train.sft import train


def _cfg(name: str, out: Path, domain: str, steps: int, extra: list[str]):
    return build_config({}, [
        f"run.name={name}", f"run.output_dir={out}", "run.seed=0",
        "data.layout=synthetic", f"data.path={out / 'data'}", f"data.synthetic.domain={domain}",
        "data.synthetic.n_images=24", "data.synthetic.size=128", "data.patch_size=64", "data.batch_size=8",
        "data.split.val_fraction=0.17", "data.split.test_fraction=0.25",
        f"optim.max_steps={steps}", f"train.eval_every={max(steps // 4, 1)}", f"train.save_every={steps}",
        "train.log_every=10", "eval.bootstrap=200", *extra,
    ])


def run_demo(out: Path, fast: bool = False) -> dict:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    base_steps, lora_steps = (40, 30) if fast else (400, 200)

    print(f"[1/4] base U-Net trained from scratch on site A ({base_steps} steps)")
    base_cfg = _cfg("base-siteA", out, "A", base_steps, ["optim.lr=3e-3", "optim.warmup_steps=20"])
    base_run = train(base_cfg)
    base_on_a = evaluate_run(base_run)

    print("[2/4] exporting the base as a plain model folder (what a user holds on disk)")
    base_model_dir = out / "base-model"
    _, base_model, _ = load_run_model(base_run, "best", "cpu")
    export_merged(base_model, base_model_dir)

    print("[3/4] LoRA fine-tuning the base on site B")
    lora_cfg = _cfg("lora-siteB", out, "B", lora_steps,
                    [f"model.path={base_model_dir}", "model.finetune=lora", "lora.preset=small",
                     "optim.lr=3e-3", "optim.warmup_steps=10"])
    lora_run = train(lora_cfg)

    print("[4/4] before / after on site B's test split (threshold calibrated on B's val split)")
    # Before = the same LoRA model with adapters at their initial zero update, i.e. exactly the base model,
    # measured by the same protocol on the same split.
    device = default_device()
    before_model = build_model(lora_cfg).to(device).eval()
    before, *_ = evaluate_model(before_model, lora_cfg, lora_run, "test", device, checkpoint_name="base (no LoRA)")
    after = evaluate_run(lora_run)
    print(format_summary(after))
    result = {
        "base_on_siteA_dice": base_on_a["pooled@cal"]["dice"],
        "base_on_siteB_dice": before["pooled@cal"]["dice"],
        "lora_on_siteB_dice": after["pooled@cal"]["dice"],
        "runs": {"base": str(base_run), "lora": str(lora_run)},
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    print("\nmedtune demo: adapting a vessel model to a new site with LoRA (pooled Dice inside the FOV, test split)")
    print(f"  base model on site A (where it was trained): {result['base_on_siteA_dice']:.4f}")
    print(f"  base model on site B, before LoRA:           {result['base_on_siteB_dice']:.4f}")
    print(f"  after LoRA fine-tuning on site B:            {result['lora_on_siteB_dice']:.4f}")
    print(f"  runs: {base_run}  {lora_run}   ({result['seconds']} s)")
    return result
