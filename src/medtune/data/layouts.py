"""Folder layouts -> ``list[Sample]``.

Each layout knows how one public data set (or a generic images/ + masks/ folder) pairs images with masks. Discovery
collects every problem (image without mask, mask without image, missing folder ...) and raises them together in
one ``DataError``, so a user fixes a data folder in one pass instead of one error per run.
"""
from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from medtune.config import VIDEO_LAYOUTS, DataCfg
from medtune.data.io import is_image_file, strip_image_extension
from medtune.data.splits import sample_groups
from medtune.data.types import DataError, Sample, Target

log = logging.getLogger(__name__)

LAYOUTS = ("generic", "drive", "chase", "stare", "busi", "polygon_json", "llava_json", "synthetic", "video_frames",
           "sa2va_video", "video_files")
# DAVIS / SA-V folder names of the video_frames layout (data.image_dir / data.mask_dir name the generic pair)
VIDEO_FRAME_DIR, VIDEO_MASK_DIR = "JPEGImages", "Annotations"
VIDEO_FILES_DIR = "videos"
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
SYNTHETIC_DEFAULT_ROOT = Path("~/.cache/medtune/synthetic")

_DRIVE_SPLITS = {"training": "train", "train": "train", "test": "test"}
_DRIVE_IMAGE = re.compile(r"^(\d+)_(training|test)$", re.IGNORECASE)
# Retina sets redistributed in DRIVE's folders keep their own names: CHASE_DB1 Image_01L + Image_01L_1stHO,
# STARE im0001 + im0001.ah; a mask is <image stem><one of these> (or of data.mask_suffixes) in <split>/1st_manual/.
_DRIVE_STYLE_MASK_SUFFIXES = ("_manual1", "_1stHO", ".ah")
_CHASE_IMAGE = re.compile(r"^Image_(\d+)([LR])$", re.IGNORECASE)
_STARE_IMAGE = re.compile(r"^(im\d{4})$", re.IGNORECASE)
_BUSI_CLASSES = ("benign", "malignant", "normal")
_BUSI_MASK = re.compile(r"^(?P<stem>.+)_mask(?:_\d+)?$")
# File names quoted as examples in a group_by message.
_GROUP_EXAMPLES = 3


class DataWarning(UserWarning):
    """The data is usable but probably not what the user meant (e.g. a group_by regex that misses some files)."""


@dataclass
class Discovery:
    """What a scan of a data folder found: the samples that pair up and every problem, unraised."""

    layout: str
    root: Path
    samples: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def format_problems(problems: list[str], where: str) -> str:
    if len(problems) == 1:  # one line: the problem names its file and the fix
        return f"problem with the data in {where}: {problems[0]}"
    head = f"{len(problems)} problem(s) with the data in {where}:"
    return "\n".join([head] + [f"  - {p}" for p in problems])


def _rel_id(path: Path, root: Path) -> str:
    rel = path.relative_to(root)
    return (rel.parent / strip_image_extension(rel.name)).as_posix()


def _image_files(folder: Path, recursive: bool = False) -> list[Path]:
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in pattern if is_image_file(p))


