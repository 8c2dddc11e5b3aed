"""The pieces every medtune HTML page shares (mask report, answer report, comparison): escaping, number formatting,
tables, figures as data: URIs, the page shell with its inline CSS, reading an evaluation folder, training curves and
the preflight section. No page of its own: ``html.py`` (masks), ``answers.py`` and ``compare.py`` build the pages."""
from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path

import numpy as np

from medtune.errors import MissingFileError, UserError
from medtune.report import plots

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


def read_metric_csv(path: Path, required: tuple[str, ...] = ("id",)) -> tuple[list[dict], list[str]]:
    """An evaluation CSV (per_image.csv, per_frame.csv) -> (rows as dicts, its columns other than 'id'); a missing file
    or column is one line naming what to run."""
    if not path.is_file():
        raise MissingFileError(f"{path} not found: run `medtune eval {path.parents[2]} --split {path.parent.name}`")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        fields = [c for c in (reader.fieldnames or []) if c != "id"]
    missing = [c for c in required if rows and c not in rows[0]]
    if missing:
        raise UserError(f"{path}: no {' / '.join(repr(c) for c in missing)} column; re-run `medtune eval`")
    return rows, fields


def metric_column(rows: list[dict], column: str) -> np.ndarray:
    """One CSV column as floats; empty cells and 'nan' become NaN."""

    def num(text) -> float:
        try:
            return float(text)
        except (TypeError, ValueError):
            return float("nan")

    return np.array([num(r.get(column)) for r in rows], dtype=float)


def read_per_image(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """per_image.csv -> (ids, {column: float array}); empty cells and 'nan' become NaN."""
    rows, fields = read_metric_csv(path)
    return [r["id"] for r in rows], {c: metric_column(rows, c) for c in fields}


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


def preflight_section(pre: dict | None) -> str:
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
