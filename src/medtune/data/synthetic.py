"""The embedded default data set: procedural retina-like vessel images (``medtune demo``, ``data.layout=synthetic``).

Each image is a circular field of view on a dark border with an optic disc, a darker macula, vignetting, a slow
illumination gradient and noise, crossed by a branching vessel tree grown from 2-3 roots at the disc. The tree is
drawn as tapered poly-lines on a 4x supersampled canvas: the area average gives anti-aliased coverage (the mask is
coverage >= 0.5) and a blurred copy gives the soft, dark-centred vessel profile seen in fundus photographs.

Branches are added widest-first until the summed area reaches a per-image target, which is what keeps the foreground
fraction inside the FOV within 5-12 % for every seed instead of only on average.

Two sites: "A" (bright reddish fundus, good contrast, moderate noise) and "B" (another camera: duller yellow-grey
colour balance, much lower vessel contrast, stronger blur and noise, a steeper illumination gradient, slightly thinner
vessels). A model trained on A loses accuracy on B, leaving an adaptation (LoRA) run something to recover.
"""
from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from medtune.config import SyntheticCfg

SUPERSAMPLE = 4
STEP_PX = 2.0  # poly-line step along a vessel, native pixels


@dataclass(frozen=True)
class Domain:
    colour: tuple[float, float, float]  # fundus background RGB at full illumination
    brightness: tuple[float, float]
    contrast: tuple[float, float]  # fractional darkening at a vessel centre (green channel)
    channel_contrast: tuple[float, float, float]  # per-channel share of that darkening (green shows vessels best)
    noise: tuple[float, float]  # pixel noise sigma
    blur: tuple[float, float]  # optical blur sigma (native px)
    gradient: tuple[float, float]  # strength of the linear illumination gradient across the FOV
    vignette: tuple[float, float]  # brightness lost at the FOV rim
    width_scale: float  # vessel calibre relative to site A
    disc_gain: float  # optic disc brightness


DOMAINS: dict[str, Domain] = {
    "A": Domain(colour=(0.92, 0.45, 0.22), brightness=(0.85, 1.0), contrast=(0.38, 0.55),
                channel_contrast=(0.55, 1.0, 0.8), noise=(0.015, 0.03), blur=(0.3, 0.5), gradient=(0.05, 0.15),
                vignette=(0.25, 0.4), width_scale=1.0, disc_gain=0.45),
    "B": Domain(colour=(0.62, 0.58, 0.40), brightness=(0.65, 0.85), contrast=(0.14, 0.24),
                channel_contrast=(0.8, 1.0, 0.9), noise=(0.035, 0.055), blur=(0.8, 1.1), gradient=(0.25, 0.4),
                vignette=(0.35, 0.5), width_scale=0.85, disc_gain=0.3),
}