def detect_layout(root: str | Path, cfg: DataCfg | None = None) -> str:
    """Name of the layout a data folder follows, from its contents; DataError when none fits."""
    cfg = cfg or DataCfg()
    root = Path(root).expanduser()
    if root.is_file() and root.suffix.lower() in (".json", ".jsonl"):
        return "llava_json"
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found; set data.path to the folder that holds the images")
    if (root / cfg.annotations).is_file():
        return "llava_json" if _holds_conversations(root / cfg.annotations) else "polygon_json"
    if (root / cfg.video.expressions_file).is_file() and (root / cfg.video.mask_file).is_file():
        return "sa2va_video"
    if (root / VIDEO_FRAME_DIR).is_dir() and (root / VIDEO_MASK_DIR).is_dir():
        return "video_frames"
    videos = root / VIDEO_FILES_DIR
    if videos.is_dir() and any(p.suffix.lower() in VIDEO_EXTENSIONS for p in videos.iterdir()):
        return "video_files"
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    has_drive_splits = "test" in subdirs and bool({"training", "train"} & subdirs.keys())
    if has_drive_splits and any((d / "images").is_dir() for n, d in subdirs.items() if n in _DRIVE_SPLITS):
        return "drive"
    if (root / cfg.image_dir).is_dir() and (root / cfg.mask_dir).is_dir():
        return "generic"
    if any(c in subdirs for c in _BUSI_CLASSES):
        for c in _BUSI_CLASSES:
            if c in subdirs and any(_BUSI_MASK.match(strip_image_extension(p.name)) for p in subdirs[c].iterdir()):
                return "busi"
    if "stare-images" in subdirs:
        return "stare"
    stems = [strip_image_extension(p.name) for p in root.iterdir() if is_image_file(p)]
    if any(_STARE_IMAGE.match(s) for s in stems):
        return "stare"
    if any(_CHASE_IMAGE.match(s) for s in stems):
        return "chase"
    found = sorted(subdirs)[:10] or sorted(p.name for p in root.iterdir())[:10]
    raise DataError(
        f"{root}: cannot tell the data layout from its contents (found: {', '.join(found) or 'nothing'}); "
        f"set data.layout to one of {', '.join(LAYOUTS)}, or arrange the folder as "
        f"{cfg.image_dir}/ + {cfg.mask_dir}/ (generic layout)"
    )


def _index_by_stem(files: list[Path], root: Path) -> dict[str, Path]:
    """Key = folder relative to root + stem, so nested sub-folders pair only with the same sub-folder."""
    return {(f.parent.relative_to(root) / strip_image_extension(f.name)).as_posix(): f for f in files}


def _discover_generic(cfg: DataCfg, root: Path) -> Discovery:
    found = Discovery("generic", root)
    image_root, mask_root = root / cfg.image_dir, root / cfg.mask_dir
    fov_root = root / cfg.fov_dir if cfg.fov_dir else None
    for folder, key in ((image_root, "data.image_dir"), (mask_root, "data.mask_dir"), (fov_root, "data.fov_dir")):
        if folder is not None and not folder.is_dir():
            found.problems.append(f"{folder}: folder not found; create it or set {key} to the right sub-folder")
    if found.problems:
        return found
    suffixes = list(dict.fromkeys(cfg.mask_suffixes))
    images = _index_by_stem(_image_files(image_root, recursive=True), image_root)
    masks = _index_by_stem(_image_files(mask_root, recursive=True), mask_root)
    fovs = _index_by_stem(_image_files(fov_root, recursive=True), fov_root) if fov_root else {}
    if image_root.resolve() == mask_root.resolve():
        # Images and masks share one folder: a file whose stem is another file's stem + a mask suffix is a mask.
        mask_keys = {k for k in images for s in suffixes if s and k.endswith(s) and k[: -len(s)] in images}
        images = {k: v for k, v in images.items() if k not in mask_keys}
        masks = {k: v for k, v in masks.items() if k in mask_keys}
    claimed: set[str] = set()
    claimed_fov: set[str] = set()
    for key, image in sorted(images.items()):
        mask_key = next((key + s for s in suffixes if key + s in masks), None)
        if mask_key is None:
            tried = ", ".join(f"{Path(key).name}{s}.<ext>" for s in suffixes)
            found.problems.append(
                f"{image}: no mask in {mask_root} (looked for {tried}); add the mask, remove the image, "
                "or add its suffix to data.mask_suffixes"
            )
            continue
        claimed.add(mask_key)
        fov = None
        if fov_root is not None:
            fov_key = next((key + s for s in ["", "_fov", *suffixes] if key + s in fovs), None)
            if fov_key is None:
                found.problems.append(f"{image}: no FOV mask in {fov_root}; add it or unset data.fov_dir")
                continue
            claimed_fov.add(fov_key)
            fov = fovs[fov_key]
        found.samples.append(Sample(id=_rel_id(image, root), image=image, masks=[masks[mask_key]], fov=fov))
    for key in sorted(set(masks) - claimed):
        found.problems.append(
            f"{masks[key]}: mask without an image in {image_root}; add the image or remove the mask "
            f"(mask names must be <image stem><suffix> with suffix in data.mask_suffixes={suffixes})"
        )
    return found


