"""BUSI as visual question answering (not a test): the whole instruction-tuning pipeline on the real images, read
against the two numbers an accuracy means nothing without.

    OMP_NUM_THREADS=1 .venv/bin/python bench/busi_vqa.py --out /tmp/busi-vqa [overrides...]

1. `data to-vqa` on ../shared/data/BUSI (near-duplicate groups kept in one split, cross-class duplicates reported);
2. a tiny VLM (configs/busi_vqa_tiny_vlm.yaml: LLaVA-style, 64 px, trained from scratch: no pretrained VLM is
   available offline) trained with `medtune train`, best checkpoint by validation accuracy, `medtune eval` on test:
   greedy answers parsed into labels;
3. the majority class of the training split, always answered;
4. a small CNN (4 conv blocks, 64 px grey, the same split) trained for the same wall-clock time as the VLM, best
   epoch by validation accuracy;
5. the VLM and the CNN paired on the test images: accuracy difference with a paired-bootstrap CI and McNemar's test;
6. GRPO on answers from the supervised VLM (``--grpo-steps``), compared with it on the same test images.
Prints a markdown block for bench/RESULTS.md and writes OUT/busi_vqa_result.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
BUSI = REPO.parent / "shared" / "data" / "BUSI"
CNN_SIZE = 64  # the VLM's image size, so both see the same pixels
CNN_BATCH = 32
CNN_LR = 1e-3


def small_cnn(n_classes: int) -> nn.Module:
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(1, 16), block(16, 32), block(32, 64), block(64, 64), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, n_classes))


def cnn_arrays(cfg, data, ids: list[str], labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    from medtune.data.io import read_image

    images, targets = [], []
    for i in ids:
        s = data.samples[i]
        grey = read_image(s.image, channels=1)[0]
        pil = Image.fromarray((grey * 255).astype(np.uint8)).resize((CNN_SIZE, CNN_SIZE), Image.BICUBIC)
        images.append(np.asarray(pil, dtype=np.float32) / 255.0)
        targets.append(labels.index(s.label))
    return torch.from_numpy(np.stack(images))[:, None], torch.tensor(targets)


def train_cnn(cfg, data, labels: list[str], seconds: float, seed: int = 0) -> dict:
    """Train for ``seconds`` of wall time; keep the epoch with the best validation accuracy; predict test."""
    torch.manual_seed(seed)
    x_train, y_train = cnn_arrays(cfg, data, data.split["train"], labels)
    x_val, y_val = cnn_arrays(cfg, data, data.split["val"], labels)
    x_test, y_test = cnn_arrays(cfg, data, data.split["test"], labels)
    model = small_cnn(len(labels))
    opt = torch.optim.Adam(model.parameters(), lr=CNN_LR)
    rng = np.random.default_rng(seed)
    best = (-1.0, None, 0)
    started, epoch = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        model.train()
        order = rng.permutation(len(y_train))
        for start in range(0, len(order), CNN_BATCH):
            idx = order[start:start + CNN_BATCH]
            xb = x_train[idx]
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = nn.functional.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        epoch += 1
        model.eval()
        with torch.no_grad():
            val_acc = float((model(x_val).argmax(1) == y_val).float().mean())
        if val_acc > best[0]:
            best = (val_acc, {k: v.clone() for k, v in model.state_dict().items()}, epoch)
    model.load_state_dict(best[1])
    model.eval()
    with torch.no_grad():
        pred = model(x_test).argmax(1)
    return {"epochs": epoch, "best_epoch": best[2], "val_accuracy": best[0],
            "test_ids": list(data.split["test"]), "test_correct": (pred == y_test).int().tolist(),
            "test_pred": [labels[i] for i in pred.tolist()]}


def main(argv: list[str]) -> None:
    from medtune.answers import classification_metrics
    from medtune.config import load_config
    from medtune.data.run_split import prepare_split
    from medtune.data.to_vqa import format_conversion, to_vqa
    from medtune.evaluate import evaluate_run, format_summary
    from medtune.report.answers import read_answers
    from medtune.reporting import write_report
    from medtune.stats import bootstrap_ci, mcnemar, paired_bootstrap
    from medtune.train import train

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/busi-vqa")
    parser.add_argument("--data", default=str(BUSI))
    parser.add_argument("--grpo-steps", type=int, default=100, help="GRPO on answers from the supervised run (0: skip)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if not Path(args.data).is_dir():
        sys.exit(f"{args.data} not found: the BUSI benchmark needs ../shared/data/BUSI")
    out = Path(args.out)
    conversion = to_vqa(args.data, out / "busi_vqa.json")
    print(format_conversion(conversion, args.data))

    cfg = load_config(REPO / "configs" / "busi_vqa_tiny_vlm.yaml", [
        f"data.path={out / 'busi_vqa.json'}", f"data.image_root={args.data}", f"run.output_dir={out / 'runs'}",
        "train.trackers=[]", *args.overrides])
    started = time.perf_counter()
    run = train(cfg)
    vlm_seconds = time.perf_counter() - started
    summary = evaluate_run(run)
    print(format_summary(summary))
    write_report(run)

    data = prepare_split(cfg, run)
    present = summary["classification"]["labels"]
    labels = [lab for lab in present if any(s.label == lab for s in data.samples.values())]
    cnn = train_cnn(cfg, data, labels, vlm_seconds)
    refs = [data.samples[i].label for i in cnn["test_ids"]]
    cnn_metrics = classification_metrics(refs, cnn["test_pred"], labels, n_boot=2000)

    answers = {r["id"]: r for r in read_answers(run / "eval" / "test" / "answers.csv")}
    vlm_correct = np.array([float(answers[i]["correct"]) for i in cnn["test_ids"]])
    cnn_correct = np.array(cnn["test_correct"], dtype=float)
    paired = paired_bootstrap(vlm_correct, cnn_correct, n_boot=2000)
    test = mcnemar(vlm_correct, cnn_correct)
    vlm = summary["classification"]
    train_counts = {lab: sum(data.samples[i].label == lab for i in data.split["train"]) for lab in labels}
    result = {
        "run": str(run), "threads": torch.get_num_threads(), "vlm_steps": cfg.optim.max_steps,
        "vlm_train_minutes": round(vlm_seconds / 60, 2), "split": {k: len(v) for k, v in data.split.items()},
        "train_counts": train_counts, "cross_class_duplicate_groups": len(conversion.conflicts),
        "majority_label": vlm.get("majority_label"), "majority_rate": vlm.get("majority_rate"),
        "vlm_accuracy": vlm["accuracy"], "vlm_macro_f1": vlm["macro_f1"], "vlm_invalid": vlm["n_invalid"],
        "vlm_confusion": vlm["confusion"],
        "cnn_accuracy": bootstrap_ci(cnn_correct, n_boot=2000), "cnn_macro_f1": cnn_metrics["macro_f1"],
        "cnn_epochs": cnn["epochs"], "cnn_best_epoch": cnn["best_epoch"], "cnn_confusion": cnn_metrics["confusion"],
        "vlm_minus_cnn": paired, "mcnemar": test,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
    }
    if args.grpo_steps:
        from medtune.reporting import compare_runs

        grpo_cfg = load_config(REPO / "configs" / "vlm_grpo.yaml", [
            f"rl.init_from={run}", f"run.output_dir={out / 'runs'}", "run.name=busi-vqa-grpo",
            f"optim.max_steps={args.grpo_steps}", "train.eval_every=50", "train.save_every=100", "train.trackers=[]",
            "data.batch_size=4"])
        started = time.perf_counter()
        grpo_run = train(grpo_cfg)
        result["grpo_minutes"] = round((time.perf_counter() - started) / 60, 2)
        grpo_summary = evaluate_run(grpo_run)
        result["grpo_accuracy"] = grpo_summary["classification"]["accuracy"]
        result["grpo_invalid"] = grpo_summary["classification"]["n_invalid"]
        result["grpo_vs_sft"] = compare_runs([run, grpo_run])
        print(result["grpo_vs_sft"])
    (out / "busi_vqa_result.json").write_text(json.dumps(result, indent=2))

    def ci(c):
        return f"{c['mean']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]"

    minutes = result["vlm_train_minutes"]
    rows = [
        f"| BUSI test ({result['split']['test']} images) | accuracy [95% CI] | macro-F1 | notes |",
        "|---|---|---|---|",
        f"| majority class ('{result['majority_label']}') | {result['majority_rate']:.3f} | – | always the training "
        "split's most frequent class |",
        f"| tiny VLM, {cfg.optim.max_steps} steps ({minutes} min) | {ci(vlm['accuracy'])} | "
        f"{vlm['macro_f1']['mean']:.3f} | greedy answers, {vlm['n_invalid']} invalid |",
        f"| small CNN, same {minutes} min ({cnn['epochs']} epochs) | {ci(result['cnn_accuracy'])} | "
        f"{cnn_metrics['macro_f1']['mean']:.3f} | best epoch {cnn['best_epoch']} by val accuracy |",
        "",
        f"VLM - CNN accuracy {paired['mean_diff']:+.3f} [{paired['lo']:+.3f}, {paired['hi']:+.3f}], McNemar p = "
        f"{test['p_value']:.3g} ({test['a_only']} right only by the VLM, {test['b_only']} only by the CNN).",
    ]
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