# ---- geometry -----------------------------------------------------------------------------------------------------
def grow_tree(rng: np.random.Generator, size: int, centre: np.ndarray, radius: float, disc: np.ndarray,
               width_scale: float, target_area: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Vessel centre lines as [(points [N,2] (x,y), widths [N])], grown widest-first until ~target_area px^2."""
    w_root = 6.0 * width_scale * np.sqrt(size / 128.0)  # calibre grows slower than the image (more, finer branches)
    seg_len = (0.14, 0.28)  # of the image size
    # Roots leave the disc towards the FOV centre's side: upper and lower arcades, sometimes a nasal one.
    towards = np.arctan2(*(centre - disc)[::-1])
    n_roots = int(rng.integers(2, 4))
    base_angles = [towards - 1.1, towards + 1.1, towards + np.pi][:n_roots]
    queue: list[tuple[float, np.ndarray, float, float, int]] = []  # (width, start, angle, curvature, depth)
    for a in base_angles:
        queue.append((w_root * rng.uniform(0.85, 1.0), disc + rng.normal(0, 1.0, 2), a + rng.normal(0, 0.2),
                      rng.choice([-1.0, 1.0]) * rng.uniform(0.01, 0.03), 0))
    vessels: list[tuple[np.ndarray, np.ndarray]] = []
    area = 0.0
    max_segments = 400
    while area < target_area and len(vessels) < max_segments:
        if not queue:
            # Every branch left the FOV before the tree was dense enough: another vessel leaves the disc.
            queue.append((w_root * rng.uniform(0.5, 0.8), disc + rng.normal(0, 1.0, 2), rng.uniform(0, 2 * np.pi),
                          rng.normal(0, 0.03), 1))
        queue.sort(key=lambda item: -item[0])  # widest first: the trunks exist before the capillary detail
        width, start, angle, curve, depth = queue.pop(0)
        length = size * rng.uniform(*seg_len) * (0.6 + 0.4 * min(1.0, width / w_root))
        n = max(2, int(length / STEP_PX))
        pts = [start]
        widths = np.linspace(width, max(1.0, width * 0.85), n)
        a = angle
        for _ in range(n - 1):
            a += curve + rng.normal(0, 0.08)
            p = pts[-1] + STEP_PX * np.array([np.cos(a), np.sin(a)])
            if np.hypot(*(p - centre)) > radius * 1.02:
                break
            pts.append(p)
        if len(pts) < 2:
            continue
        pts_arr = np.asarray(pts)
        widths = widths[: len(pts_arr)]
        vessels.append((pts_arr, widths))
        area += float(np.sum(widths[:-1]) * STEP_PX)
        if len(pts_arr) < n:  # left the FOV: a vessel does not branch outside the picture
            continue
        w_end = widths[-1]
        # Asymmetric bifurcation (Murray-like): one child nearly keeps the calibre, the other is thinner.
        for frac, side in ((rng.uniform(0.75, 0.92), 1.0), (rng.uniform(0.55, 0.78), -1.0)):
            w_child = w_end * frac
            if w_child < 0.9:
                continue
            side = side * rng.choice([-1.0, 1.0]) if depth > 1 else side
            queue.append((max(1.0, w_child), pts_arr[-1], a + side * rng.uniform(0.25, 0.7),
                          rng.normal(0, 0.03), depth + 1))
        # Side branches leave the trunk partway along a segment, as small retinal vessels do.
        if w_end > 2.0 and rng.random() < 0.6:
            k = int(rng.integers(1, len(pts_arr) - 1))
            queue.append((max(1.0, widths[k] * rng.uniform(0.35, 0.55)), pts_arr[k],
                          a + rng.choice([-1.0, 1.0]) * rng.uniform(0.7, 1.3), rng.normal(0, 0.03), depth + 1))
    return vessels


def render_coverage(vessels: list[tuple[np.ndarray, np.ndarray]], size: int) -> np.ndarray:
    """Anti-aliased vessel coverage in [0,1] at native resolution (area average of a supersampled drawing)."""
    ss = SUPERSAMPLE
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    for pts, widths in vessels:
        p = (pts + 0.5) * ss - 0.5  # pixel centres of the native grid map to supersampled pixel centres
        for i in range(len(p) - 1):
            w = widths[i] * ss
            draw.line([tuple(p[i]), tuple(p[i + 1])], fill=255, width=max(1, int(round(w))))
            r = w / 2.0
            x, y = p[i + 1]
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)  # round joints: no notches where the line bends
    arr = np.asarray(canvas, dtype=np.float32).reshape(size, ss, size, ss).mean(axis=(1, 3))
    return arr / 255.0


# ---- appearance ---------------------------------------------------------------------------------------------------
def generate_image(rng: np.random.Generator, size: int, domain: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (image uint8 [H,W,3], vessel mask uint8 [H,W] in {0,255}, FOV uint8 [H,W] in {0,255}); pure in ``rng``."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {domain!r}; valid: {', '.join(DOMAINS)}")
    if size < 32:
        raise ValueError(f"synthetic image size {size} is too small for a vessel tree; use >= 32")
    d = DOMAINS[domain]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = np.array([size / 2 - 0.5, size / 2 - 0.5]) + rng.normal(0, 0.01 * size, 2)
    radius = size * rng.uniform(0.44, 0.48)
    rr = np.hypot(xx - centre[0], yy - centre[1]) / radius
    fov = rr <= 1.0

    side = rng.choice([-1.0, 1.0])
    disc = centre + np.array([side * radius * rng.uniform(0.45, 0.6), rng.normal(0, 0.05 * radius)])
    macula = centre + np.array([-side * radius * rng.uniform(0.1, 0.25), rng.normal(0, 0.05 * radius)])

    fov_area = float(fov.sum())
    target = rng.uniform(0.075, 0.105) * fov_area
    vessels = grow_tree(rng, size, centre, radius, disc, d.width_scale, target)
    coverage = render_coverage(vessels, size) * fov
    mask = (coverage >= 0.5) & fov

    # Illumination: vignetting towards the rim, a linear gradient (uneven flash), a bright disc, a darker macula,
    # and low-frequency texture of the choroid.
    illum = 1.0 - rng.uniform(*d.vignette) * np.clip(rr, 0, 1) ** 2
    g_angle = rng.uniform(0, 2 * np.pi)
    illum += rng.uniform(*d.gradient) * ((xx - centre[0]) * np.cos(g_angle) + (yy - centre[1]) * np.sin(g_angle)) / size
    disc_r = radius * rng.uniform(0.12, 0.16)
    illum += d.disc_gain * np.exp(-(((xx - disc[0]) ** 2 + (yy - disc[1]) ** 2) / (2 * disc_r**2)))
    mac_r = radius * rng.uniform(0.15, 0.22)
    illum -= 0.15 * np.exp(-(((xx - macula[0]) ** 2 + (yy - macula[1]) ** 2) / (2 * mac_r**2)))
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)).astype(np.float32), sigma=size / 24)
    illum *= 1.0 + 0.06 * texture / max(1e-6, float(np.abs(texture).max()))
    illum *= rng.uniform(*d.brightness)

    colour = np.asarray(d.colour, np.float32) * rng.uniform(0.92, 1.08, 3).astype(np.float32)
    background = illum[..., None] * colour[None, None, :]

    # Soft vessel profile: darkest on the centre line, fading over ~1 px; thin vessels get less contrast, as in
    # real photographs where capillaries blur into the background.
    profile = ndimage.gaussian_filter(coverage, sigma=0.7)
    contrast = rng.uniform(*d.contrast)
    darkening = contrast * profile[..., None] * np.asarray(d.channel_contrast, np.float32)[None, None, :]
    image = background * (1.0 - darkening)

    image = ndimage.gaussian_filter(image, sigma=(rng.uniform(*d.blur),) * 2 + (0,))
    image += rng.normal(0, rng.uniform(*d.noise), image.shape).astype(np.float32)
    image = np.where(fov[..., None], image, 0.02 + rng.normal(0, 0.005, image.shape))
    image_u8 = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return image_u8, mask.astype(np.uint8) * 255, fov.astype(np.uint8) * 255


# ---- data set folder ---------------------------------------------------------------------------------------------
_DOMAIN_SEED = {"A": 0, "B": 1}


def _image_rng(cfg: SyntheticCfg, index: int) -> np.random.Generator:
    # Seeded per image and per domain: image i does not depend on n_images, and site B's trees are not site A's.
    return np.random.default_rng([cfg.seed, index, _DOMAIN_SEED[cfg.domain], 20240917])


def _names(cfg: SyntheticCfg) -> list[str]:
    return [f"synth{i:04d}.png" for i in range(cfg.n_images)]


def _complete(folder: Path, cfg: SyntheticCfg) -> bool:
    return all((folder / sub / name).is_file() for sub in ("images", "masks", "fov") for name in _names(cfg))


def ensure_dataset(cfg: SyntheticCfg, root: Path) -> Path:
    """Write ``root/<domain>-n<n>-s<size>-seed<seed>/{images,masks,fov}/synthNNNN.png`` unless already complete;
    -> that folder. Written to a temporary sibling and renamed, so an interrupted run or a second process generating
    concurrently never leaves (or reads) a half-written set."""
    root = Path(root).expanduser()
    folder = root / f"{cfg.domain}-n{cfg.n_images}-s{cfg.size}-seed{cfg.seed}"
    if _complete(folder, cfg):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for sub in ("images", "masks", "fov"):
            (tmp / sub).mkdir(parents=True)
        for i, name in enumerate(_names(cfg)):
            image, mask, fov = generate_image(_image_rng(cfg, i), cfg.size, cfg.domain)
            Image.fromarray(image, "RGB").save(tmp / "images" / name, compress_level=1)
            Image.fromarray(mask, "L").save(tmp / "masks" / name, compress_level=1)
            Image.fromarray(fov, "L").save(tmp / "fov" / name, compress_level=1)
        if folder.exists() and not _complete(folder, cfg):
            shutil.rmtree(folder, ignore_errors=True)  # a stale partial set (files deleted by hand): replace it
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _complete(folder, cfg):  # not a concurrent writer that finished first: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
