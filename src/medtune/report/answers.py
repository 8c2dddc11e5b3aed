"""Report and comparison of instruction-tuned VLM runs (task instruct): answers instead of masks.

`medtune report RUN`: configuration, preflight, training curves, accuracy with its bootstrap CI next to the
majority-class rate, macro-F1, per-class precision / recall / F1, the confusion matrix (with its "invalid answer"
column) and every evaluated answer, wrong ones first.

`medtune compare A B ...`: runs paired by sample id on the samples all of them answered: per-run accuracy with CI,
and for every run after the first the paired-bootstrap CI of the accuracy difference and McNemar's exact test.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from medtune.errors import MissingFileError, UserError
from medtune.report.page import (
    ci_text,
    esc,
    eval_dir,
    fmt,
    img,
    page,
    preflight_section,
    read_json,
    table,
    training_curves,
)

ALPHA = 0.05
N_BOOT = 2000
SEED = 0
ANSWER_CURVES_KEYS = ("val_accuracy", "val_macro_f1", "val_invalid_rate", "val_lm_loss", "loss_lm", "reward_correct",
                      "reward_format")


def read_answers(path: Path) -> list[dict]:
    if not path.is_file():
        raise MissingFileError(f"{path} not found: run `medtune eval {path.parents[2]} --split {path.parent.name}`")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ---- report ----------------------------------------------------------------------------------------------------------
def _config_rows(cfg, split: dict | None, summary: dict) -> list[list]:
    rows = [["objective", cfg.objective], ["model family", cfg.model.family],
            ["model path", cfg.model.path or f"— (built from {cfg.model.config})"],
            ["fine-tuning", cfg.finetune_mode()]]
    if cfg.finetune_mode() == "lora":
        rows += [["LoRA r / alpha", f"{cfg.lora.resolved_r()} / {fmt(cfg.lora.resolved_alpha(), 1)}"],
                 ["vision LoRA / projector trained", f"{cfg.model.vlm.vision_lora} / {cfg.model.vlm.train_projector}"]]
    if cfg.objective == "rl":
        rows.append(["reward", str(cfg.rl.reward)])
    rows += [["steps", cfg.optim.max_steps], ["learning rate", cfg.optim.lr],
             ["batch size (global)", cfg.data.batch_size], ["data", f"{cfg.data.path} (layout {cfg.data.layout})"],
             ["split sizes", ", ".join(f"{k} {len(v)}" for k, v in split.items()) if split else "—"],
             ["labels", ", ".join(summary["classification"]["labels"])],
             ["answers", f"greedy, at most {summary.get('generation', {}).get('max_new_tokens', '?')} new tokens"],
             ["evaluated checkpoint", summary.get("checkpoint", "—")], ["seed", cfg.run.seed]]
    return rows


def _metrics_section(summary: dict) -> str:
    m = summary["classification"]
    acc, macro = m["accuracy"], m["macro_f1"]
    rows = [["accuracy", ci_text(acc["mean"], acc["lo"], acc["hi"])],
            ["majority class always" + (f" ('{m['majority_label']}', from the training split)"
                                        if m.get("majority_label") else ""), fmt(m.get("majority_rate"))],
            ["macro-F1", ci_text(macro["mean"], macro["lo"], macro["hi"])],
            ["invalid answers (no label named; scored wrong)", f"{m['n_invalid']} of {m['n']}"]]
    if summary.get("n_without_reference_label"):
        rows.append(["samples without a reference label (not scored)", summary["n_without_reference_label"]])
    per_class = [[label, ci_text(c["precision"]["mean"], c["precision"]["lo"], c["precision"]["hi"]),
                  ci_text(c["recall"]["mean"], c["recall"]["lo"], c["recall"]["hi"]),
                  ci_text(c["f1"]["mean"], c["f1"]["lo"], c["f1"]["hi"]), c["support"]]
                 for label, c in m["per_class"].items()]
    conf = m["confusion"]
    conf_rows = [[f"reference {r}", *row] for r, row in zip(conf["rows"], conf["counts"])]
    return ("<h2>Answers: classification metrics</h2>"
            + f'<p class="muted">95% percentile-bootstrap intervals over samples ({summary["n_samples"]} samples).</p>'
            + table(["metric", "value"], rows, left_cols=1)
            + "<h3>Per class</h3>" + table(["class", "precision", "recall", "F1", "support"], per_class)
            + "<h3>Confusion matrix</h3>" + table(["", *[f"answer {c}" for c in conf["columns"]]], conf_rows))


def _answers_section(answers: list[dict], limit: int = 200) -> str:
    order = sorted(range(len(answers)), key=lambda i: (answers[i].get("correct") not in ("0",),
                                                       answers[i].get("correct") == "", answers[i]["id"]))
    rows = [[answers[i]["id"], answers[i].get("question", ""), answers[i].get("reference", ""),
             answers[i].get("answer", ""), answers[i].get("answer_label", ""),
             {"1": "right", "0": "wrong"}.get(answers[i].get("correct", ""), "not scored")] for i in order[:limit]]
    more = f'<p class="muted">first {limit} of {len(answers)} shown; all in answers.csv</p>' if len(answers) > limit \
        else ""
    return ("<h2>Answers (wrong first)</h2>"
            + table(["id", "question", "reference", "answer", "parsed", "verdict"], rows, left_cols=6) + more)


def _training_section(records: list[dict]) -> str:
    figs = "".join(img(uri, title) for title, uri in training_curves(records))
    answer_keys = [k for k in ANSWER_CURVES_KEYS if any(k in r for r in records)]
    if answer_keys:
        from medtune.report import plots

        series = {k: ([r["step"] for r in records if k in r], [r[k] for r in records if k in r]) for k in answer_keys}
        figs += img(plots.line_plot(series, "validation answers / answer loss", "step", "value"), "answers")
    warnings = [[r.get("step", "—"), r["warning"]] for r in records if "warning" in r]
    return ("<h2>Training</h2>" + f'<div class="figs">{figs}</div>'
            + (table(["step", "warning"], warnings, left_cols=2) if warnings else
               '<p class="muted">No warnings were logged during training.</p>'))


def write_answers_report(run_dir: Path, split: str = "test") -> Path:
    from medtune.atomic import write_text_atomic
    from medtune.runs.files import load_run_config, read_metrics

    run_dir = Path(run_dir)
    ev = eval_dir(run_dir, split)
    cfg = load_run_config(run_dir)
    summary = read_json(ev / "summary.json")
    answers = read_answers(ev / "answers.csv")
    body = [f"<h1>medtune report: {esc(cfg.run.name)}</h1>",
            f'<p class="muted">{esc(run_dir.resolve())} · split {esc(split)} · {summary["n_samples"]} samples · '
            "instruction-tuned VLM</p>",
            "<h2>Configuration</h2>" + table(["setting", "value"], _config_rows(cfg, read_json(run_dir / "split.json"),
                                                                                summary), left_cols=2)
            + f"<details><summary>full resolved config (config.yaml)</summary><pre>"
              f"{esc((run_dir / 'config.yaml').read_text())}</pre></details>",
            preflight_section(read_json(run_dir / "preflight.json")),
            _training_section(read_metrics(run_dir)),
            _metrics_section(summary),
            _answers_section(answers)]
    out = run_dir / "report.html"
    write_text_atomic(out, page(f"medtune report: {cfg.run.name}", "\n".join(body)))
    return out


# ---- compare ---------------------------------------------------------------------------------------------------------
def compare_answer_runs(runs: list[Path], out_dir: Path | None = None, split: str = "test") -> str:
    from medtune.stats import bootstrap_ci, mcnemar, paired_bootstrap

    if len(runs) < 2:
        raise UserError("compare needs at least two run folders (the first is the baseline)")
    tables = []
    for run in runs:
        summary = read_json(eval_dir(Path(run), split) / "summary.json")
        if "classification" not in (summary or {}):  # answer metrics, not mask metrics
            raise UserError(f"{run} was not evaluated as an instruction-tuned VLM run; compare answer runs with "
                             "answer runs")
        rows = read_answers(Path(run) / "eval" / split / "answers.csv")
        tables.append({r["id"]: r for r in rows if r.get("correct") in ("0", "1")})
    common = sorted(set.intersection(*(set(t) for t in tables)))
    if not common:
        raise UserError("the runs share no scored sample id; were they evaluated on the same split of the same data?")
    refs = [[t[i]["reference_label"] for i in common] for t in tables]
    if any(r != refs[0] for r in refs[1:]):
        raise UserError("the runs give different reference labels for the same sample ids: they read different data")
    correct = [np.array([float(t[i]["correct"]) for i in common]) for t in tables]
    names = [Path(r).name for r in runs]
    lines = [f"{len(runs)} runs on split '{split}', paired over the {len(common)} samples all of them answered "
             f"(baseline: {names[0]})", ""]
    header = ["run", "accuracy [95% CI]", "diff vs baseline [95% CI]", "p (paired bootstrap)", "McNemar p",
              "right only here / only baseline", "verdict"]
    body = []
    for k, (name, c) in enumerate(zip(names, correct)):
        ci = bootstrap_ci(c, n_boot=N_BOOT, alpha=ALPHA, seed=SEED)
        row = [name, f"{ci['mean']:.4f} [{ci['lo']:.4f}, {ci['hi']:.4f}]"]
        if k == 0:
            row += ["(baseline)", "", "", "", ""]
        else:
            boot = paired_bootstrap(c, correct[0], n_boot=N_BOOT, seed=SEED, alpha=ALPHA)
            test = mcnemar(c, correct[0])
            significant = test["p_value"] < ALPHA and (boot["lo"] > 0 or boot["hi"] < 0)
            verdict = ("better" if boot["mean_diff"] > 0 else "worse") if significant else "no significant difference"
            row += [f"{boot['mean_diff']:+.4f} [{boot['lo']:+.4f}, {boot['hi']:+.4f}]", f"{boot['p_value']:.4f}",
                    f"{test['p_value']:.4f}", f"{test['a_only']} / {test['b_only']}", verdict]
        body.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in [header, *body]]
    lines += ["", "A difference is called significant only when McNemar's exact test gives p < 0.05 and the paired "
                  "bootstrap CI of the accuracy difference excludes 0."]
    text = "\n".join(lines)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with (out_dir / "compare.csv").open("w", newline="") as f:
            csv.writer(f).writerows([header, *body])
        (out_dir / "compare.html").write_text(page("medtune compare (answers)", f"<h1>medtune compare</h1><pre>"
                                                   f"{esc(lines[0])}</pre>" + table(header, body, left_cols=1)))
        text += f"\nwritten: {out_dir / 'compare.csv'}, compare.html"
    return text
