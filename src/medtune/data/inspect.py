"""A data-set health report before training: counts, sizes, foreground, FOV, every problem, near-duplicates."""
from __future__ import annotations

import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from medtune.config import DataCfg
from medtune.data.io import dataset_image_max, read_image
from medtune.data.layouts import scan
from medtune.data.loading import load_sample
from medtune.data.splits import SPLIT_NAMES, _UnionFind, check_split
from medtune.data.types import DataError, LoadedSample, Sample
from medtune.threads import usable_cores

# Rows of the pairwise Hamming-distance matrix computed at once: bounds memory to ~chunk × n bytes.
_HASH_CHUNK = 1024
# JPEG files are hashed from a reduced DCT decode (Image.draft) with at least this side: on 100 BUSI images saved as
# JPEG, 1-2 of the 64 bits differed from the full decode for 5 of them (at 64 px: up to 4 bits), for a 5x faster
# read (bench/phash_files.py).
_DRAFT_SIDE = 256
# PIL modes whose grey level PIL computes as read_image does (8-bit, BT.601 luma, alpha dropped).
_HASHED_AS_IS = frozenset({"L", "RGB", "RGBA", "RGBX"})
_HASH_FILES_PER_TASK = 16
# Above this share of annotated foreground outside the FOV, the FOV hides part of what is to be found.
_OUTSIDE_FOV_WARN = 0.01