def _first_existing(folder: Path, stems: list[str]) -> Path | None:
    if not folder.is_dir():
        return None
    by_stem = {strip_image_extension(p.name).lower(): p for p in folder.iterdir() if is_image_file(p)}
    return next((by_stem[s.lower()] for s in stems if s.lower() in by_stem), None)


def _discover_drive(cfg: DataCfg, root: Path) -> Discovery:
    found = Discovery("drive", root)
    split_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name.lower() in _DRIVE_SPLITS]
    if not any(d.name.lower() == "test" for d in split_dirs) or len(split_dirs) < 2:
        found.problems.append(f"{root}: DRIVE layout needs training/ and test/ folders; check data.path")
    for split_dir in split_dirs:
        images_dir = split_dir / "images"
        if not images_dir.is_dir():
            found.problems.append(f"{images_dir}: folder not found; DRIVE keeps images in <split>/images/")
            continue
        claimed: set[Path] = set()
        for image in _image_files(images_dir):
            stem = strip_image_extension(image.name)  # 21_training, 01_test; or another set's own name
            drive_name = _DRIVE_IMAGE.match(stem)
            mask_stems = [stem + s for s in dict.fromkeys([*_DRIVE_STYLE_MASK_SUFFIXES, *cfg.mask_suffixes])]
            fov_stems = [f"{stem}_mask", stem]
            if drive_name:
                mask_stems.insert(0, f"{drive_name.group(1)}_manual1")
                fov_stems.insert(1, f"{drive_name.group(1)}_{split_dir.name}_mask")
            mask = _first_existing(split_dir / "1st_manual", mask_stems)
            fov = _first_existing(split_dir / "mask", fov_stems)
            if mask is None:
                found.problems.append(
                    f"{image}: no vessel mask in {split_dir / '1st_manual'} (looked for {', '.join(mask_stems[:4])} "
                    "...); add it (the DRIVE release ships one per image), remove the image, or add its suffix to "
                    "data.mask_suffixes"
                )
                continue
            claimed.add(mask)
            chase_name = _CHASE_IMAGE.match(stem)
            found.samples.append(
                Sample(
                    id=_rel_id(image, root),
                    image=image,
                    masks=[mask],
                    fov=fov,
                    split=_DRIVE_SPLITS[split_dir.name.lower()],
                    # CHASE_DB1 in DRIVE's folders: the left and right eye of one child stay in one split.
                    group=chase_name.group(1) if chase_name else None,
                )
            )
        manual_dir = split_dir / "1st_manual"
        if manual_dir.is_dir():
            for orphan in sorted(set(_image_files(manual_dir)) - claimed):
                found.problems.append(f"{orphan}: vessel mask without an image in {images_dir}; add or remove it")
    return found


def _discover_chase(cfg: DataCfg, root: Path) -> Discovery:
    found = Discovery("chase", root)
    files = {strip_image_extension(p.name): p for p in _image_files(root)}
    claimed: set[str] = set()
    for stem, image in sorted(files.items()):
        match = _CHASE_IMAGE.match(stem)
        if not match:
            continue
        mask_stem = f"{stem}_1stHO"
        if mask_stem not in files:
            found.problems.append(f"{image}: no mask {mask_stem}.png next to it; add it or remove the image")
            continue
        claimed.add(mask_stem)
        # The left and right eye of one child share a number: keep them in one split.
        found.samples.append(
            Sample(id=_rel_id(image, root), image=image, masks=[files[mask_stem]], group=match.group(1))
        )
    for stem in sorted(s for s in files if s.endswith("_1stHO") and s not in claimed):
        found.problems.append(f"{files[stem]}: mask without an image; add {stem[:-6]}.jpg or remove the mask")
    return found


