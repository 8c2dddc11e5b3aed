"""`medtune report RUN`: one self-contained HTML file (figures as data: URIs, inline CSS, no scripts) that opens offline
and can be mailed or attached to a paper review as it is.

Everything shown is read from the run folder (config.yaml, split.json, metrics.jsonl, preflight.json and
eval/<split>/); only the ground truth for the PR curve and the overlays is read from the data set the config names.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from medtune.errors import MissingFileError
from medtune.report import plots
from medtune.report.page import (
    ci_text,
    esc,
    eval_dir,
    fmt,
    img,
    page,
    preflight_section,
    read_json,
    read_per_image,
    table,
    training_curves,
)
from medtune.stats import LOWER_IS_BETTER

log = logging.getLogger("medtune")

METRIC_ORDER = ["dice", "iou", "precision", "recall", "specificity", "accuracy", "auc", "cldice",
                "betti0_error", "betti1_error", "hd95", "assd"]
PER_IMAGE_COLUMNS = ["dice@cal", "dice@t050", "iou@cal", "precision@cal", "recall@cal", "cldice@cal",
                     "betti0_error@cal", "betti1_error@cal", "hd95@cal"]
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


def run_head(run_dir: Path, cfg, split: str, summary: dict, evaluated: str, records: list[dict]) -> list[str]:
    """The top of a run's report page: its name, where it lives, what was evaluated (``evaluated``: "12 images"),
    the configuration, the preflight and the training curves."""
    return [
        f"<h1>medtune report: {esc(cfg.run.name)}</h1>",
        f'<p class="muted">{esc(run_dir.resolve())} · split {esc(split)} · {esc(evaluated)}</p>',
        _config_section(cfg, (run_dir / "config.yaml").read_text(), read_json(run_dir / "split.json"), summary,
                        read_json(run_dir / "env.json")),
        preflight_section(read_json(run_dir / "preflight.json")),
        _training_section(records),
    ]


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


def _metrics_table(blocks: dict, thr: float, unit: str = "image", order: list[str] = METRIC_ORDER) -> str:
    """Pooled and per-image (mean [95% CI]) metrics at 0.5 and at ``thr`` from the summary blocks pooled@t050,
    pooled@cal, per_image@t050, per_image@cal (``unit="video"``: per_video@..., the video task's CIs over videos)."""
    pooled = {t: blocks.get(f"pooled@{t}") or {} for t in ("t050", "cal")}
    per = {t: blocks.get(f"per_{unit}@{t}") or {} for t in ("t050", "cal")}
    names = [m for m in order if any(m in d for d in (*pooled.values(), *per.values()))]
    names += sorted({k for d in (*pooled.values(), *per.values()) for k in d} - set(names))
    rows = []
    for m in names:
        row = [m + (" (lower is better)" if m in LOWER_IS_BETTER else "")]
        for t in ("t050", "cal"):
            c = per[t].get(m) or {}
            nan_note = f" ({c['n_nan']} NaN)" if c.get("n_nan") else ""
            row += [fmt(pooled[t].get(m)), ci_text(c.get("mean"), c.get("lo"), c.get("hi")) + nan_note]
        rows.append(row)
    header = ["metric", "pooled @0.5", f"per-{unit} mean [95% CI] @0.5",
              f"pooled @{fmt(thr, 3)}", f"per-{unit} mean [95% CI] @{fmt(thr, 3)}"]
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




# ---------------------------------------------------------------------------------------------------------------


def sort_worst_first(values: np.ndarray, ids: list[str]) -> list[int]:
    """Indices by ascending value (worst Dice first), NaN last, ties by id so the order is stable."""
    return sorted(range(len(ids)), key=lambda i: (not math.isfinite(values[i]), values[i]
                                                  if math.isfinite(values[i]) else 0.0, ids[i]))


def write_report(run_dir: str | Path, split: str = "test") -> Path:
    """Write RUN/report.html and return its path. FileNotFoundError when the split was not evaluated yet."""
    from medtune.atomic import write_text_atomic
    from medtune.data.run_split import use_recorded_image_max
    from medtune.runs.files import load_run_config, read_metrics

    run_dir = Path(run_dir)
    ev = eval_dir(run_dir, split)
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
        *run_head(run_dir, cfg, split, summary, f'{summary.get("n_images", "?")} images', records),
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
