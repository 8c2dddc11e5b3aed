"""`medtune data to-vqa FOLDER --out FILE`: a classification folder (one sub-folder per class, e.g. BUSI's benign/,
malignant/, normal/) -> image + conversation JSON (the ``llava_json`` layout).

Each image gets one question (a template chosen per image with a seeded generator, so the file is reproducible) and
its class name as the answer. Near-duplicate images (perceptual hash, as ``data inspect`` finds them) share a
``group`` so that a run's split keeps them together; groups whose members carry different classes (BUSI has a few
images filed under both benign and malignant) are reported, and dropped with ``drop_conflicting``.
"""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medtune.data.io import is_image_file, strip_image_extension
from medtune.data.types import DataError, Sample

# Questions name the classes found in the folder ({labels}: "benign, malignant or normal").
DEFAULT_QUESTIONS = (
    "Is the finding in this image {labels}? Answer with one word.",
    "What is the diagnosis for this image: {labels}?",
    "Classify this image as {labels}.",
    "Which category does this image belong to: {labels}? Reply with the category only.",
)
DEFAULT_ANSWER = "{label}"
# Masks and other annotation files that share a class folder with its images (BUSI: "benign (1)_mask.png").
_ANNOTATION_FILE = re.compile(r"_(?:mask|seg|label)(?:_\d+)?$", re.IGNORECASE)


@dataclass
class VQAConversion:
    out: Path
    n_written: int
    counts: dict[str, int]
    groups: int  # near-duplicate groups of >= 2 images
    conflicts: list[list[str]] = field(default_factory=list)  # groups whose images carry different classes
    dropped: list[str] = field(default_factory=list)


def _label_list(labels: list[str]) -> str:
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " or " + labels[-1]


def classification_samples(folder: Path) -> list[Sample]:
    """One Sample per image in each class sub-folder (annotation files such as *_mask.png skipped)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; give the folder that holds one sub-folder per class")
    samples = []
    for class_dir in sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for image in sorted(p for p in class_dir.iterdir() if is_image_file(p)):
            stem = strip_image_extension(image.name)
            if _ANNOTATION_FILE.search(stem):
                continue
            rel = image.relative_to(folder)
            samples.append(Sample(id=(rel.parent / stem).as_posix(), image=image, label=class_dir.name.lower()))
    labels = {s.label for s in samples}
    if len(labels) < 2:
        raise DataError(f"{folder}: found {len(samples)} images in {len(labels)} class folder(s) "
                        f"({', '.join(sorted(labels)) or 'none'}); a classification folder needs one sub-folder per "
                        "class with the images inside (e.g. benign/, malignant/)")
    return samples


def to_vqa(folder: str | Path, out: str | Path, questions: tuple[str, ...] = DEFAULT_QUESTIONS,
           answer: str = DEFAULT_ANSWER, seed: int = 0, duplicate_hash_distance: int = 4,
           drop_conflicting: bool = False) -> VQAConversion:
    from medtune.data.inspect import duplicate_groups, find_near_duplicates

    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    samples = classification_samples(folder)
    labels = sorted({s.label for s in samples})
    pairs = find_near_duplicates(samples, duplicate_hash_distance)
    group_of = duplicate_groups(pairs)
    members: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        if s.id in group_of:
            members[group_of[s.id]].append(s)
    conflicts = [sorted(f"{m.id} [{m.label}]" for m in group) for group in members.values()
                 if len({m.label for m in group}) > 1]
    conflicting_ids = {m.id for g in members.values() if len({m.label for m in g}) > 1 for m in g}

    rng = np.random.default_rng(seed)
    entries, dropped = [], []
    for s in samples:
        template = questions[int(rng.integers(len(questions)))]  # drawn for every image: stable under dropping
        if drop_conflicting and s.id in conflicting_ids:
            dropped.append(s.id)
            continue
        entry = {
            "id": s.id,
            "image": s.image.relative_to(folder).as_posix(),
            "label": s.label,
            "conversations": [
                {"from": "human", "value": "<image>\n" + template.format(labels=_label_list(labels))},
                {"from": "gpt", "value": answer.format(label=s.label)},
            ],
        }
        if s.id in group_of:
            entry["group"] = group_of[s.id]
        entries.append(entry)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(entries, indent=1) + "\n")
    return VQAConversion(out=out, n_written=len(entries), counts=dict(sorted(Counter(s.label for s in samples).items())),
                         groups=len(members), conflicts=sorted(conflicts), dropped=dropped)


def format_conversion(result: VQAConversion, folder: str | Path) -> str:
    lines = [f"{result.n_written} image + conversation entries written to {result.out} "
             f"({', '.join(f'{k} {v}' for k, v in result.counts.items())} images found)",
             f"  near-duplicate groups kept together (field 'group'): {result.groups}"]
    if result.conflicts:
        lines.append(f"  near-duplicates filed under different classes: {len(result.conflicts)} group(s)"
                     + (" (dropped)" if result.dropped else " (kept; --drop-conflicting removes them)"))
        lines += [f"    {'  ~  '.join(group)}" for group in result.conflicts]
    labels = sorted(result.counts)
    lines.append(f"  train with: data.path={result.out} data.image_root={Path(folder).expanduser()} "
                 f"task.labels=[{','.join(labels)}]")
    return "\n".join(lines)
