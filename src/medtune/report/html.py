"""`medtune report RUN`: one self-contained HTML file (figures as data: URIs, inline CSS, no scripts) that opens offline
and can be mailed or attached to a paper review as it is.

Everything shown is read from the run folder (config.yaml, split.json, metrics.jsonl, preflight.json and
eval/<split>/); only the ground truth for the PR curve and the overlays is read from the data set the config names.
"""
from __future__ import annotations

import csv
import html
import json
import logging
import math
from pathlib import Path

import numpy as np

from medtune.errors import MissingFileError, UserError
from medtune.report import plots
from medtune.stats import LOWER_IS_BETTER

log = logging.getLogger("medtune")

METRIC_ORDER = ["dice", "iou", "precision", "recall", "specificity", "accuracy", "auc", "cldice",
                "betti0_error", "betti1_error", "hd95", "assd"]
PER_IMAGE_COLUMNS = ["dice@cal", "dice@t050", "iou@cal", "precision@cal", "recall@cal", "cldice@cal",
                     "betti0_error@cal", "betti1_error@cal", "hd95@cal"]
TRAINING_CURVES = [  # (metrics.jsonl keys, title, y label, log scale)
    (["loss", "loss_dice", "loss_focal", "loss_bce", "loss_cldice"], "training loss (and its terms)", "loss", True),
    (["grad_norm"], "gradient norm (before clipping)", "norm", True),
    (["val_dice", "val_auc"], "validation (pooled, threshold 0.5)", "value", False),
    (["lr"], "learning rate", "lr", False),
    (["reward_mean"], "RL: mean reward", "reward", False),
    (["kl"], "RL: KL to the reference", "KL", False),
    (["clip_fraction"], "RL: clipped fraction", "fraction", False),
]

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222;
     padding:0 16px;line-height:1.4}
