"""Figures for the HTML reports, returned as ``data:image/png;base64`` URIs so a report is one file that opens offline.

Figures are built on ``matplotlib.figure.Figure`` (Agg canvas), never through pyplot: no global figure state, no GUI
backend, safe to call from anywhere (a training process, a notebook, a headless server).
"""
from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # before anything touches pyplot elsewhere in the process; no display on servers

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

DPI = 90
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]

# Overlay colours (RGB): named in the report's legend, so change both together.
TP_COLOR = (255, 255, 255)  # white
FP_COLOR = (255, 0, 255)  # magenta
FN_COLOR = (0, 230, 0)  # green
OVERLAY_LEGEND = "TP (vessel/lesion found) white · FP (false alarm) magenta · FN (missed) green, over the darkened image"
MAX_OVERLAY_SIDE = 1024


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure_to_data_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return png_data_uri(buf.getvalue())


def array_to_data_uri(rgb: np.ndarray) -> str:
    """uint8 [H,W,3] (or [H,W]) -> PNG data URI, through PIL (no matplotlib: pixel-exact and faster)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", optimize=False)
    return png_data_uri(buf.getvalue())


def _finite_xy(xs: Sequence, ys: Sequence) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(xs, dtype=float)
    y = np.asarray([np.nan if v is None else v for v in ys], dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def line_plot(series: dict[str, tuple[Sequence, Sequence]], title: str, xlabel: str, ylabel: str,
              logy: bool = False, size: tuple[float, float] = (5.0, 3.0)) -> str | None:
    """One axes, one line per series ({label: (x, y)}); None when no series has a finite point."""
    cleaned = {label: _finite_xy(x, y) for label, (x, y) in series.items()}
    cleaned = {k: v for k, v in cleaned.items() if len(v[0])}
    if not cleaned:
        return None
    fig = Figure(figsize=size)
    ax = fig.subplots()
    for n, (label, (x, y)) in enumerate(cleaned.items()):
        # Sparse series (validation every N steps) get markers, or a single evaluation would be invisible.
        ax.plot(x, y, label=label, color=COLORS[n % len(COLORS)], lw=1.3, marker="o" if len(x) <= 30 else None, ms=3)
    if logy and all((v[1] > 0).all() for v in cleaned.values()):
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(cleaned) > 1:
        ax.legend(fontsize=7)
    return figure_to_data_uri(fig)


def over_time_plot(series: dict[str, tuple[Sequence, Sequence]], title: str, ylabel: str,
                   marks: dict[str, Sequence] | None = None, ylim: tuple[float, float] | None = None,
                   size: tuple[float, float] = (6.0, 3.2)) -> str | None:
    """A value against the frame index, one line per video ({label: (frames, values)}, NaN where undefined). Every
    defined value is a dot on its line; ``marks`` ({label: frames}, e.g. the annotated frames) are ticks in the
    line's colour along the bottom, so frames that carry ground truth show even where the value is undefined (an
    empty mask has no Dice). None when nothing is finite."""
    cleaned = {label: _finite_xy(x, y) for label, (x, y) in series.items()}
    if not any(len(x) for x, _ in cleaned.values()):
        return None
    fig = Figure(figsize=size)
    ax = fig.subplots()
    for n, (label, (x, y)) in enumerate(cleaned.items()):
        color = COLORS[n % len(COLORS)]
        ax.plot(x, y, label=label, color=color, lw=1.2, marker="o", ms=2.5)
        ticks = np.asarray((marks or {}).get(label, []), dtype=float)
        if ticks.size:
            # x in data units, y in axes units: the ticks sit on the bottom edge whatever the value range
            ax.plot(ticks, np.full(ticks.size, 0.02), ls="", marker="|", ms=6, color=color, alpha=0.7,
                    transform=ax.get_xaxis_transform())
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("frame")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(cleaned) > 1:
        # outside the axes: up to 8 crossing lines leave no free corner
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure_to_data_uri(fig)


def threshold_plot(curve: dict, chosen: float) -> str | None:
    """Dice / precision / recall against threshold (validation), with the calibrated threshold marked."""
    thr = curve.get("thresholds")
    if not thr:
        return None
    fig = Figure(figsize=(5.0, 3.2))
    ax = fig.subplots()
    for n, key in enumerate(("dice", "precision", "recall")):
        if curve.get(key):
            x, y = _finite_xy(thr, curve[key])
            ax.plot(x, y, label=key, color=COLORS[n], lw=1.5 if key == "dice" else 1.0)
    ax.axvline(chosen, color="black", ls="--", lw=1, label=f"chosen {chosen:.3f}")
    ax.axvline(0.5, color="grey", ls=":", lw=1, label="0.5")
    ax.set_xlabel("threshold")
    ax.set_ylabel("value (validation)")
    ax.set_ylim(0, 1.02)
    ax.set_title("threshold calibration (fitted on val)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return figure_to_data_uri(fig)


def pr_plot(recall: np.ndarray, precision: np.ndarray, ap: float, points: dict[str, tuple[float, float]]) -> str:
    """PR curve with operating points ({label: (recall, precision)}) marked."""
    fig = Figure(figsize=(4.2, 3.6))
    ax = fig.subplots()
    ax.plot(recall, precision, color=COLORS[0], lw=1.5, label=f"AP {ap:.4f}")
    for n, (label, (r, p)) in enumerate(points.items()):
        if math.isfinite(r) and math.isfinite(p):
            ax.plot([r], [p], marker="o", ls="", color=COLORS[n + 1], label=label)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.01)
    ax.set_title("precision-recall (pixels in FOV, pooled)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return figure_to_data_uri(fig)


class _Uint8Probs(Sequence):
    """uint8 maps seen as float64 probabilities one at a time, so a large test set is never all in float at once."""

    def __init__(self, maps: list[np.ndarray]):
        self.maps = maps

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, i):
        return self.maps[i].astype(np.float64) / 255.0


def pr_curve_from_uint8(probs_u8: list[np.ndarray], gts: list[np.ndarray], fovs: list[np.ndarray]) -> dict:
    """Pooled PR curve over FOV pixels for the stored 8-bit maps (probs.npz), exact: the 256-point grid of
    medtune.calibration.pr_curve is the set of levels k/255 (np.linspace(0, 1, 256) never exceeds k/255.0, so a
    pixel at level k is foreground at threshold k, as `prob >= threshold` requires).

    Returns {thresholds (descending), precision, recall, ap, n_pos, n_neg}.
    """
    from medtune.calibration import pr_curve

    return pr_curve(_Uint8Probs(list(probs_u8)), list(gts), list(fovs), n_thresholds=256)


def to_display_rgb(image: np.ndarray) -> np.ndarray:
    """float [C,H,W] in [0,1] (C = 1 or 3) -> float [H,W,3]."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = img[None]
    if img.shape[0] == 1:
        img = np.repeat(img, 3, axis=0)
    return np.clip(img[:3].transpose(1, 2, 0), 0.0, 1.0)


def overlay(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, fov: np.ndarray | None = None,
            darken: float = 0.45) -> np.ndarray:
    """uint8 [H,W,3]: TP / FP / FN coloured (see OVERLAY_LEGEND) over the darkened image; outside the FOV darker
    still, since pixels there are not scored."""
    rgb = to_display_rgb(image) * darken
    if fov is not None:
        rgb[~fov.astype(bool)] *= 0.4
    out = (rgb * 255).astype(np.uint8)
    gt, pred = gt.astype(bool), pred.astype(bool)
    scored = fov.astype(bool) if fov is not None else np.ones_like(gt)
    out[gt & pred & scored] = TP_COLOR
    out[~gt & pred & scored] = FP_COLOR
    out[gt & ~pred & scored] = FN_COLOR
    h, w = out.shape[:2]
    if max(h, w) > MAX_OVERLAY_SIDE:
        s = MAX_OVERLAY_SIDE / max(h, w)
        # BOX averages, so one-pixel vessels fade instead of vanishing as with nearest-neighbour subsampling
        out = np.asarray(Image.fromarray(out).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BOX))
    return out
