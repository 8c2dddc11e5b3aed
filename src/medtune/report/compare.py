"""`medtune compare RUN_A RUN_B ...`: does B beat A? Per-metric means with CIs per run, and for every run after the
first (the baseline) the paired difference over the same images with its CI, p-value and a verdict.

Pairing is the point: two runs scored on the same test images differ far less from each other than their CIs
suggest, so the test is on per-image differences, and only over images both runs were evaluated on.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from medtune.errors import UserError
from medtune.report import plots
from medtune.report.page import ci_text, esc, eval_dir, fmt, img, page, read_json, read_per_image, table
from medtune.stats import LOWER_IS_BETTER

COMPARE_METRICS = ["dice", "iou", "precision", "recall", "specificity", "auc", "cldice", "betti0_error",
                   "betti1_error", "hd95"]
POOLED_ROW = "pooled dice"
FREE_GENERATION_ROW = "dice (free generation)"
ALPHA = 0.05
N_BOOT = 2000
SEED = 0
MIN_PAIRS_FOR_SIGNIFICANCE = 6


@dataclass(frozen=True)
class Unit:
    """What one paired observation is: an image (the mask tasks) or a video (the video task, whose runs are compared
    over videos: its frames are not independent). Names the evaluation table, the summary blocks and the metrics."""

    noun: str  # "image" / "video"
    table: str  # the per-unit table in RUN/eval/<split>/
    block: str  # summary blocks <block>@t050 / <block>@cal
    metrics: tuple[str, ...]


IMAGES = Unit("image", "per_image.csv", "per_image", tuple(COMPARE_METRICS))
# metrics with a direction only: change_ratio / change_excess are signed, neither sign is "better"
VIDEOS = Unit("video", "per_video.csv", "per_video", ("dice", "jf", "j", "f", "cldice", "precision", "recall",
                                                      "change_error", "flicker"))


@dataclass
class RunEval:
    path: Path
    label: str
    summary: dict
    ids: list[str]
    cols: dict[str, np.ndarray]
    config: dict
    records: list[dict] = field(default_factory=list)
    # text-generating tasks: per-target metrics of free generation (per_image_free_generation.csv), else empty
    free_ids: list[str] = field(default_factory=list)
    free_cols: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Comparison:
    """One metric, one run against the baseline."""

    n: int  # pairs used (both values finite)
    diff: float | None  # mean of (run - baseline)
    lo: float | None
    hi: float | None
    p: float | None
    verdict: str  # better | worse | no significant difference | not testable
    test: str = ""  # why a comparison could not be made
    p_bootstrap: float | None = None


@dataclass
class Row:
    metric: str
    lower_is_better: bool
    per_run: list[dict]  # {mean, lo, hi} for each run
    comparisons: list[Comparison | None]  # one per run after the baseline


def load_run_eval(run: Path, split: str, unit: Unit = IMAGES) -> RunEval:
    from medtune.runs.files import FREE_GENERATION_CSV, read_metrics

    run = Path(run)
    ev = eval_dir(run, split)
    ids, cols = read_per_image(ev / unit.table)
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise UserError(f"{ev / unit.table}: {unit.noun} id(s) listed twice ({', '.join(dup[:5])}); re-run "
                        f"`medtune eval {run} --split {split}`")
    config_path = run / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    free_ids, free_cols = read_per_image(ev / FREE_GENERATION_CSV) if (ev / FREE_GENERATION_CSV).is_file() else ([], {})
    return RunEval(path=run, label=run.name, summary=read_json(ev / "summary.json"), ids=ids, cols=cols,
                   config=config or {}, records=read_metrics(run), free_ids=free_ids, free_cols=free_cols)


def flatten(tree, prefix: str = "") -> dict[str, object]:
    """{"lora": {"r": 8}} -> {"lora.r": 8}; lists stay whole values (a changed channel list is one difference)."""
    out: dict[str, object] = {}
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = tree
    return out


def config_differences(configs: list[dict]) -> list[tuple[str, list]]:
    """[(dotted key, [value per run])] for every key whose value is not the same in all runs ("—": absent)."""
    flat = [flatten(c) for c in configs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    missing = object()
    diffs = []
    for k in keys:
        values = [f.get(k, missing) for f in flat]
        if any(json.dumps(v, sort_keys=True, default=str) != json.dumps(values[0], sort_keys=True, default=str)
               for v in values[1:]) or any(v is missing for v in values):
            diffs.append((k, ["—" if v is missing else v for v in values]))
    return diffs


def eval_settings(e: RunEval, at: str) -> dict[str, object]:
    """The evaluation settings that change a run's per-image metrics: TTA, the sliding-window tiling and, at the
    calibrated threshold, the calibration actually used (the summary records `medtune eval --calibration`).
    eval.bootstrap and eval.sw_batch_size are left out: they change only per-run CIs and batching."""
    flat = flatten(e.config)
    settings = {"eval.tta": flat.get("eval.tta", False),
                "eval.roi_size": flat.get("eval.roi_size") or flat.get("data.patch_size"),
                "eval.overlap": flat.get("eval.overlap")}
    if at == "cal":
        strategy = (e.summary.get("calibration") or {}).get("strategy") or flat.get("eval.calibration")
        settings["eval.calibration"] = strategy
        if strategy == "max_fbeta":
            settings["eval.beta"] = flat.get("eval.beta")
        if strategy == "target_recall":
            settings["eval.target_recall"] = flat.get("eval.target_recall")
    return settings


def eval_mismatch(evals: list[RunEval], at: str) -> str | None:
    """'key (label=value, ...); ...' for every evaluation setting that differs between the runs, else None."""
    settings = [eval_settings(e, at) for e in evals]
    keys = list(dict.fromkeys(k for s in settings for k in s))
    differing = [k for k in keys if len({json.dumps(s.get(k), default=str) for s in settings}) > 1]
    if not differing:
        return None
    return "; ".join(f"{k} (" + ", ".join(f"{e.label}={_value_text(s.get(k, '—'))}" for e, s in zip(evals, settings))
                     + ")" for k in differing)


def paired_test(baseline: np.ndarray, other: np.ndarray, lower_is_better: bool) -> Comparison:
    """Paired comparison of `other` against `baseline` over the same images (NaN pairs dropped by the test).

    medtune.stats.compare_metric calls a difference significant only when the Wilcoxon p < alpha AND the paired
    bootstrap CI excludes 0; its "A better" (A = `other`, passed first so the difference reads other - baseline)
    becomes "better".
    """
    from medtune.stats import compare_metric

    res = compare_metric(other, baseline, alpha=ALPHA, higher_is_better=not lower_is_better, n_boot=N_BOOT,
                         seed=SEED)
    if res["n"] < 2:
        return Comparison(n=int(res["n"]), diff=None, lo=None, hi=None, p=None, verdict="not testable",
                          test=f"{res['n']} finite pair(s)")
    verdict = {"A better": "better", "B better": "worse"}.get(res["verdict"], "no significant difference")
    return Comparison(n=int(res["n"]), diff=_f(res["mean_diff"]), lo=_f(res["lo"]), hi=_f(res["hi"]),
                      p=_f(res["p_wilcoxon"]), verdict=verdict, p_bootstrap=_f(res["p_bootstrap"]))


def _f(v) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _unique_labels(evals: list[RunEval]) -> None:
    seen: dict[str, int] = {}
    for e in evals:
        n = seen.get(e.label, 0)
        seen[e.label] = n + 1
        if n:
            e.label = f"{e.label} ({n + 1})"


def build_rows(evals: list[RunEval], common: list[str], at: str = "cal", unit: Unit = IMAGES) -> list[Row]:
    index = [{sid: k for k, sid in enumerate(e.ids)} for e in evals]
    rows = []
    block = f"{unit.block}@{at}"
    for m in unit.metrics:
        col = f"{m}@{at}"
        if not any(col in e.cols or m in (e.summary.get(block) or {}) for e in evals):
            continue
        per_run = []
        for e in evals:
            c = (e.summary.get(block) or {}).get(m) or {}
            per_run.append({"mean": _f(c.get("mean")), "lo": _f(c.get("lo")), "hi": _f(c.get("hi"))})
        comps: list[Comparison | None] = []
        base = evals[0]
        for j, e in enumerate(evals[1:], start=1):
            if col not in base.cols or col not in e.cols or not common:
                comps.append(Comparison(0, None, None, None, None, "not testable",
                                        f"no common {unit.noun}s" if not common else f"no {col} column"))
                continue
            a = np.array([base.cols[col][index[0][i]] for i in common])
            b = np.array([e.cols[col][index[j][i]] for i in common])
            comps.append(paired_test(a, b, m in LOWER_IS_BETTER))
        rows.append(Row(m, m in LOWER_IS_BETTER, per_run, comps))
    if all(e.free_ids for e in evals):
        rows.append(_free_generation_row(evals, common, at))
    pooled = [{"mean": _f((e.summary.get(f"pooled@{at}") or {}).get("dice")), "lo": None, "hi": None}
              for e in evals]
    # A pooled metric has one value per run, not one per image: nothing to pair, so no test (the per-image Dice
    # row carries the evidence).
    rows.append(Row(POOLED_ROW, False, pooled, [None] * (len(evals) - 1)))
    return rows


def _free_generation_row(evals: list[RunEval], common: list[str], at: str) -> Row:
    """Dice in free generation (what predict does; an answer without [SEG] scored as an empty mask), paired over the
    targets every run was scored on, like the teacher-forced rows."""
    col = f"dice@{at}"
    per_run = []
    for e in evals:
        c = ((e.summary.get("free_generation") or {}).get(f"per_image@{at}") or {}).get("dice") or {}
        per_run.append({"mean": _f(c.get("mean")), "lo": _f(c.get("lo")), "hi": _f(c.get("hi"))})
    index = [{sid: k for k, sid in enumerate(e.free_ids)} for e in evals]
    shared = [i for i in common if all(i in ix for ix in index)]
    comps: list[Comparison | None] = []
    for j, e in enumerate(evals[1:], start=1):
        if not shared or col not in evals[0].free_cols or col not in e.free_cols:
            comps.append(Comparison(0, None, None, None, None, "not testable", f"no free-generation {col}"))
            continue
        a = np.array([evals[0].free_cols[col][index[0][i]] for i in shared])
        b = np.array([e.free_cols[col][index[j][i]] for i in shared])
        comps.append(paired_test(a, b, False))
    return Row(FREE_GENERATION_ROW, False, per_run, comps)


def image_set_notes(evals: list[RunEval], unit: Unit = IMAGES) -> tuple[list[str], list[str]]:
    """(common ids in baseline order, notes) — paired tests use only images (videos) every run was scored on."""
    n = unit.noun
    sets = [set(e.ids) for e in evals]
    common_set = set.intersection(*sets)
    common = [i for i in evals[0].ids if i in common_set]
    notes = []
    if any(s != sets[0] for s in sets[1:]):
        detail = "; ".join(f"{e.label}: {len(e.ids)} {n}s, {len(set(e.ids) - common_set)} not in every run"
                           for e in evals)
        if common:
            notes.append(f"The runs were evaluated on different {n} sets ({detail}). Paired tests use only the "
                         f"{len(common)} {n}s common to all runs; the per-run means and CIs are over each run's "
                         f"own {n}s and are not directly comparable.")
        else:
            notes.append(f"The runs share no evaluated {n} ({detail}): no paired test is possible. Evaluate "
                         "them on the same split (same data and split.json) to compare them.")
    if 0 < len(common) < MIN_PAIRS_FOR_SIGNIFICANCE:
        # exact two-sided Wilcoxon: the smallest possible p with n pairs is 2 / 2**n, above 0.05 for n < 6
        notes.append(f"Only {len(common)} paired {n}(s): the Wilcoxon signed-rank test cannot reach p < {ALPHA} "
                     f"with fewer than {MIN_PAIRS_FOR_SIGNIFICANCE}, so no difference can be called significant. "
                     f"Evaluate on more {n}s (or use `medtune cv`).")
    return common, notes


def _diff_text(c: Comparison | None) -> str:
    if c is None:
        return "—"
    if c.diff is None:
        return c.verdict
    return f"{c.diff:+.4f} [{c.lo:+.4f}, {c.hi:+.4f}]" if c.lo is not None and c.hi is not None else f"{c.diff:+.4f}"


def _p_text(p: float | None) -> str:
    if p is None:
        return "—"
    return "<0.001" if p < 1e-3 else f"{p:.3f}"


def table_cells(evals: list[RunEval], rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    base = evals[0].label
    header = ["metric"] + [f"{e.label} mean [95% CI]" for e in evals]
    for e in evals[1:]:
        header += [f"{e.label} − {base} [95% CI]", "p (Wilcoxon)", "verdict"]
    body = []
    for r in rows:
        cells = [r.metric + (" ↓" if r.lower_is_better else "")]
        cells += [ci_text(v["mean"], v["lo"], v["hi"]) for v in r.per_run]
        for c in r.comparisons:
            cells += [_diff_text(c), _p_text(c.p if c else None), c.verdict if c and c.diff is not None else "—"]
        body.append(cells)
    return header, body


def text_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(w) if k == 0 or k == len(cells) - 1 else str(c).rjust(w)
        for k, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *[line(r) for r in body]])


def _preamble(evals: list[RunEval], common: list[str], split: str, unit: Unit = IMAGES) -> list[str]:
    base = evals[0]
    lines = [f"comparison on split '{split}': baseline {base.label}; paired over {len(common)} common {unit.noun}(s)"]
    lines += [f"  {e.label}: {e.path} (threshold {fmt(e.summary.get('threshold'), 3)}, "
              f"checkpoint {e.summary.get('checkpoint', '?')})" for e in evals]
    return lines


def footnote(unit: Unit = IMAGES) -> str:
    return (f"Per-{unit.noun} metrics at each run's calibrated threshold (fitted on its own validation split), or at "
            f"0.5 when the notes say so. Difference = "
            f"run − baseline, mean over paired {unit.noun}s with a paired-bootstrap 95% CI ({N_BOOT} resamples); "
            f"verdict 'better'/'worse' only when the Wilcoxon signed-rank p < {ALPHA} and the CI excludes 0 "
            "(↓: lower is better). "
            "p-values are per metric, not corrected for testing several metrics.")


FOOTNOTE = footnote(IMAGES)


def _markdown(evals, common, split, header, body, notes, diffs, unit: Unit = IMAGES) -> str:
    def md_row(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    out = [f"# Comparison: {' vs '.join(e.label for e in evals)}", ""]
    out += [f"- {line.strip()}" for line in _preamble(evals, common, split, unit)]
    out += [""] + [f"> **Note:** {n}" for n in notes] + ([""] if notes else [])
    out += [md_row(header), "|" + "---|" + "---:|" * (len(header) - 1)] + [md_row(r) for r in body]
    out += ["", footnote(unit), "", "## Config differences", ""]
    if diffs:
        out += [md_row(["key"] + [e.label for e in evals]), "|---|" + "---|" * len(evals)]
        out += [md_row([k] + [_value_text(v) for v in vals]) for k, vals in diffs]
    else:
        out.append("The configs are identical.")
    return "\n".join(out) + "\n"


def _value_text(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=str)


def _csv(evals: list[RunEval], rows: list[Row]) -> str:
    base = evals[0].label
    header = ["metric", "lower_is_better"]
    for e in evals:
        header += [f"{e.label}:mean", f"{e.label}:lo", f"{e.label}:hi"]
    for e in evals[1:]:
        p = f"{e.label}-{base}"
        header += [f"{p}:n", f"{p}:diff", f"{p}:lo", f"{p}:hi", f"{p}:p_wilcoxon", f"{p}:p_bootstrap",
                   f"{p}:verdict"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    num = lambda v: "" if v is None else repr(float(v))  # noqa: E731  full precision for re-analysis
    for r in rows:
        cells = [r.metric, r.lower_is_better]
        for v in r.per_run:
            cells += [num(v["mean"]), num(v["lo"]), num(v["hi"])]
        for c in r.comparisons:
            cells += [""] * 7 if c is None else [c.n, num(c.diff), num(c.lo), num(c.hi), num(c.p),
                                                 num(c.p_bootstrap), c.verdict]
        w.writerow(cells)
    return buf.getvalue()


def _html(evals, common, split, header, body, rows, notes, diffs, unit: Unit = IMAGES) -> str:
    def curve(key: str):
        series = {}
        for e in evals:
            pts = [(r["step"], r[key]) for r in e.records if key in r and "step" in r]
            if pts:
                series[e.label] = ([p[0] for p in pts], [p[1] for p in pts])
        return plots.line_plot(series, f"{key} (all runs)", "step", key, logy=key == "loss", size=(5.5, 3.4))

    n_base = len(evals)
    cells_html = []
    for r_cells, r in zip(body, rows):
        out = [esc(c) for c in r_cells]
        for j, c in enumerate(r.comparisons):
            k = n_base + 1 + 3 * j + 2  # verdict column of comparison j
            if c is not None and c.diff is not None:
                cls = {"better": "better", "worse": "worse"}.get(c.verdict, "nsd")
                out[k] = f'<span class="{cls}">{esc(c.verdict)}</span>'
        cells_html.append(out)
    parts = [f"<h1>Comparison: {esc(' vs '.join(e.label for e in evals))}</h1>",
             "<ul>" + "".join(f"<li>{esc(line.strip())}</li>" for line in _preamble(evals, common, split, unit))
             + "</ul>"]
    parts += [f'<p class="note">{esc(n)}</p>' for n in notes]
    parts += [table([esc(h) for h in header], cells_html, raw=True), f'<p class="muted">{esc(footnote(unit))}</p>',
              "<h2>Training curves</h2>",
              '<div class="figs">' + img(curve("val_dice"), "validation Dice of all runs")
              + img(curve("loss"), "training loss of all runs") + "</div>", "<h2>Config differences</h2>"]
    if diffs:
        parts.append(table(["key"] + [e.label for e in evals], [[k] + [_value_text(v) for v in vals]
                                                                 for k, vals in diffs], left_cols=len(evals) + 1))
    else:
        parts.append("<p>The configs are identical.</p>")
    return page("medtune compare: " + " vs ".join(e.label for e in evals), "\n".join(parts))


def compare_runs(runs: list[Path], out_dir: Path | None = None, split: str = "test", at: str = "cal",
                 allow_eval_mismatch: bool = False, unit: Unit = IMAGES) -> str:
    """The comparison table as text; with ``out_dir`` also compare.{md,csv,html} there. ``at`` = "cal" (each run's
    calibrated threshold) or "t050" (all runs at 0.5: a policy change is not re-absorbed by re-calibration).
    Runs evaluated with different settings (e.g. one with flip TTA) are refused unless ``allow_eval_mismatch``: the
    difference would mix the evaluation change into the model change. ``unit``: what is paired, images (IMAGES, the
    mask tasks) or videos (VIDEOS, see ``compare_video_runs``)."""
    if at not in ("cal", "t050"):
        raise ValueError(f"threshold must be 'cal' or 't050', got {at!r}")
    if len(runs) < 2:
        raise UserError("compare needs at least two run folders (the first is the baseline)")
    evals = [load_run_eval(Path(r), split, unit) for r in runs]
    _unique_labels(evals)
    mismatch = eval_mismatch(evals, at)
    if mismatch and not allow_eval_mismatch:
        raise ValueError(f"the runs were evaluated with different settings: {mismatch}; re-evaluate them with the same "
                         "settings (the eval section of each run's config.yaml, then `medtune eval RUN`) or pass "
                         "--allow-eval-mismatch")
    common, notes = image_set_notes(evals, unit)
    if mismatch:
        notes.append(f"The runs were evaluated with different settings ({mismatch}): the differences below include "
                     "the effect of the evaluation change, not only of the models.")
    data_keys = ("data.path", "data.layout", "data.synthetic.domain", "data.synthetic.seed")
    flat = [flatten(e.config) for e in evals]
    differing = [k for k in data_keys if len({json.dumps(f.get(k), default=str) for f in flat}) > 1]
    if differing:
        # same ids need not be the same pixels: pairing two data sets by file name would be meaningless
        notes.append(f"The runs read different data ({', '.join(differing)} differ): paired tests assume image "
                     "ids name the same images with the same ground truth in every run; check that they do.")
    rows = build_rows(evals, common, at, unit)
    if at == "t050":
        notes.append("All runs compared at threshold 0.5 (not their calibrated thresholds).")
    header, body = table_cells(evals, rows)
    diffs = config_differences([e.config for e in evals])

    text = "\n".join(_preamble(evals, common, split, unit) + [f"NOTE: {n}" for n in notes]
                     + ["", text_table(header, body), "", footnote(unit)])
    diff_keys = [k for k, _ in diffs if k != "run.name"]
    text += "\nconfig differences: " + (", ".join(
        f"{k} ({' / '.join(_value_text(v) for v in vals)})" for k, vals in diffs if k in diff_keys) or "none")
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "compare.md").write_text(_markdown(evals, common, split, header, body, notes, diffs, unit))
        (out_dir / "compare.csv").write_text(_csv(evals, rows))
        (out_dir / "compare.html").write_text(_html(evals, common, split, header, body, rows, notes, diffs, unit))
        text += f"\nwritten: {out_dir / 'compare.md'}, compare.csv, compare.html"
    return text


def compare_video_runs(runs: list[Path], out_dir: Path | None = None, split: str = "test", at: str = "cal",
                       allow_eval_mismatch: bool = False) -> str:
    """``compare_runs`` for video runs (``medtune.tasks.video_eval`` output): paired over the videos every run was
    evaluated on, per-video Dice, J&F, clDice and temporal stability (change_error, flicker: lower is better)."""
    return compare_runs(runs, out_dir, split, at, allow_eval_mismatch, unit=VIDEOS)