h1{font-size:1.5em;margin-bottom:4px} h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:28px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f3f3f3} td.l,th.l{text-align:left}
tr:nth-child(even) td{background:#fafafa}
.muted{color:#666;font-size:13px} .note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;margin:8px 0}
.pass{color:#fff;background:#2e7d32;padding:1px 8px;border-radius:3px} .fail{color:#fff;background:#c62828;
      padding:1px 8px;border-radius:3px}
.better{color:#2e7d32;font-weight:600} .worse{color:#c62828;font-weight:600} .nsd{color:#555}
.figs{display:flex;flex-wrap:wrap;gap:12px} .figs figure{margin:0} figcaption{font-size:12px;color:#444;max-width:420px}
.overlay img{width:340px;height:auto;image-rendering:pixelated;border:1px solid #ccc}
pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:12px;max-height:480px}
"""


# ---------------------------------------------------------------------------------------------------------------
# small HTML helpers, shared with compare.py


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value, digits: int = 4) -> str:
    """Numbers for tables: NaN / None as an em dash, large values (hd95 in pixels) with fewer decimals."""
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(v):
        return "—"
    if abs(v) >= 100:
        return f"{v:.1f}"
    if v != 0 and abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


def ci_text(mean, lo, hi) -> str:
    if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
        return "—"
    if lo is None or hi is None:
        return fmt(mean)
    return f"{fmt(mean)} [{fmt(lo)}, {fmt(hi)}]"


def table(header: list[str], rows: list[list], left_cols: int = 1, raw: bool = False) -> str:
    """<table>; cells are escaped unless `raw` (callers that pass markup escape its parts themselves)."""
    def cell(tag: str, value, i: int) -> str:
        cls = ' class="l"' if i < left_cols else ""
        return f"<{tag}{cls}>{value if raw else esc(value)}</{tag}>"

    head = "".join(cell("th", h, i) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", v, i) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def img(uri: str | None, alt: str, caption: str | None = None) -> str:
    if not uri:
        return ""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{esc(alt)}">{cap}</figure>'


def page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


# ---------------------------------------------------------------------------------------------------------------
# reading the run folder


def eval_dir(run_dir: Path, split: str) -> Path:
    """RUN/eval/<split>, or FileNotFoundError telling the user which command creates it."""
    out = Path(run_dir) / "eval" / split
    if not (out / "summary.json").is_file():
        raise MissingFileError(
            f"{out / 'summary.json'} not found: run `medtune eval {run_dir} --split {split}` first"
        )
    return out


def read_json(path: Path, default=None):
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err}); re-run the command that writes it") from None


def read_per_image(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """per_image.csv -> (ids, {column: float array}); empty cells and 'nan' become NaN."""
    if not path.is_file():
        raise MissingFileError(f"{path} not found: run `medtune eval {path.parents[2]} --split {path.parent.name}`")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        fields = [c for c in (reader.fieldnames or []) if c != "id"]
    if rows and "id" not in rows[0]:
        raise UserError(f"{path}: no 'id' column; re-run `medtune eval`")

    def num(text) -> float:
        try:
            return float(text)
        except (TypeError, ValueError):
            return float("nan")

    ids = [r["id"] for r in rows]
    return ids, {c: np.array([num(r.get(c)) for r in rows], dtype=float) for c in fields}


def training_curves(records: list[dict]) -> list[tuple[str, str]]:
    """[(title, data URI)] for every known curve that metrics.jsonl has values for."""
    out = []
    for keys, title, ylabel, logy in TRAINING_CURVES:
        series = {}
        for k in keys:
            pts = [(r["step"], r[k]) for r in records if k in r and "step" in r and isinstance(r[k], (int, float))]
            if pts:
                series[k] = ([p[0] for p in pts], [p[1] for p in pts])
        uri = plots.line_plot(series, title, "step", ylabel, logy=logy) if series else None
        if uri:
            out.append((title, uri))
    return out


def _load_ground_truth(cfg, ids: list[str]) -> dict:
    """{id: LoadedSample} at native resolution, like evaluate.native(): probs.npz holds native-resolution maps, so
    scale normalisation must not be applied here. An id ``image#k`` (the k-th referring expression of an image) gets
    that expression's own mask."""
    from dataclasses import replace

    from medtune.data.layouts import discover
    from medtune.data.loading import load_all

    samples = {s.id: s for s in discover(cfg.data)}

    def split_id(i: str) -> tuple[str, int | None]:
        base, _, k = i.rpartition("#")
        return (base, int(k)) if base in samples and k.isdigit() else (i, None)

    wanted = {i: split_id(i) for i in ids}
    missing = [i for i, (base, _) in wanted.items() if base not in samples]
    if missing:
        raise MissingFileError(f"{len(missing)} evaluated image(s) are not in data.path={cfg.data.path} "
                               f"(e.g. {missing[0]}); point data.path at the data the run was evaluated on")
    bases = sorted({base for base, _ in wanted.values()})
    loaded = {s.id: s for s in load_all([samples[b] for b in bases], cfg.data)}
    return {i: loaded[base] if k is None else replace(loaded[base], mask=loaded[base].target_masks()[k])
            for i, (base, k) in wanted.items()}


# ---------------------------------------------------------------------------------------------------------------
# sections


def _config_section(cfg, config_text: str, split: dict | None, summary: dict, env: dict | None) -> str:
    mode = cfg.finetune_mode()
    rows = [
        ["objective", cfg.objective],
        ["model family", cfg.model.family],
        ["model path", cfg.model.path or "— (built from scratch)"],
        ["fine-tuning", mode],
    ]
    if mode == "lora":
        rows.append(["LoRA r / alpha", f"{cfg.lora.resolved_r()} / {fmt(cfg.lora.resolved_alpha(), 1)}"])
    rows += [
        ["loss", ", ".join(f"{k} {v}" for k, v in cfg.loss.model_dump().items() if k in ("dice", "focal", "bce", "cldice"))
         if cfg.objective == "supervised" else f"reward {cfg.rl.reward}"],
        ["steps", cfg.optim.max_steps],
        ["learning rate", cfg.optim.lr],
        ["batch size (global)", cfg.data.batch_size],
        ["data", f"{cfg.data.path} (layout {cfg.data.layout})"],
        ["split sizes", ", ".join(f"{k} {len(v)}" for k, v in split.items()) if split else "— (no split.json)"],
        ["seed", cfg.run.seed],
        ["evaluated checkpoint", summary.get("checkpoint", "—")],
    ]
    if cfg.data.split.folds:
        rows.insert(-1, ["cross-validation", f"fold {cfg.data.split.fold} of {cfg.data.split.folds}"])
    if env:
        versions = env.get("versions") or {}
        rows.append(["environment", f"{env.get('device', '?')}; torch {versions.get('torch', '?')}; "
                                    f"git {str(env.get('git_commit') or '—')[:12]}"])
    return ("<h2>Configuration</h2>" + table(["setting", "value"], rows, left_cols=2)
            + f"<details><summary>full resolved config (config.yaml)</summary><pre>{esc(config_text)}</pre></details>")


def _training_section(records: list[dict]) -> str:
    if not records:
        return "<h2>Training</h2><p class=\"muted\">metrics.jsonl is missing or empty.</p>"
    figs = "".join(img(uri, title) for title, uri in training_curves(records))
    warnings = [r for r in records if "warning" in r]
    parts = ["<h2>Training</h2>", f'<div class="figs">{figs}</div>']
    if warnings:
        parts.append(f"<h3>Warnings during training ({len(warnings)})</h3>"
                     + table(["step", "warning"], [[w.get("step", "—"), w["warning"]] for w in warnings], left_cols=2))
    else:
        parts.append('<p class="muted">No warnings were logged during training.</p>')
    return "".join(parts)


def _metrics_table(blocks: dict, thr: float) -> str:
    """Pooled and per-image (mean [95% CI]) metrics at 0.5 and at ``thr`` from the summary blocks pooled@t050,
    pooled@cal, per_image@t050, per_image@cal."""
    pooled = {t: blocks.get(f"pooled@{t}") or {} for t in ("t050", "cal")}
    per = {t: blocks.get(f"per_image@{t}") or {} for t in ("t050", "cal")}
    names = [m for m in METRIC_ORDER if any(m in d for d in (*pooled.values(), *per.values()))]
    names += sorted({k for d in (*pooled.values(), *per.values()) for k in d} - set(names))
    rows = []
    for m in names:
        row = [m + (" (lower is better)" if m in LOWER_IS_BETTER else "")]
        for t in ("t050", "cal"):
            c = per[t].get(m) or {}
            nan_note = f" ({c['n_nan']} NaN)" if c.get("n_nan") else ""
            row += [fmt(pooled[t].get(m)), ci_text(c.get("mean"), c.get("lo"), c.get("hi")) + nan_note]
        rows.append(row)
    header = ["metric", "pooled @0.5", "per-image mean [95% CI] @0.5",
              f"pooled @{fmt(thr, 3)}", f"per-image mean [95% CI] @{fmt(thr, 3)}"]
    return table(header, rows)


def _metrics_section(summary: dict) -> str:
    thr = summary.get("threshold", 0.5)
    calib = summary.get("calibration") or {}
    teacher_forced = (" The segmenting VLM is given the training conversation (teacher-forced answers); free "
                      "generation is measured below." if summary.get("free_generation") else "")
    return (f"<h2>Metrics on {esc(summary.get('split', '?'))} ({esc(summary.get('n_images', '?'))} images)</h2>"
            f"<p>Calibrated threshold <b>{esc(fmt(thr, 3))}</b> ({esc(calib.get('strategy', '?'))}, fitted on the "
            "validation split only). Pooled = all pixels inside the FOV of all images; per-image = mean over images "
            f"with a bootstrap 95% CI.{esc(teacher_forced)}</p>" + _metrics_table(summary, thr))


def _percent(value) -> str:
    return "—" if value is None else f"{float(value):.0%}"


def _free_generation_section(summary: dict) -> str:
    """The segmenting VLM as `medtune predict` runs it: its own answers, an answer without [SEG] an empty mask."""
    free = summary.get("free_generation")
    if not free:
        return ""
    gen = summary.get("generation") or {}
    seg = gen.get("seg_token", "[SEG]")
    stats = ""
    if gen:
        stats = (f" {_percent(gen.get('answers_without_seg_rate'))} of {gen.get('n_answers', '?')} answers held no "
                 f"{seg}; {_percent(gen.get('no_seg_rate'))} of {gen.get('n', '?')} images got no {seg} at all.")
    examples = gen.get("examples") or []
    rows = [[ex.get("id", "?"), " / ".join(ex.get("questions") or []), " / ".join(ex.get("answers") or [])]
            for ex in examples]
    body = (f"<h2>Free generation ({esc(free.get('n_images', '?'))} targets)</h2>"
            "<p>The model answers each question itself (greedy, as <code>medtune predict</code> does); a target whose "
            f"answer holds no {esc(seg)} is scored as an empty mask. Same calibrated threshold as above.{esc(stats)}</p>"
            + _metrics_table(free, float(free.get("threshold", summary.get("threshold", 0.5)))))
    if rows:
        body += "<h3>Example answers</h3>" + table(["id", "questions", "answers"], rows, left_cols=3)
    return body


def _calibration_section(calib: dict | None, threshold: float, pr: dict | None, summary: dict, note: str) -> str:
    figs = []
    if calib and calib.get("curve"):
        figs.append(img(plots.threshold_plot(calib["curve"], threshold), "threshold-Dice curve",
                        "Dice, precision and recall against the threshold on the validation split; dashed: the "
                        "chosen threshold"))
    if pr is not None:
        points = {}
        for t, label in (("t050", "threshold 0.5"), ("cal", f"threshold {threshold:.3f}")):
            p = summary.get(f"pooled@{t}") or {}
            if p.get("recall") is not None and p.get("precision") is not None:
                points[label] = (float(p["recall"]), float(p["precision"]))
        figs.append(img(plots.pr_plot(pr["recall"], pr["precision"], pr["ap"], points), "precision-recall curve",
                        f"pooled over {pr['n_pos'] + pr['n_neg']:,} FOV pixels of the {summary.get('split')} split "
                        f"({pr['n_pos']:,} foreground); average precision {pr['ap']:.4f}"))
    body = f'<div class="figs">{"".join(figs)}</div>' if figs else ""
    if not (calib and calib.get("curve")):
        body += f'<p class="muted">No threshold curve: {esc((calib or {}).get("note", "calibration.json has none"))}.</p>'
    if calib and calib.get("met") is False:
        # target_recall not reachable on val: the threshold is a fallback, and the report must not hide it
        body += (f'<p class="note">The calibration target was not met on the validation split: '
                 f'{esc(calib.get("note") or "no threshold reaches it")}.</p>')
    if note:
        body += f'<p class="note">{esc(note)}</p>'
    return "<h2>Threshold and precision-recall</h2>" + body


def _per_image_section(ids: list[str], cols: dict[str, np.ndarray], order: list[int]) -> str:
    shown = [c for c in PER_IMAGE_COLUMNS if c in cols]
    rows = [[ids[i]] + [fmt(cols[c][i]) for c in shown] for i in order]
    return ("<h2>Per image, worst first (by dice@cal)</h2>"
            '<p class="muted">@cal = at the calibrated threshold, @t050 = at 0.5. Images whose Dice is undefined '
            "(NaN) are listed last.</p>" + table(["id"] + shown, rows))


def _overlay_section(ids: list[str], cols: dict[str, np.ndarray], order: list[int], probs: dict[str, np.ndarray],
                     truth: dict, threshold: float) -> str:
    dice = cols.get("dice@cal")
    ranked = [i for i in order if dice is not None and math.isfinite(dice[i])]
    worst = ranked[:3]
    best = [i for i in reversed(ranked) if i not in worst][:3]
    parts = [f"<h2>Overlays at threshold {esc(fmt(threshold, 3))}</h2>",
             f'<p>{esc(plots.OVERLAY_LEGEND)}. Outside the FOV (not scored) the image is darker still.</p>']
    for title, chosen in ((f"{len(worst)} worst", worst), (f"{len(best)} best", best)):
        if not chosen:
            parts.append('<p class="muted">No further images to show as the best ones: every evaluated image with '
                         "a defined Dice is shown above.</p>")
            continue
        figs = []
        for i in chosen:
            sid = ids[i]
            if sid not in probs or sid not in truth:
                continue
            s = truth[sid]
            pred = probs[sid].astype(np.float32) / 255.0 >= threshold
            uri = plots.array_to_data_uri(plots.overlay(s.image, s.mask, pred, s.fov))
            figs.append(img(uri, f"overlay {sid}", f"{sid}: dice@cal {fmt(dice[i])}"))
        parts.append(f"<h3>{title}</h3><div class=\"figs overlay\">{''.join(figs)}</div>")
    return "".join(parts)


def _preflight_section(pre: dict | None) -> str:
    if pre is None:
        return ("<h2>Gradient-flow preflight</h2><p class=\"note\">No preflight.json: the preflight was off "
                "(train.preflight=false) or the run was resumed from one made without it. Nothing shows that "
                "gradients reached the trainable parameters.</p>")
    badge = '<span class="pass">PASSED</span>' if pre.get("passed") else '<span class="fail">FAILED</span>'
    zero = pre.get("zero_grad_first_step") or []
    rows = [
        ["trainable tensors", fmt(pre.get("n_trainable"))],
        ["trainable parameters", f"{pre['n_trainable_params']:,}" if isinstance(pre.get("n_trainable_params"), int)
         else fmt(pre.get("n_trainable_params"))],
        ["frozen tensors", fmt(pre.get("n_frozen"))],
        ["loss", fmt(pre.get("loss"))],
        ["steps", fmt(pre.get("steps"))],
        ["zero gradient on step one", f"{len(zero)} tensor(s)"],
    ]
    notes = "".join(f"<li>{esc(n)}</li>" for n in pre.get("notes") or [])
    zero_list = (f"<details><summary>tensors with zero gradient on step one ({len(zero)})</summary><pre>"
                 + esc("\n".join(zero)) + "</pre></details>") if zero else ""
    return (f"<h2>Gradient-flow preflight {badge}</h2>" + table(["check", "value"], rows, left_cols=1)
            + (f"<ul>{notes}</ul>" if notes else "") + zero_list)


# ---------------------------------------------------------------------------------------------------------------


def sort_worst_first(values: np.ndarray, ids: list[str]) -> list[int]:
    """Indices by ascending value (worst Dice first), NaN last, ties by id so the order is stable."""
    return sorted(range(len(ids)), key=lambda i: (not math.isfinite(values[i]), values[i]
                                                  if math.isfinite(values[i]) else 0.0, ids[i]))


def write_report(run_dir: str | Path, split: str = "test") -> Path:
    """Write RUN/report.html and return its path. FileNotFoundError when the split was not evaluated yet."""
    from medtune.data.run_split import use_recorded_image_max
    from medtune.runs.files import load_run_config, read_metrics, write_text_atomic

    run_dir = Path(run_dir)
    ev = eval_dir(run_dir, split)
    if (read_json(ev / "summary.json") or {}).get("task") == "instruct":  # answers, not masks
        from medtune.report.answers import write_answers_report

        return write_answers_report(run_dir, split)
    cfg = load_run_config(run_dir)
    use_recorded_image_max(cfg, run_dir)  # 16-bit images shown as training scaled them
    summary = read_json(ev / "summary.json")
    calib = read_json(ev / "calibration.json")
    ids, cols = read_per_image(ev / "per_image.csv")
    threshold = float(summary.get("threshold", 0.5))
    order = sort_worst_first(cols.get("dice@cal", np.full(len(ids), np.nan)), ids)

    probs: dict[str, np.ndarray] = {}
    truth: dict = {}
    pr = None
    note = ""
    if (ev / "probs.npz").is_file():
        with np.load(ev / "probs.npz") as npz:
            prob_ids = [str(i) for i in npz["ids"]]
            probs = {sid: npz[f"p{k}"] for k, sid in enumerate(prob_ids)}
        try:
            truth = _load_ground_truth(cfg, prob_ids)
            bad = [i for i in prob_ids if probs[i].shape != truth[i].mask.shape]
            if bad:
                raise ValueError(f"probability map of {bad[0]} is {probs[bad[0]].shape} but its mask is "
                                 f"{truth[bad[0]].mask.shape}; re-run `medtune eval`")
            pr = plots.pr_curve_from_uint8([probs[i] for i in prob_ids], [truth[i].mask for i in prob_ids],
                                           [truth[i].fov for i in prob_ids])
        except (OSError, ValueError) as err:  # DataError is a ValueError
            # The metrics stand without the images: say why the pictures are missing rather than fail the report.
            note = f"PR curve and overlays omitted: ground truth could not be loaded ({err})"
            log.warning(note)
            truth, pr = {}, None
    else:
        note = f"PR curve and overlays omitted: {ev / 'probs.npz'} not found (re-run `medtune eval` to write it)"

    records = read_metrics(run_dir)
    body = [
        f"<h1>medtune report: {esc(cfg.run.name)}</h1>",
        f'<p class="muted">{esc(run_dir.resolve())} · split {esc(split)} · {esc(summary.get("n_images", "?"))} '
        "images</p>",
        _config_section(cfg, (run_dir / "config.yaml").read_text(), read_json(run_dir / "split.json"), summary,
                        read_json(run_dir / "env.json")),
        _preflight_section(read_json(run_dir / "preflight.json")),
        _training_section(records),
        _metrics_section(summary),
        _free_generation_section(summary),
        _calibration_section(calib, threshold, pr, summary, note),
        _per_image_section(ids, cols, order),
    ]
    if truth:
        body.append(_overlay_section(ids, cols, order, probs, truth, threshold))
    out = run_dir / "report.html"
    write_text_atomic(out, page(f"medtune report: {cfg.run.name}", "\n".join(body)))
    return out