def _discover_stare(cfg: DataCfg, root: Path) -> Discovery:
    found = Discovery("stare", root)
    image_dir = root / "stare-images" if (root / "stare-images").is_dir() else root
    label_dir = root / "labels-ah" if (root / "labels-ah").is_dir() else image_dir
    images = {strip_image_extension(p.name): p for p in _image_files(image_dir)}
    labels = {strip_image_extension(p.name): p for p in _image_files(label_dir)}
    claimed: set[str] = set()
    for stem, image in sorted(images.items()):
        if not _STARE_IMAGE.match(stem):
            continue
        mask_stem = f"{stem}.ah"
        if mask_stem not in labels:
            found.problems.append(f"{image}: no mask {mask_stem}.ppm in {label_dir}; add it or remove the image")
            continue
        claimed.add(mask_stem)
        found.samples.append(Sample(id=_rel_id(image, root), image=image, masks=[labels[mask_stem]]))
    for stem in sorted(s for s in labels if s.endswith(".ah") and s not in claimed):
        found.problems.append(f"{labels[stem]}: mask without an image in {image_dir}; add or remove it")
    if not found.samples and not found.problems:
        found.problems.append(f"{image_dir}: no STARE images (im0001.ppm ...); check data.path")
    return found


def _discover_busi(cfg: DataCfg, root: Path) -> Discovery:
    found = Discovery("busi", root)
    class_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name.lower() in _BUSI_CLASSES]
    if not class_dirs:
        found.problems.append(f"{root}: no benign/, malignant/ or normal/ folder; check data.path")
    for class_dir in class_dirs:
        files = _image_files(class_dir)
        masks: dict[str, list[Path]] = {}
        images: dict[str, Path] = {}
        for f in files:
            stem = strip_image_extension(f.name)
            match = _BUSI_MASK.match(stem)
            if match:
                masks.setdefault(match.group("stem"), []).append(f)
            else:
                images[stem] = f
        for stem, image in sorted(images.items()):
            if stem not in masks:
                found.problems.append(f"{image}: no mask '{stem}_mask.png' next to it; add it or remove the image")
                continue
            found.samples.append(
                Sample(
                    id=_rel_id(image, root),
                    image=image,
                    masks=sorted(masks[stem]),  # several lesions -> several mask files, unioned on load
                    label=class_dir.name.lower(),
                )
            )
        for stem in sorted(set(masks) - set(images)):
            for m in masks[stem]:
                found.problems.append(f"{m}: mask without an image '{stem}.png'; add the image or remove the mask")
    return found


def _flatten_polygons(node) -> list[list[float]] | None:
    """Accepts ``[[x,y,...], ...]`` or per-object nesting ``[[[x,y,...], ...], ...]``; None when malformed."""
    if not isinstance(node, list):
        return None
    if node and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in node):
        return [node]
    out: list[list[float]] = []
    for child in node:
        sub = _flatten_polygons(child)
        if sub is None:
            return None
        out += sub
    return out


def _expressions(entry: dict) -> list[tuple[str | None, list[list[float]]]] | str:
    """Sa2VA's entry {"mask": [mask_1, ...], "text": ["expression 1", ...]} (mask_i: polygons [[x1, y1, ...], ...]
    or one flat polygon) -> [(text, polygons)], one per expression. One text (a string, or a one-element list) or
    none -> a single target holding every polygon. Returns the problem as a string when malformed.

    An entry without a 'mask' key is a problem (an export that dropped it would otherwise train on empty masks); an
    image that truly shows no target says so with ``"mask": []``."""
    if "mask" not in entry:
        return ("no 'mask' key; give its polygons (one list per expression), or \"mask\": [] for an image that shows "
                "no target")
    masks, text = entry["mask"], entry.get("text")
    texts = text if isinstance(text, list) else [text]
    if not all(t is None or isinstance(t, str) for t in texts):
        return "'text' must be a string or a list of strings (one referring expression per mask); fix it"
    if not isinstance(masks, list):
        masks = None
    if len(texts) > 1 or (len(texts) == 1 and masks is not None and len(masks) == 1):
        if masks is None or len(masks) != len(texts):
            return (f"{len(texts)} expressions in 'text' but {len(masks) if masks is not None else 'no'} masks in "
                    "'mask'; give one mask (a list of polygons) per expression")
        groups = [(t, _flatten_polygons(m)) for t, m in zip(texts, masks)]
    else:
        groups = [(texts[0] if texts else None, _flatten_polygons(masks))]
    if any(polygons is None or any(len(p) < 6 or len(p) % 2 for p in polygons) for _, polygons in groups):
        return "'mask' must be a list of polygons [x1, y1, x2, y2, ...] with >= 3 points each; fix it"
    return groups


