"""GPU checks of the recipes themselves (not a test; needs CUDA + bitsandbytes):
1. bf16 through the supervised recipe for a tiny U-Net and a tiny box-prompted SAM (preflight, training, eval);
2. QLoRA through the recipe: a tiny SAM saved with save_pretrained, loaded as a 4-bit NF4 base, LoRA trained in bf16,
   the adapter saved in PEFT format and reloaded by evaluation onto a freshly quantised base.

    python bench/gpu_recipes.py
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    from helpers import tiny_cfg
    from transformers import SamModel

    from medtune.evaluate import evaluate_run
    from medtune.models.sam import tiny_sam_config, tiny_sam_config_dict
    from medtune.train.sft import train

    tmp = Path(tempfile.mkdtemp())
    run = train(tiny_cfg(tmp, "train.mixed_precision=bf16", steps=20, name="unet-bf16"))
    print("unet bf16: preflight", json.loads((run / "preflight.json").read_text())["passed"],
          "test dice", evaluate_run(run)["pooled@cal"]["dice"])
    sam = json.dumps(tiny_sam_config_dict())
    run = train(tiny_cfg(tmp, "train.mixed_precision=bf16", "model.family=sam", f"model.config={sam}",
                         "model.finetune=lora", "model.prompt=box", "data.sampling=whole_image", steps=10,
                         name="sam-bf16"))
    print("sam box bf16: preflight", json.loads((run / "preflight.json").read_text())["passed"],
          "device", json.loads((run / "env.json").read_text())["device"])
    base = tmp / "tiny-sam"
    SamModel(tiny_sam_config()).save_pretrained(base)
    run = train(tiny_cfg(tmp, "train.mixed_precision=bf16", "model.family=sam", f"model.path={base}",
                         "model.quantize_4bit=true", "model.config={}", "model.prompt=box",
                         "data.sampling=whole_image", steps=10, name="qlora"))
    pre = json.loads((run / "preflight.json").read_text())
    print("qlora: preflight", pre["passed"], pre["n_trainable"], "trainable tensors; adapter saved",
          (run / "checkpoints" / "best" / "adapter" / "adapter_model.safetensors").exists(),
          "; reloaded + evaluated, dice", evaluate_run(run)["pooled@cal"]["dice"])


if __name__ == "__main__":
    main()