def phash64(image: np.ndarray) -> int:
    """64-bit perceptual hash of a [C,H,W] or [H,W] float image in [0, 1], on its grey level."""
    grey = image.mean(axis=0) if image.ndim == 3 else image
    pil = Image.fromarray(np.clip(grey * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return _bits64(imagehash.phash(pil))


def _bits64(h) -> int:
    return int(np.packbits(h.hash.flatten().astype(np.uint8)).view(">u8")[0])


def file_phash64(path: Path) -> int:
    """``phash64`` of an image file's grey level, read for the hash only: 8-bit grey / colour files through PIL's
    own integer BT.601 luma (the weights ``read_image`` uses; no float copy of the image), JPEG decoded at a reduced
    DCT scale (``Image.draft``: 1/2 to 1/8, no side below ``_DRAFT_SIDE``). Everything else (wider than 8
    bits, palette, DICOM, gzip, scientific TIFF, a broken file) through ``read_image``, which names the file."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            if img.mode in _HASHED_AS_IS:
                img.draft("L", (_DRAFT_SIDE, _DRAFT_SIDE))  # JPEG only; other formats ignore it
                return _bits64(imagehash.phash(img.convert("L")))
    except Exception:  # noqa: BLE001 - read_image below decides, and names the file if it cannot read it
        pass
    return phash64(read_image(path, channels=1))


def pairs_within(ids: list[str], hashes: np.ndarray, max_distance: int) -> list[tuple[str, str, int]]:
    """Every pair of 64-bit hashes within ``max_distance`` Hamming distance, as (id_a, id_b, distance), a < b."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    pairs: list[tuple[str, str, int]] = []
    for start in range(0, len(hashes), _HASH_CHUNK):
        block = hashes[start:start + _HASH_CHUNK]
        dist = np.bitwise_count(block[:, None] ^ hashes[None, :])
        rows, cols = np.nonzero(dist <= max_distance)
        for r, c in zip(rows.tolist(), cols.tolist()):
            i = start + r
            if i < c:
                a, b = sorted((ids[i], ids[c]))
                pairs.append((a, b, int(dist[r, c])))
    return sorted(pairs, key=lambda p: (p[2], p[0], p[1]))


def find_near_duplicates(
    samples: list[LoadedSample] | list[Sample], max_distance: int = 4
) -> list[tuple[str, str, int]]:
    """Near-duplicate image pairs (id_a, id_b, phash Hamming distance <= max_distance), closest first. Files are
    hashed by ``file_phash64`` on the usable cores (PIL decodes without the GIL), holding one image per thread."""
    ids = [s.id for s in samples]
    files = [s.image for s in samples if not isinstance(s, LoadedSample)]
    if len(files) < len(samples):
        hashes = [phash64(s.image) if isinstance(s, LoadedSample) else file_phash64(s.image) for s in samples]
    else:  # several samples of one file (questions about one image) hash it once
        unique = list(dict.fromkeys(files))
        with ThreadPoolExecutor(max_workers=usable_cores()["cores"]) as pool:
            by_file = dict(zip(unique, pool.map(file_phash64, unique, chunksize=_HASH_FILES_PER_TASK)))
        hashes = [by_file[f] for f in files]
    return pairs_within(ids, np.array(hashes, dtype=np.uint64), max_distance)


def duplicate_groups(pairs: list[tuple[str, str, int]]) -> dict[str, str]:
    """{id: group id} for every id in a near-duplicate pair: connected components, named by their smallest id."""
    ids = sorted({i for a, b, _ in pairs for i in (a, b)})
    uf = _UnionFind(ids)
    for a, b, _ in pairs:
        uf.union(a, b)
    return {i: f"dup:{uf.find(i)}" for i in ids}


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "min": float(arr.min()), "median": float(np.median(arr)),
            "max": float(arr.max())}


def inspect_dataset(cfg: DataCfg, split: dict[str, list[str]] | None = None) -> dict:
    """Health report of the data set ``cfg`` points at; never raises for data problems, it lists them all."""
    started = time.perf_counter()
    found = scan(cfg)
    problems = list(found.problems)
    warnings_seen: list[str] = list(found.warnings)
    image_max, observed_max = cfg.image_max, None
    if image_max is None:
        image_max, observed_max = dataset_image_max([s.image for s in found.samples], skip_unreadable=True)
        cfg = cfg.model_copy(update={"image_max": image_max})  # read images as a training run on all of them would
    fg_total = fg_outside = 0
    sizes: list[tuple[int, int]] = []
    fg_fractions: dict[str, float] = {}
    fov_kinds: Counter = Counter()
    ids, hashes = [], []
    for sample in tqdm(found.samples, desc="inspecting", unit="img", leave=False, disable=len(found.samples) < 8):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ls = load_sample(sample, cfg)
            except DataError as err:
                problems.extend(str(err).splitlines())
                continue
        warnings_seen += [str(w.message) for w in caught]
        sizes.append(ls.mask.shape)
        inside = ls.fov.astype(bool)
        fg_fractions[sample.id] = float(ls.mask[inside].mean()) if inside.any() else 0.0
        fg_total += int(ls.mask.sum())
        fg_outside += int(ls.mask[~inside].sum())
        if sample.fov is not None:
            fov_kinds["shipped"] += 1
        elif cfg.derive_fov and not ls.fov.all():
            fov_kinds["derived"] += 1
        else:
            fov_kinds["none (whole image)"] += 1
        ids.append(sample.id)
        hashes.append(file_phash64(sample.image))  # as the split groups them
    pairs = pairs_within(ids, np.array(hashes, dtype=np.uint64), cfg.duplicate_hash_distance)

    report: dict = {
        "root": str(found.root),
        "layout": found.layout,
        "n_samples": len(found.samples),
        "counts": {
            "label": dict(sorted(Counter(s.label for s in found.samples if s.label).items())),
            "layout_split": dict(sorted(Counter(s.split for s in found.samples if s.split).items())),
            "groups": len({s.group for s in found.samples if s.group is not None}),
        },
        "image_size": None,
        "foreground_fraction_in_fov": _stats(list(fg_fractions.values())),
        "empty_masks": sorted(i for i, f in fg_fractions.items() if f == 0.0),
        "fov": dict(fov_kinds),
        "foreground_outside_fov": fg_outside / fg_total if fg_total else 0.0,
        "image_max": {"full_scale": image_max, "observed_max": observed_max},
        "near_duplicates": {"max_distance": cfg.duplicate_hash_distance, "n_pairs": len(pairs),
                            "pairs": [list(p) for p in pairs]},
        "problems": problems,
        "warnings": warnings_seen,
    }
    if report["foreground_outside_fov"] > _OUTSIDE_FOV_WARN:
        warnings_seen.append(
            f"{100 * report['foreground_outside_fov']:.1f}% of the annotated foreground lies outside the FOV: "
            "evaluation ignores it and predict zeroes it there; check the FOV masks (or set data.derive_fov=false "
            "when the derived FOV cuts into the objects)"
        )
    if sizes:
        hs, ws = np.array([s[0] for s in sizes]), np.array([s[1] for s in sizes])
        report["image_size"] = {
            "min": [int(hs.min()), int(ws.min())],
            "median": [float(np.median(hs)), float(np.median(ws))],
            "max": [int(hs.max()), int(ws.max())],
            "distinct": len(set(sizes)),
        }
    if split is not None:
        try:
            check_split(split, found.samples)
        except DataError as err:
            problems.extend(str(err).splitlines())
        where = {i: name for name in SPLIT_NAMES for i in split.get(name, [])}
        report["counts"]["split"] = {name: len(split.get(name, [])) for name in SPLIT_NAMES}
        report["near_duplicates"]["across_splits"] = [
            [a, b, d, where[a], where[b]] for a, b, d in pairs if a in where and b in where and where[a] != where[b]
        ]
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def _fmt_stats(stats: dict | None, pct: bool = False) -> str:
    if not stats:
        return "n/a"
    f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:g}")
    return f"mean {f(stats['mean'])}, min {f(stats['min'])}, median {f(stats['median'])}, max {f(stats['max'])}"