def _discover_polygon_json(cfg: DataCfg, root: Path) -> Discovery:
    found = Discovery("polygon_json", root)
    ann_path = root / cfg.annotations
    if not ann_path.is_file():
        found.problems.append(f"{ann_path}: annotations file not found; set data.annotations to its name")
        return found
    try:
        entries = json.loads(ann_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        found.problems.append(f"{ann_path}: not valid JSON ({err}); fix or re-export the annotations file")
        return found
    if not isinstance(entries, list):
        found.problems.append(f"{ann_path}: top level must be a list of {{'image', 'mask', 'text'}} entries")
        return found
    # Lexical normalisation (not resolve()): a data set may legitimately symlink its image folder elsewhere,
    # but an annotation must not point outside the data folder with ../ or an absolute path.
    norm_root = Path(os.path.normpath(root.absolute()))
    by_image: dict[str, Sample] = {}
    for i, entry in enumerate(entries):
        where = f"{ann_path} entry {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            found.problems.append(f"{where}: needs an 'image' path string; fix the entry")
            continue
        rel = entry["image"]
        image = Path(os.path.normpath(norm_root / rel))
        if Path(rel).is_absolute() or not image.is_relative_to(norm_root):
            found.problems.append(
                f"{where}: image path '{rel}' escapes the data folder {root}; use a path relative to and inside it"
            )
            continue
        if not image.is_file():
            found.problems.append(f"{where}: image '{rel}' not found under {root}; fix the path or add the file")
            continue
        parsed = _expressions(entry)
        if isinstance(parsed, str):
            found.problems.append(f"{where}: {parsed}")
            continue
        sample_id = _rel_id(image, norm_root)
        if sample_id not in by_image:
            by_image[sample_id] = Sample(id=sample_id, image=image, polygons=[])
        for text, polygons in parsed:
            # the union serves mask-only tasks; each expression stays its own target (its text, its own mask)
            by_image[sample_id].polygons.extend(polygons)
            by_image[sample_id].targets.append(Target(text=text, polygons=polygons))
    found.samples = list(by_image.values())
    return found


def _discover_synthetic(cfg: DataCfg) -> Discovery:
    from medtune.data.synthetic import (
        ensure_dataset,  # heavy procedural generator: import only when used
    )

    root = Path(cfg.path or SYNTHETIC_DEFAULT_ROOT).expanduser()
    folder = Path(ensure_dataset(cfg.synthetic, root))
    generic_cfg = cfg.model_copy(update={"image_dir": "images", "mask_dir": "masks", "fov_dir": None})
    if (folder / "fov").is_dir():
        generic_cfg = generic_cfg.model_copy(update={"fov_dir": "fov"})
    found = _discover_generic(generic_cfg, folder)
    found.layout = "synthetic"
    return found


def _holds_conversations(path: Path) -> bool:
    """Whether an annotations file is image + conversation data (its first entry has conversations / messages)."""
    try:
        entries = _read_json_entries(path)
    except (ValueError, UnicodeDecodeError):
        return False
    first = entries[0] if isinstance(entries, list) and entries else None
    return isinstance(first, dict) and ("conversations" in first or "messages" in first)


def _read_json_entries(path: Path):
    """A JSON file's top-level value, or a JSONL file's lines as a list (ValueError naming the line when broken)."""
    text = path.read_text()
    if path.suffix.lower() != ".jsonl":
        return json.loads(text)
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"line {number}: {err}") from None
    return entries


def _inside(root: Path, rel: str) -> Path | None:
    """``root / rel`` normalised lexically, or None when ``rel`` is absolute or climbs out of ``root``.

    Lexical (not resolve()): a data set may legitimately symlink its image folder elsewhere, but an annotation must
    not point outside the data folder with ../ or an absolute path."""
    path = Path(os.path.normpath(root / rel))
    if Path(rel).is_absolute() or not path.is_relative_to(root):
        return None
    return path


