"""``data inspect`` for videos: per video its frames, annotated frames, gaps, size and frame rate; every problem
(each frame and mask decoded); near-duplicate videos."""
from __future__ import annotations

import time
import warnings

import numpy as np

from medtune.config import DataCfg
from medtune.data.inspect import pairs_within, phash64
from medtune.data.splits import SPLIT_NAMES, check_split
from medtune.data.types import DataError
from medtune.data.video import VideoSample, check_video, open_frames, read_video_mask
from medtune.data.video_layouts import frame_gaps, scan_videos


def _middle_frame_hash(video: VideoSample, cfg: DataCfg) -> int:
    with open_frames(video, cfg.model_copy(update={"channels": 1})) as reader:
        return phash64(reader.read(len(reader) // 2))


def find_near_duplicate_videos(videos: list[VideoSample], cfg: DataCfg,
                               max_distance: int = 4) -> list[tuple[str, str, int]]:
    """Pairs of videos whose middle frames are near-duplicates (phash Hamming distance <= max_distance), closest
    first: one run exported twice must not land in two splits."""
    ids, hashes = [], []
    for video in videos:
        ids.append(video.id)
        hashes.append(_middle_frame_hash(video, cfg))
    return pairs_within(ids, np.array(hashes, dtype=np.uint64), max_distance)


def inspect_videos(cfg: DataCfg, split: dict[str, list[str]] | None = None) -> dict:
    """Health report of the video data set ``cfg`` points at; never raises for data problems, it lists them all."""
    started = time.perf_counter()
    scan = scan_videos(cfg)
    problems, warnings_seen = list(scan.problems), list(scan.warnings)
    rows, ids, hashes = [], [], []
    for video in scan.videos:
        row = {"id": video.id, "frames": video.n_frames, "annotated": len(video.annotated),
               "gaps": len(frame_gaps(video.frame_numbers)[1]) if video.frame_numbers else 0,
               "size": list(video.frame_size) if video.frame_size else None, "fps": video.fps,
               "foreground": None, "expressions": len(video.expressions), "ok": video.id not in scan.bad}
        rows.append(row)
        if not row["ok"]:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = check_video(video, cfg)
            fractions = []
            if not found:
                for i in video.annotated:
                    try:
                        fractions.append(float(read_video_mask(video, i, cfg).mean()))
                    except DataError as err:
                        found.append(str(err))
        warnings_seen += [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        if found:
            problems += found
            row["ok"] = False
            continue
        row["foreground"] = float(np.mean(fractions)) if fractions else None
        ids.append(video.id)
        hashes.append(_middle_frame_hash(video, cfg))
    pairs = pairs_within(ids, np.array(hashes, dtype=np.uint64), cfg.duplicate_hash_distance)
    report: dict = {
        "root": str(scan.root), "layout": scan.layout, "n_videos": len(scan.videos),
        "n_frames": sum(r["frames"] for r in rows), "n_annotated": sum(r["annotated"] for r in rows),
        "groups": len({v.group for v in scan.videos if v.group is not None}),
        "videos": rows,
        "near_duplicates": {"max_distance": cfg.duplicate_hash_distance, "n_pairs": len(pairs),
                            "pairs": [list(p) for p in pairs]},
        "problems": problems, "warnings": warnings_seen,
    }
    if split is not None:
        try:
            check_split(split, scan.videos)
        except DataError as err:
            problems.extend(str(err).splitlines())
        where = {i: name for name in SPLIT_NAMES for i in split.get(name, [])}
        report["split"] = {name: len(split.get(name, [])) for name in SPLIT_NAMES}
        report["near_duplicates"]["across_splits"] = [
            [a, b, d, where[a], where[b]] for a, b, d in pairs if a in where and b in where and where[a] != where[b]]
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def format_video_inspection(report: dict, max_listed: int = 20) -> str:
    """The report as text: a summary, one row per video, then every problem."""
    lines = [f"data: {report['root']}  (layout: {report['layout']}, {report['n_videos']} videos, "
             f"{report['n_frames']} frames, {report['n_annotated']} annotated, {report.get('seconds', 0)} s)"]
    if report.get("split"):
        lines.append("  split: " + ", ".join(f"{k} {v}" for k, v in report["split"].items()))
    if report["groups"]:
        lines.append(f"  groups: {report['groups']}")
    lines.append(f"  {'video':<24} {'frames':>6} {'annotated':>9} {'gaps':>4} {'size (HxW)':>11} {'fps':>6} "
                 f"{'foreground':>10}  status")
    for r in report["videos"]:
        size = f"{r['size'][0]}x{r['size'][1]}" if r["size"] else "?"
        fps = f"{r['fps']:g}" if r["fps"] else "-"
        fg = f"{100 * r['foreground']:.1f}%" if r["foreground"] is not None else "-"
        lines.append(f"  {r['id']:<24} {r['frames']:>6} {r['annotated']:>9} {r['gaps']:>4} {size:>11} {fps:>6} "
                     f"{fg:>10}  {'ok' if r['ok'] else 'PROBLEM'}")
    dup = report["near_duplicates"]
    lines.append(f"  near-duplicate videos (middle-frame phash distance <= {dup['max_distance']}): {dup['n_pairs']}")
    lines += [f"    {a}  ~  {b}  (distance {d})" for a, b, d in dup["pairs"][:max_listed]]
    for a, b, d, sa, sb in dup.get("across_splits", []):
        lines.append(f"    straddling splits: {a} [{sa}]  ~  {b} [{sb}]  (distance {d})")
    if report["warnings"]:
        lines.append(f"  warnings: {len(report['warnings'])}")
        lines += [f"    - {w}" for w in report["warnings"][:max_listed]]
    lines.append(f"  problems: {len(report['problems'])}" if report["problems"] else "  problems: none")
    lines += [f"    - {p}" for p in report["problems"]]
    return "\n".join(lines)