def format_inspection(report: dict, max_listed: int = 20) -> str:
    """The report as text for the terminal: summary first, then every problem and the duplicates."""
    header = (f"data: {report['root']}  (layout: {report['layout']}, {report['n_samples']} samples, "
              f"{report.get('seconds', 0)} s)")
    lines = [header]
    counts = report["counts"]
    for key in ("label", "layout_split", "split"):
        if counts.get(key):
            lines.append(f"  {key.replace('_', ' ')}: " + ", ".join(f"{k} {v}" for k, v in counts[key].items()))
    if counts.get("groups"):
        lines.append(f"  groups: {counts['groups']}")
    size = report["image_size"]
    if size:
        lines.append(f"  image size (HxW): min {size['min'][0]}x{size['min'][1]}, median "
                     f"{size['median'][0]:g}x{size['median'][1]:g}, max {size['max'][0]}x{size['max'][1]} "
                     f"({size['distinct']} distinct)")
    lines.append(f"  foreground inside FOV: {_fmt_stats(report['foreground_fraction_in_fov'], pct=True)}")
    if report["empty_masks"]:
        lines.append(f"  empty masks: {len(report['empty_masks'])} (e.g. {', '.join(report['empty_masks'][:3])})")
    lines.append("  FOV: " + (", ".join(f"{k} {v}" for k, v in report["fov"].items()) or "n/a")
                 + f"; foreground outside it: {100 * report['foreground_outside_fov']:.1f}%")
    if report["image_max"]["full_scale"] is not None:
        lines.append(f"  integer images wider than 8 bits: divided by {report['image_max']['full_scale']:g}"
                     + (f" (largest value {report['image_max']['observed_max']})"
                        if report["image_max"]["observed_max"] is not None else ""))
    dup = report["near_duplicates"]
    lines.append(f"  near-duplicate pairs (phash distance <= {dup['max_distance']}): {dup['n_pairs']}")
    for a, b, d in dup["pairs"][:max_listed]:
        lines.append(f"    {a}  ~  {b}  (distance {d})")
    if dup["n_pairs"] > max_listed:
        lines.append(f"    ... {dup['n_pairs'] - max_listed} more")
    if "across_splits" in dup:
        across = dup["across_splits"]
        lines.append(f"  near-duplicates straddling splits: {len(across)}"
                     + ("  (leakage: make_split with duplicate_groups keeps them together)" if across else ""))
        for a, b, d, sa, sb in across:
            lines.append(f"    {a} [{sa}]  ~  {b} [{sb}]  (distance {d})")
    if report["warnings"]:
        lines.append(f"  warnings: {len(report['warnings'])}")
        lines += [f"    - {w}" for w in report["warnings"][:max_listed]]
        if len(report["warnings"]) > max_listed:
            lines.append(f"    ... {len(report['warnings']) - max_listed} more")
    lines.append(f"  problems: {len(report['problems'])}" if report["problems"] else "  problems: none")
    lines += [f"    - {p}" for p in report["problems"]]
    return "\n".join(lines)