def _discover_llava_json(cfg: DataCfg, root: Path) -> Discovery:
    from medtune.data.conversations import parse_conversation

    ann_path = root if root.is_file() else root / cfg.annotations
    image_root = Path(os.path.normpath(Path(cfg.image_root or ann_path.parent).expanduser().absolute()))
    found = Discovery("llava_json", image_root)
    if not ann_path.is_file():
        found.problems.append(f"{ann_path}: annotations file not found; point data.path at the JSON/JSONL file "
                              "(or set data.annotations to its name inside data.path)")
        return found
    if not image_root.is_dir():
        found.problems.append(f"{image_root}: image root not found; set data.image_root to the folder image paths "
                              "are relative to")
        return found
    try:
        entries = _read_json_entries(ann_path)
    except (ValueError, UnicodeDecodeError) as err:
        found.problems.append(f"{ann_path}: not valid JSON ({err}); fix or re-export the file")
        return found
    if not isinstance(entries, list):
        found.problems.append(f"{ann_path}: top level must be a list of {{'image', 'conversations'}} entries")
        return found
    line_word = "line" if ann_path.suffix.lower() == ".jsonl" else "entry"
    given_ids: Counter[str] = Counter()
    auto_ids: Counter[str] = Counter()
    for i, entry in enumerate(entries):
        where = f"{ann_path} {line_word} {i + 1 if line_word == 'line' else i}"
        if not isinstance(entry, dict):
            found.problems.append(f"{where}: must be an object with 'image' and 'conversations'")
            continue
        images = entry.get("images", entry.get("image"))
        images = [images] if isinstance(images, str) else images
        if not images:
            found.problems.append(f"{where}: no 'image'; text-only samples are not supported (give each entry the "
                                  "image its question is about)")
            continue
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            found.problems.append(f"{where}: 'image' must be a path string (or 'images' a list of them)")
            continue
        if len(images) > 1:
            found.problems.append(f"{where}: {len(images)} images; multi-image samples are not supported yet (split "
                                  "the entry into one entry per image)")
            continue
        image = _inside(image_root, images[0])
        if image is None:
            found.problems.append(f"{where}: image path '{images[0]}' escapes the image root {image_root}; use a path "
                                  "relative to and inside it (or set data.image_root)")
            continue
        if not image.is_file():
            found.problems.append(f"{where}: image '{images[0]}' not found under {image_root}; fix the path or add "
                                  "the file")
            continue
        turns, problems = parse_conversation(entry, 1, where)
        if problems:
            found.problems += problems
            continue
        image_id = _rel_id(image, image_root)
        if isinstance(entry.get("id"), (str, int)):
            sample_id = str(entry["id"])
            given_ids[sample_id] += 1
        else:  # several questions about one image: image id, then image id#2, #3 ...
            auto_ids[image_id] += 1
            sample_id = image_id if auto_ids[image_id] == 1 else f"{image_id}#{auto_ids[image_id]}"
        label = entry.get("label")
        group = entry.get("group")
        found.samples.append(Sample(
            id=sample_id, image=image, label=label if isinstance(label, str) else None,
            # questions about one image (or one near-duplicate group) never straddle two splits
            group=str(group) if group is not None else image_id,
            conversations=turns,
        ))
    for dup in sorted(i for i, n in given_ids.items() if n > 1):
        found.problems.append(f"{ann_path}: id {dup!r} is used by {given_ids[dup]} entries; ids must be unique")
    return found


_DISCOVERERS = {
    "generic": _discover_generic,
    "drive": _discover_drive,
    "chase": _discover_chase,
    "stare": _discover_stare,
    "busi": _discover_busi,
    "polygon_json": _discover_polygon_json,
    "llava_json": _discover_llava_json,
}


def _image_name(sample: Sample) -> str:
    return sample.image.name


