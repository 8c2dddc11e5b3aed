"""Synthetic X-ray angiography runs: a coronary-like vessel tree filling with contrast, moving with the heart.

A run starts with no contrast; from the first frame on, contrast flows from the catheter tip down the tree (a front
advancing along the vessels' path length from the tip), so the opacified part, which is the mask, grows over the
first ``fill_frames`` frames and then stays full. The heart moves the tree periodically (contraction towards the
heart's centre, a twist, a translation and a smooth non-rigid deformation, all driven by one cardiac phase) plus a
slow respiratory drift; the background (ribs, soft tissue) stands still; every frame has its own quantum noise. The
catheter is drawn but is not vessel: it is not in the mask.

The tree itself is the retina generator's (``synthetic.grow_tree``), grown from the catheter tip towards the heart;
dark vessels on a bright background, as angiograms show them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from medtune.data.layouts import VIDEO_FRAME_DIR, VIDEO_MASK_DIR
from medtune.data.synthetic import grow_tree, render_coverage

# Share of the image the full vessel tree covers (drawn from this range per run)
_TREE_AREA = (0.05, 0.08)
# Vessel calibre relative to the retina generator's trunks (coronary trunks are a few pixels wide at 64-128 px)
_WIDTH_SCALE = 0.6
# Frames of one heart beat and of one breath
_BEAT_FRAMES = (8.0, 12.0)
_BREATH_FRAMES = 60.0
# Motion amplitudes, as fractions of the image side (contraction as a fraction of the distance to the heart centre)
_CONTRACTION = 0.08
_TWIST_RAD = 0.06
_BEAT_SHIFT = 0.03
_DEFORM = 0.025
_BREATH_SHIFT = 0.015
# Appearance: background level and texture, vessel and catheter darkening, quantum noise
_BACKGROUND = (0.6, 0.8)
_TEXTURE = 0.12
_CONTRAST = (0.35, 0.5)
_CATHETER_CONTRAST = 0.3
_CATHETER_WIDTH = 1.2
_NOISE = (0.015, 0.03)
_VESSEL_BLUR = 0.6


def _arrival(vessels: list[tuple[np.ndarray, np.ndarray]], tip: np.ndarray) -> list[np.ndarray]:
    """Path length from the catheter tip to every centre-line point: a branch starts where its parent's point is
    (grow_tree starts children on a point of an earlier vessel), a root at the tip."""
    known_pts, known_arrival, out = np.zeros((0, 2)), np.zeros(0), []
    for pts, _ in vessels:
        d = np.hypot(*(known_pts - pts[0]).T) if len(known_pts) else np.array([np.inf])
        start = float(known_arrival[int(np.argmin(d))]) if d.min() < 1e-6 else float(np.hypot(*(pts[0] - tip)))
        along = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(pts, axis=0).T))])
        out.append(start + along)
        known_pts, known_arrival = np.concatenate([known_pts, pts]), np.concatenate([known_arrival, out[-1]])
    return out


def _opacified(vessels, arrivals, front: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """The parts of the vessels the contrast front has reached, cut at the front."""
    out = []
    for (pts, widths), arrival in zip(vessels, arrivals):
        reached = int(np.searchsorted(arrival, front, side="right"))
        if reached == 0:
            continue
        p, w = pts[:reached], widths[:reached]
        if reached < len(pts) and arrival[reached] > arrival[reached - 1]:
            f = (front - arrival[reached - 1]) / (arrival[reached] - arrival[reached - 1])
            p = np.concatenate([p, [pts[reached - 1] + f * (pts[reached] - pts[reached - 1])]])
            w = np.concatenate([w, [widths[reached - 1]]])
        if len(p) >= 2:
            out.append((p, w))
    return out


class _Motion:
    """Where a point of the tree is in frame t: one cardiac phase drives contraction, twist, shift and a smooth
    deformation; breathing adds a slow drift."""

    def __init__(self, rng: np.random.Generator, size: int):
        self.size = size
        self.heart = np.array([0.55, 0.6]) * size + rng.normal(0, 0.03 * size, 2)
        self.beat = rng.uniform(*_BEAT_FRAMES)
        self.phase = rng.uniform(0, 2 * np.pi)
        self.shift = rng.normal(0, 1, 2)
        self.shift *= _BEAT_SHIFT * size / max(1e-6, float(np.hypot(*self.shift)))
        self.freq = rng.uniform(0.5, 1.5, 2)
        self.wave_phase = rng.uniform(0, 2 * np.pi, 2)
        self.breath_dir = rng.normal(0, 1, 2)
        self.breath_dir /= max(1e-6, float(np.hypot(*self.breath_dir)))

    def __call__(self, pts: np.ndarray, t: int) -> np.ndarray:
        b = 0.5 * (1.0 - np.cos(2 * np.pi * t / self.beat + self.phase))  # 0 relaxed .. 1 contracted
        q = (pts - self.heart) * (1.0 - _CONTRACTION * b)
        a = _TWIST_RAD * b
        q = q @ np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
        wave = np.stack([np.sin(2 * np.pi * self.freq[0] * pts[:, 1] / self.size + self.wave_phase[0]),
                         np.sin(2 * np.pi * self.freq[1] * pts[:, 0] / self.size + self.wave_phase[1])], axis=1)
        breath = _BREATH_SHIFT * self.size * np.sin(2 * np.pi * t / _BREATH_FRAMES) * self.breath_dir
        return self.heart + q + b * (self.shift + _DEFORM * self.size * wave) + breath


def synthetic_angiography_run(seed: int, n_frames: int = 24, size: int = 64, fill_frames: int | None = None,
                              ) -> tuple[np.ndarray, np.ndarray]:
    """-> (frames float32 [T, H, W] in [0, 1], masks uint8 [T, H, W] in {0, 1}: the opacified vessels of every
    frame); a pure function of its arguments. Contrast fills the tree over ``fill_frames`` frames (default a third
    of the run, at least 2): frame 0 shows none, the mask grows until then."""
    if size < 32:
        raise ValueError(f"synthetic angiography size {size} is too small for a vessel tree; use >= 32")
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    rng = np.random.default_rng([int(seed), 20250215])
    fill = fill_frames if fill_frames is not None else max(2, n_frames // 3)
    tip = np.array([rng.uniform(0.15, 0.35), rng.uniform(0.1, 0.25)]) * size  # catheter tip: the ostium
    centre = np.array([0.55, 0.6]) * size
    vessels = grow_tree(rng, size, centre, 0.75 * size, tip, _WIDTH_SCALE, rng.uniform(*_TREE_AREA) * size * size)
    arrivals = _arrival(vessels, tip)
    total = max(float(a[-1]) for a in arrivals)
    catheter = np.stack([np.linspace(tip[0] - 0.1 * size, tip[0], 8), np.linspace(-2.0, tip[1], 8)], axis=1)
    motion = _Motion(rng, size)

    texture = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), sigma=size / 10)
    texture /= max(1e-6, float(np.abs(texture).max()))
    background = rng.uniform(*_BACKGROUND) + _TEXTURE * texture
    contrast, noise = rng.uniform(*_CONTRAST), rng.uniform(*_NOISE)

    frames = np.empty((n_frames, size, size), dtype=np.float32)
    masks = np.empty((n_frames, size, size), dtype=np.uint8)
    for t in range(n_frames):
        front = total * min(1.0, t / fill)
        moved = [(motion(p, t), w) for p, w in _opacified(vessels, arrivals, front)]
        coverage = render_coverage(moved, size) if moved else np.zeros((size, size), np.float32)
        tube = render_coverage([(motion(catheter, t), np.full(len(catheter), _CATHETER_WIDTH))], size)
        darkening = contrast * ndimage.gaussian_filter(coverage, _VESSEL_BLUR) + _CATHETER_CONTRAST * tube
        image = background * (1.0 - np.clip(darkening, 0.0, 0.9)) + rng.normal(0, noise, (size, size))
        frames[t] = np.clip(image, 0.0, 1.0)
        masks[t] = coverage >= 0.5
    return frames, masks


def write_synthetic_video_dataset(root: str | Path, n_videos: int = 4, n_frames: int = 24, size: int = 64,
                                  annotate_every: int = 4, seed: int = 0) -> Path:
    """Write ``n_videos`` runs in the ``video_frames`` layout: ``root/JPEGImages/run000/00000.png`` ... (8-bit grey)
    and ``root/Annotations/run000/<frame>.png`` (0/255) for every ``annotate_every``-th frame from frame 0 (sparse
    annotation, as in the clinic). Run i is ``synthetic_angiography_run(seed * 1000 + i, ...)``: the same for any
    ``n_videos``. -> root."""
    root = Path(root)
    if annotate_every < 1:
        raise ValueError(f"annotate_every must be >= 1, got {annotate_every}")
    for i in range(n_videos):
        frames, masks = synthetic_angiography_run(seed * 1000 + i, n_frames, size)
        name = f"run{i:03d}"
        frame_dir, mask_dir = root / VIDEO_FRAME_DIR / name, root / VIDEO_MASK_DIR / name
        frame_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for t in range(n_frames):
            Image.fromarray((frames[t] * 255.0 + 0.5).astype(np.uint8), "L").save(frame_dir / f"{t:05d}.png",
                                                                                 compress_level=1)
            if t % annotate_every == 0:
                Image.fromarray(masks[t] * 255, "L").save(mask_dir / f"{t:05d}.png", compress_level=1)
    return root
