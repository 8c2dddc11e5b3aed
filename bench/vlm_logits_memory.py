"""Peak memory of one VLM training step with full-vocabulary logits at every position vs only where the loss reads
them (issue 14; not a test; CPU is enough to show it).

    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/vlm_logits_memory.py [--vocab 151936] [--image 256] [--group 2]

A tiny LLaVA (``models/vlm/tiny.py``: 2-layer CLIP tower, 2-layer Qwen2 text model, hidden 64) made wide where it
matters here: a Qwen-sized vocabulary (151,936) and a 256^2 image in 8-px patches = 1,024 image tokens, with LoRA on
the language model as ``build_model`` places it. Two steps, each before and after:

* ``sft``: one instruction-tuning forward + backward of ``model(batch=...).lm_loss`` on one conversation with a short
  answer (the ``instruct`` task's training step). Before = ``LOGITS_AT: "all"``, which is exactly the previous code
  path (full logits, loss from their shifted rows).
* ``grpo``: one GRPO update's forward + backward through ``rl_answers.completion_logits`` + ``token_logprobs`` for
  ``--group`` sampled answers of one prompt. Before = what ``completion_logits`` did: full logits, then the slice.

Each (step, variant) runs in its own process; the peak is the kernel's resident-set high-water mark (VmHWM) over the
step alone: reset through /proc/self/clear_refs just before the step, read from /proc/self/status after it (when
the reset is not allowed, ru_maxrss since the process start, and the output says so). "above start" subtracts the
resident memory just before the step (model, data, and what the allocator kept from building them).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MB = 1024 * 1024
ANSWER_TOKENS = 4  # sampled answer length (GRPO)
MAX_POSITIONS = 4096  # room for the 1,024 image tokens and the text
CONVERSATION = [{"role": "user", "content": "<image>\nIs the lesion benign or malignant?"},
                {"role": "assistant", "content": "The lesion is benign."}]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def child(args) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from medtune.config import build_config
    from medtune.models.base import ModelOutput
    from medtune.models.registry import build_model
    from medtune.models.vlm.logits import ALL_POSITIONS, LOGITS_AT
    from medtune.models.vlm.model import collate
    from medtune.text_policy import token_logprobs
    from medtune.train.rl_answers import completion_logits

    torch.manual_seed(0)
    model = build_model(build_config({"model": {"family": "vlm", "path": args.folder}, "lora": {"r": 8}})).train()
    codec = model.codec
    image = Image.fromarray((np.random.default_rng(0).random((args.image, args.image, 3)) * 255).astype(np.uint8))
    full = args.variant == "before"
    if args.step == "sft":
        batch = collate([codec.encode(CONVERSATION, image, "s0")])
        if full:
            batch[LOGITS_AT] = ALL_POSITIONS

        def step():
            model(batch=batch).lm_loss.backward()
    else:
        prompts = collate([codec.encode(CONVERSATION, image, "s0", for_generation=True)] * args.group, "left")
        allowed = torch.tensor(sorted(set(range(len(codec.tokenizer))) - set(codec.suppress_ids)))
        completions = allowed[torch.randint(len(allowed), (args.group, ANSWER_TOKENS))]
        mask = torch.ones(args.group, ANSWER_TOKENS)
        t_prompt = prompts["input_ids"].shape[1]

        def full_then_sliced(batch):  # the previous completion_logits: every position, then the slice
            out = model(batch={**batch, LOGITS_AT: ALL_POSITIONS})
            return ModelOutput(token_logits=out.token_logits[:, t_prompt - 1: t_prompt - 1 + ANSWER_TOKENS])

        batch = prompts

        def step():
            logits = completion_logits(full_then_sliced if full else model, prompts, completions, mask)
            (token_logprobs(logits, completions, 1.0, codec.suppress_ids) * mask).sum().backward()
    tokens = batch["input_ids"].shape[1] + (ANSWER_TOKENS if args.step == "grpo" else 0)
    start_kb = _status_kb("VmRSS")
    exact = _reset_peak()
    step()
    peak_kb = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": peak_kb / 1024, "above_start_mb": (peak_kb - start_kb) / 1024, "exact": exact,
            "rows": int(batch["input_ids"].shape[0]), "tokens": int(tokens),
            "image_tokens": int(torch.isin(batch["input_ids"][0], torch.tensor(sorted(codec.image_token_ids))).sum())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--image", type=int, default=256)
    parser.add_argument("--group", type=int, default=2, help="GRPO answers per prompt")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--folder")
    parser.add_argument("--step", choices=("sft", "grpo"))
    parser.add_argument("--variant", choices=("before", "after"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    import transformers

    from medtune.models.vlm.tiny import save_tiny_vlm

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_vlm(Path(tmp) / "vlm", "llava", seed=0,
                               overrides={"image_size": args.image, "text_config": {
                                   "vocab_size": args.vocab, "max_position_embeddings": MAX_POSITIONS}})
        print(f"tiny LLaVA, vocab {args.vocab:,}, {args.image}^2 image, LoRA r=8, fp32, CPU; peak RSS of one "
              "forward + backward, each in its own process")
        for step in ("sft", "grpo"):
            row = {}
            for variant in ("before", "after"):
                cmd = [sys.executable, __file__, "--child", f"--folder={folder}", f"--step={step}",
                       f"--variant={variant}", f"--image={args.image}", f"--group={args.group}"]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()
                row[variant] = json.loads(out[-1])
            b, a = row["before"], row["after"]
            logits_mb = b["rows"] * b["tokens"] * args.vocab * 4 / MB
            how = "VmHWM reset at the step" if b["exact"] and a["exact"] else "ru_maxrss since process start"
            print(f"{step:4s}: {b['rows']} x {b['tokens']} tokens ({b['image_tokens']} image tokens per row); one "
                  f"full fp32 logits tensor = {logits_mb:,.0f} MB")
            print(f"      peak RSS   before {b['peak_mb']:8,.0f} MB   after {a['peak_mb']:8,.0f} MB   ({how})")
            print(f"      above start before {b['above_start_mb']:7,.0f} MB   after {a['above_start_mb']:8,.0f} MB   "
                  f"(x{b['above_start_mb'] / max(a['above_start_mb'], 1.0):.1f} less)")


if __name__ == "__main__":
    main()