def apply_groups(found: Discovery, pattern: str | None, name_of=_image_name, noun: str = "image file name") -> None:
    """Group samples by ``data.split.group_by``, a regex searched in each sample's name (``name_of``: the image file
    name; a video's id for videos), its first group or whole match.

    A regex that matches no file is an error and one that misses some files a warning: either way a typo would
    otherwise make every file its own group and spread one patient across train/val/test. The layout's own groups
    (CHASE: one child's two eyes) are kept: samples sharing either group end up in one.
    """
    if not pattern or not found.samples:
        return
    try:
        regex = re.compile(pattern)
    except re.error as err:
        found.problems.append(f"data.split.group_by={pattern!r} is not a valid regex ({err}); fix the pattern")
        return
    keys: dict[str, str] = {}
    unmatched: list[Sample] = []
    for s in found.samples:
        match = regex.search(name_of(s))
        if match is None:
            unmatched.append(s)
        else:
            keys[s.id] = match.group(1) if regex.groups and match.group(1) is not None else match.group(0)
    total = len(found.samples)
    if not keys:
        examples = ", ".join(name_of(s) for s in found.samples[:_GROUP_EXAMPLES])
        found.problems.append(
            f"data.split.group_by='{pattern}' matches none of the {total} {noun}s (e.g. {examples}); fix "
            "the regex (it is searched in the file name, its first group is the patient / video id) or unset it"
        )
        return
    if unmatched:
        examples = ", ".join(name_of(s) for s in unmatched[:_GROUP_EXAMPLES])
        found.warnings.append(
            f"data.split.group_by='{pattern}' does not match {len(unmatched)} of {total} {noun}s (e.g. "
            f"{examples}): each of those is its own group and may straddle train/val/test; fix the regex if they "
            "belong to a patient / video"
        )
    # One component per set of samples linked by a layout group or a group_by key, named by the keys it joins.
    if any(s.group is not None for s in found.samples):
        log.info("data.split.group_by is combined with the %s layout's own groups", found.layout)
    by_id = {s.id: s for s in found.samples}
    for members in sample_groups(found.samples, {i: f"group_by:{k}" for i, k in keys.items()}).values():
        names = sorted({keys[i] for i in members if i in keys} | {by_id[i].group for i in members if by_id[i].group})
        for i in members:
            by_id[i].group = "+".join(names) if names else i


def scan(cfg: DataCfg) -> Discovery:
    """Discovery without raising: the samples that pair up plus every problem (for ``inspect``)."""
    if cfg.layout == "synthetic":
        found = _discover_synthetic(cfg)
    else:
        if cfg.path is None:
            hint = "data.path is not set; point it at the data folder or use data.layout=synthetic (built-in data)"
            return Discovery(cfg.layout, Path("."), problems=[hint])
        root = Path(cfg.path).expanduser()
        is_json_file = root.is_file() and cfg.layout in ("auto", "llava_json")
        if not root.is_dir() and not is_json_file:
            return Discovery(cfg.layout, root, problems=[f"{root}: data folder not found; check data.path"])
        layout = cfg.layout
        if layout == "auto":
            try:
                layout = detect_layout(root, cfg)
            except DataError as err:
                return Discovery("auto", root, problems=[str(err)])
        if layout in VIDEO_LAYOUTS:
            return Discovery(layout, root, problems=[f"{root} holds videos (layout {layout}); this command reads "
                                                     "still images only"])
        found = _DISCOVERERS[layout](cfg, root)
    apply_groups(found, cfg.split.group_by)
    found.samples.sort(key=lambda s: s.id)
    id_counts = Counter(s.id for s in found.samples)
    for dup in sorted(i for i, n in id_counts.items() if n > 1):
        found.problems.append(f"sample id {dup!r} occurs twice (same name, different extension); rename one file")
    if cfg.max_samples is not None:
        found.samples = found.samples[: cfg.max_samples]
    if not found.samples and not found.problems:
        found.problems.append(
            f"{found.root}: no samples found for layout '{found.layout}'; check data.path and data.layout"
        )
    return found


def discover(cfg: DataCfg) -> list[Sample]:
    """Samples of the data set ``cfg`` points at, sorted by id; one DataError listing every problem found."""
    found = scan(cfg)
    raise_or_warn(found.problems, found.warnings, found.root)
    return found.samples


def raise_or_warn(problems: list[str], warnings_found: list[str], root) -> None:
    """What discovery found: one DataError listing every problem, else each warning logged and warned once."""
    if problems:
        raise DataError(format_problems(problems, str(root)))
    for message in warnings_found:
        log.warning(message)
        warnings.warn(message, DataWarning, stacklevel=3)
