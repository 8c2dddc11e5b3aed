"""Video folder layouts -> ``list[VideoSample]``.

- ``video_frames`` (DAVIS / SA-V): ``JPEGImages/<video>/<frame>.jpg|png`` + ``Annotations/<video>/<frame>.png`` for
  any subset of frames (DAVIS's ``480p/`` level is taken when present), or ``<data.image_dir>/<video>/`` +
  ``<data.mask_dir>/<video>/``. A mask is named like its frame.
- ``sa2va_video`` (Sa2VA / MeViS / ReVOS): ``meta_expressions.json`` ``{"videos": {name: {"frames": [frame names],
  "expressions": {id: {"exp": text, "anno_id": [ids]}}}}}`` + ``mask_dict.json`` ``{anno_id: [RLE or null per
  frame]}`` (null: the object is absent, an annotated empty frame); ``{"<frame index>": RLE or null}`` instead of
  the list annotates a subset of frames. Frames are ``JPEGImages/<video>/<name>.<ext>`` (or ``<video>/<name>.<ext>``).
- ``video_files``: ``videos/<name>.mp4|avi|...`` + ``<data.mask_dir>/<name>/<frame index>.png`` (index from 0).

Like the image layouts, discovery lists every problem at once; each names the video and the frame. Frame sizes come
from the files' headers here; decoding every frame is ``check_video``'s job (``check_readable``, ``data inspect``).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from medtune.config import DataCfg
from medtune.data.io import image_header_size, is_image_file, strip_image_extension
from medtune.data.layouts import (
    VIDEO_EXTENSIONS,
    VIDEO_FILES_DIR,
    VIDEO_FRAME_DIR,
    VIDEO_LAYOUTS,
    VIDEO_MASK_DIR,
    Discovery,
    apply_groups,
    detect_layout,
    raise_or_warn,
)
from medtune.data.types import DataError
from medtune.data.video import VideoFileDecoder, VideoSample, VideoTarget

_FRAME_NUMBER = re.compile(r"(\d+)$")
DAVIS_RESOLUTION_DIR = "480p"  # DAVIS ships JPEGImages/480p/<video>/ (and Full-Resolution/): 480p when present


@dataclass
class VideoScan:
    """What a scan of a video data folder found: every video it could list, and every problem, unraised."""

    layout: str
    root: Path
    videos: list[VideoSample] = field(default_factory=list)  # with or without problems (data inspect shows all)
    problems: list[str] = field(default_factory=list)
    bad: set[str] = field(default_factory=set)  # ids of the videos with a problem
    warnings: list[str] = field(default_factory=list)

    @property
    def usable(self) -> list[VideoSample]:
        return [v for v in self.videos if v.id not in self.bad]

    def flag(self, video_id: str, problem: str) -> None:
        self.bad.add(video_id)
        self.problems.append(problem)


def _order_frames(video_id: str, files: list[Path], scan: VideoScan) -> tuple[list[Path], list[int] | None]:
    """Frame files in order of the number ending their names (names without one: in name order, unchecked), and
    those numbers; a duplicate number or a gap in the numbering is a problem."""
    stems = [strip_image_extension(f.name) for f in files]
    matches = [_FRAME_NUMBER.search(s) for s in stems]
    if not files or not all(matches):
        return sorted(files, key=lambda f: f.name), None
    numbered = sorted(zip((int(m.group(1)) for m in matches), files))
    numbers = [n for n, _ in numbered]
    ordered = [f for _, f in numbered]
    dup = [(a, b) for (na, a), (nb, b) in zip(numbered, numbered[1:]) if na == nb]
    if dup:
        scan.flag(video_id, f"video {video_id} frame {dup[0][0].name}: {dup[0][1].name} has the same frame number; "
                            "remove one of them")
        return ordered, numbers
    stride, gaps = frame_gaps(numbers)
    if gaps:
        k = gaps[0]
        more = f" ({len(gaps) - 1} more gaps)" if len(gaps) > 1 else ""
        scan.flag(video_id, f"video {video_id} frame {ordered[k].name}: gap in the frame numbering, the next frame "
                            f"is {ordered[k + 1].name} (frames every {stride} elsewhere){more}; restore the missing "
                            "frames or renumber the frames without gaps")
    return ordered, numbers


def frame_gaps(numbers: list[int]) -> tuple[int, list[int]]:
    """(stride, positions k where numbers[k + 1] - numbers[k] is not the stride) of ascending frame numbers. The
    stride is the commonest step: frames kept every k-th (YouTube-VOS: 5) have no gaps."""
    steps = [b - a for a, b in zip(numbers, numbers[1:])]
    if not steps:
        return 1, []
    stride = Counter(steps).most_common(1)[0][0]
    return stride, [k for k, step in enumerate(steps) if step != stride]


def _check_sizes(video: VideoSample, scan: VideoScan, mask_shapes: dict[int, tuple[int, int]] | None = None) -> None:
    """Frames of one size, from their headers (frame files), and masks of that size: the first offender is a
    problem naming video and frame. Sets ``video.frame_size``."""
    if not video.is_file:
        sizes = {}
        for i, path in enumerate(video.frames):
            try:
                sizes[i] = image_header_size(path)
            except DataError as err:
                scan.flag(video.id, f"{video.frame_name(i)}: {err}")
                return
        first = sizes[0] if sizes else None
        odd = next((i for i, s in sizes.items() if s != first), None)
        if odd is not None:
            h, w = sizes[odd]
            scan.flag(video.id, f"{video.frame_name(odd)}: frame is {h}x{w} but frame 0 is {first[0]}x{first[1]} "
                                "(frames of mixed sizes); re-export the video's frames at one size")
            return
        video.frame_size = first
    if video.frame_size is None:
        return
    shapes = dict(mask_shapes or {})
    for i, path in video.masks.items():
        try:
            shapes[i] = image_header_size(path)
        except DataError as err:
            scan.flag(video.id, f"{video.frame_name(i)}: {err}")
            return
    odd = next((i for i in sorted(shapes) if shapes[i] != tuple(video.frame_size)), None)
    if odd is not None:
        (h, w), (fh, fw) = shapes[odd], video.frame_size
        scan.flag(video.id, f"{video.frame_name(odd)}: mask is {h}x{w} but the frame is {fh}x{fw}; re-export the "
                            "mask at the frame size")


def _no_annotation(video: VideoSample, scan: VideoScan, where: str) -> None:
    if not video.annotated:
        scan.flag(video.id, f"video {video.id}: no annotated frame (no mask in {where}); annotate at least one "
                            "frame or remove the video")


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if is_image_file(p)]


def _scan_video_frames(cfg: DataCfg, root: Path) -> VideoScan:
    scan = VideoScan("video_frames", root)
    if (root / VIDEO_FRAME_DIR).is_dir():
        frame_root, mask_root = root / VIDEO_FRAME_DIR, root / VIDEO_MASK_DIR
    else:
        frame_root, mask_root = root / cfg.image_dir, root / cfg.mask_dir
    if (frame_root / DAVIS_RESOLUTION_DIR).is_dir() and (mask_root / DAVIS_RESOLUTION_DIR).is_dir():
        frame_root, mask_root = frame_root / DAVIS_RESOLUTION_DIR, mask_root / DAVIS_RESOLUTION_DIR
    for folder in (frame_root, mask_root):
        if not folder.is_dir():
            scan.problems.append(f"{folder}: folder not found; the video_frames layout needs {VIDEO_FRAME_DIR}/<video>/ "
                                 f"and {VIDEO_MASK_DIR}/<video>/ (or data.image_dir / data.mask_dir)")
    if scan.problems:
        return scan
    loose = _image_files(frame_root)
    if loose:
        scan.problems.append(f"{loose[0]}: frame outside a video folder; put each video's frames in "
                             f"{frame_root}/<video>/")
    video_dirs = _subdirs(frame_root)
    for folder in video_dirs:
        vid = folder.name
        frames, numbers = _order_frames(vid, _image_files(folder), scan)
        video = VideoSample(id=vid, frames=frames, n_frames=len(frames), fps=cfg.video.fps, frame_numbers=numbers)
        scan.videos.append(video)
        if not frames:
            scan.flag(vid, f"video {vid}: no frame files in {folder}; add them or remove the folder")
            continue
        index = {strip_image_extension(f.name): i for i, f in enumerate(frames)}
        mask_dir = mask_root / vid
        if mask_dir.is_dir():
            if _subdirs(mask_dir):
                scan.flag(vid, f"video {vid}: {mask_dir} holds sub-folders (one per object, SA-V style); merge them "
                               "into one mask per frame, named like the frame")
            for mask in sorted(_image_files(mask_dir)):
                stem = strip_image_extension(mask.name)
                if stem not in index:
                    scan.flag(vid, f"video {vid} frame {stem}: mask {mask} for a frame that does not exist in "
                                   f"{folder}; add the frame or remove the mask (masks are named like their frames)")
                    continue
                video.masks[index[stem]] = mask
        _no_annotation(video, scan, str(mask_dir))
        if vid not in scan.bad:
            _check_sizes(video, scan)
    known = {d.name for d in video_dirs}
    for orphan in _subdirs(mask_root):
        if orphan.name not in known:
            scan.problems.append(f"video {orphan.name}: masks in {orphan} but no frames in {frame_root / orphan.name}; "
                                 "add the frames or remove the masks")
    return scan


def _scan_video_files(cfg: DataCfg, root: Path) -> VideoScan:
    scan = VideoScan("video_files", root)
    video_root, mask_root = root / VIDEO_FILES_DIR, root / cfg.mask_dir
    if not video_root.is_dir():
        scan.problems.append(f"{video_root}: folder not found; the video_files layout keeps videos in "
                             f"{VIDEO_FILES_DIR}/<name>.mp4 and masks in {cfg.mask_dir}/<name>/<frame index>.png")
        return scan
    files = sorted(p for p in video_root.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    ids = Counter(f.stem for f in files)
    for path in files:
        vid = path.stem
        video = VideoSample(id=vid, frames=path, n_frames=0)
        scan.videos.append(video)
        if ids[vid] > 1:
            scan.flag(vid, f"video {vid}: {ids[vid]} files of that name in {video_root}; rename or remove one")
            continue
        try:
            read_stream_info(video, cfg)
        except DataError as err:
            scan.flag(vid, str(err))
            continue
        if video.n_frames == 0:
            scan.flag(vid, f"video {vid}: {path} holds no frames; re-encode or remove it")
            continue
        mask_dir = mask_root / vid
        if mask_dir.is_dir():
            for mask in sorted(_image_files(mask_dir)):
                stem = strip_image_extension(mask.name)
                if not stem.isdigit():
                    scan.flag(vid, f"video {vid}: mask {mask} is not named by a frame index (0.png, 00017.png ...); "
                                   "rename it")
                elif int(stem) >= video.n_frames:
                    scan.flag(vid, f"video {vid} frame {int(stem)}: mask {mask} for a frame that does not exist (the "
                                   f"video has {video.n_frames} frames, 0-{video.n_frames - 1}); fix or remove it")
                else:
                    video.masks[int(stem)] = mask
        _no_annotation(video, scan, str(mask_dir))
        if vid not in scan.bad:
            _check_sizes(video, scan)
    for orphan in _subdirs(mask_root) if mask_root.is_dir() else []:
        if orphan.name not in ids:
            scan.problems.append(f"video {orphan.name}: masks in {orphan} but no video {orphan.name}.mp4 (or .avi ...) "
                                 f"in {video_root}; add the video or remove the masks")
    return scan


def _read_json(path: Path, scan: VideoScan):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        scan.problems.append(f"{path}: not valid JSON ({err}); fix or re-export it")
        return None


def _frame_masks(video: VideoSample, anno_id: str, entry, scan: VideoScan, where: str) -> dict[int, list[dict]] | None:
    """One object's masks {frame index: [RLE] or [] when absent} from a mask_dict entry (list per frame or
    {index: RLE}); None after flagging a problem."""
    n = video.n_frames
    if isinstance(entry, list):
        if len(entry) > n:
            scan.flag(video.id, f"video {video.id} frame {n}: {where} anno_id {anno_id} has masks for {len(entry)} "
                                f"frames but the video has {n} (masks for frames that do not exist); fix the mask file")
            return None
        if len(entry) < n:
            scan.flag(video.id, f"video {video.id} frame {len(entry)}: {where} anno_id {anno_id} has masks for "
                                f"{len(entry)} of the {n} frames; give one entry per frame (null where the object is "
                                "absent) or an object {\"<frame index>\": mask} for a subset")
            return None
        items = list(enumerate(entry))
    elif isinstance(entry, dict):
        items = []
        for key, rle in entry.items():
            if not str(key).isdigit() or int(key) >= n:
                scan.flag(video.id, f"video {video.id} frame {key}: {where} anno_id {anno_id} has a mask for a frame "
                                    f"that does not exist (the video has {n} frames, 0-{n - 1}); fix the mask file")
                return None
            items.append((int(key), rle))
    else:
        scan.flag(video.id, f"video {video.id}: {where} anno_id {anno_id} must be a list (one mask per frame) or an "
                            "object {\"<frame index>\": mask}; fix the mask file")
        return None
    out: dict[int, list[dict]] = {}
    for i, rle in items:
        if rle is not None and not (isinstance(rle, dict) and "counts" in rle and "size" in rle):
            scan.flag(video.id, f"{video.frame_name(i)}: {where} anno_id {anno_id} is not a run-length encoded mask "
                                "{\"size\": [h, w], \"counts\": ...}; fix the mask file")
            return None
        out[i] = [rle] if rle is not None else []
    return out


def _scan_sa2va_video(cfg: DataCfg, root: Path) -> VideoScan:
    scan = VideoScan("sa2va_video", root)
    exp_path, mask_path = root / cfg.video.expressions_file, root / cfg.video.mask_file
    for path, key in ((exp_path, "data.video.expressions_file"), (mask_path, "data.video.mask_file")):
        if not path.is_file():
            scan.problems.append(f"{path}: not found; set {key} to its name inside data.path")
    if scan.problems:
        return scan
    meta, mask_dict = _read_json(exp_path, scan), _read_json(mask_path, scan)
    if scan.problems:
        return scan
    entries = meta.get("videos") if isinstance(meta, dict) else None
    if not isinstance(entries, dict) or not isinstance(mask_dict, dict):
        scan.problems.append(f"{exp_path}: expected {{\"videos\": {{name: {{\"frames\", \"expressions\"}}}}}} and "
                             f"{mask_path.name} an object {{anno_id: masks}}; fix the files")
        return scan
    frame_root = root / VIDEO_FRAME_DIR if (root / VIDEO_FRAME_DIR).is_dir() else root
    for vid, entry in sorted(entries.items()):
        where = f"{exp_path.name} video {vid}"
        names, expressions = (entry.get("frames"), entry.get("expressions")) if isinstance(entry, dict) else (0, 0)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not isinstance(expressions,
                                                                                                        dict):
            scan.problems.append(f"{where}: needs 'frames' (a list of frame names) and 'expressions' (an object); "
                                 "fix the entry")
            continue
        folder = frame_root / vid
        by_stem = {strip_image_extension(p.name): p for p in _image_files(folder)} if folder.is_dir() else {}
        missing = [n for n in names if n not in by_stem]
        video = VideoSample(id=vid, frames=[], n_frames=len(names), fps=cfg.video.fps)
        scan.videos.append(video)
        if missing:
            scan.flag(vid, f"video {vid} frame {missing[0]}: no frame file {missing[0]}.jpg (or .png ...) in {folder}"
                           f"{f' ({len(missing) - 1} more missing)' if len(missing) > 1 else ''}; add the frames or fix "
                           f"{exp_path.name}")
            continue
        video.frames, video.frame_numbers = _order_frames(vid, [by_stem[n] for n in names], scan)
        # frame indices follow the sorted frame list, as Sa2VA's loaders index mask lists
        for exp_id, exp in sorted(expressions.items()):
            anno_ids = exp.get("anno_id") if isinstance(exp, dict) else None
            anno_ids = [anno_ids] if isinstance(anno_ids, (str, int)) else anno_ids
            if not isinstance(anno_ids, list) or not anno_ids:
                scan.flag(vid, f"{where} expression {exp_id}: needs 'anno_id' (the mask ids in {mask_path.name})")
                break
            unknown = [a for a in anno_ids if str(a) not in mask_dict]
            if unknown:
                scan.flag(vid, f"{where} expression {exp_id}: anno_id {unknown[0]} is not in {mask_path.name}; fix "
                               "the files")
                break
            target = VideoTarget(text=exp.get("exp") if isinstance(exp.get("exp"), str) else None)
            for anno_id in anno_ids:
                masks = _frame_masks(video, str(anno_id), mask_dict[str(anno_id)], scan, mask_path.name)
                if masks is None:
                    break
                for i, rles in masks.items():
                    target.rles.setdefault(i, []).extend(rles)
            video.targets.append(target)
        video.expressions = [t.text for t in video.targets if t.text]
        if vid in scan.bad:
            continue
        _no_annotation(video, scan, mask_path.name)
        if vid not in scan.bad:
            shapes = {i: tuple(int(v) for v in rles[0]["size"]) for t in video.targets for i, rles in t.rles.items()
                      if rles}
            _check_sizes(video, scan, shapes)
    return scan


_SCANNERS = {"video_frames": _scan_video_frames, "sa2va_video": _scan_sa2va_video, "video_files": _scan_video_files}


def _video_id(video: VideoSample) -> str:
    return video.id


def scan_videos(cfg: DataCfg) -> VideoScan:
    """Every video of the data set ``cfg`` points at and every problem, unraised (for ``data inspect``)."""
    if cfg.path is None:
        return VideoScan(cfg.layout, Path("."), problems=["data.path is not set; point it at the video data folder"])
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        return VideoScan(cfg.layout, root, problems=[f"{root}: data folder not found; check data.path"])
    layout = detect_layout(root, cfg) if cfg.layout == "auto" else cfg.layout
    if layout not in VIDEO_LAYOUTS:
        return VideoScan(layout, root, problems=[f"{root}: layout {layout} holds still images, not videos"])
    scan = _SCANNERS[layout](cfg, root)
    scan.videos.sort(key=lambda v: v.id)
    # group_by (patient ids in video names) through the image layouts' grouping, over the usable videos
    grouped = Discovery(layout, root, samples=scan.usable)
    apply_groups(grouped, cfg.split.group_by, name_of=_video_id, noun="video name")
    scan.problems += grouped.problems
    scan.warnings += grouped.warnings
    if not scan.videos and not scan.problems:
        scan.problems.append(f"{root}: no videos found for layout '{layout}'; check data.path and data.layout")
    return scan


def read_stream_info(video: VideoSample, cfg: DataCfg) -> None:
    """A video file's frame count, frame rate (else ``data.video.fps``) and frame size from its stream, into
    ``video``; a DataError naming the file when it is not a readable video."""
    decoder = VideoFileDecoder(video)
    try:
        video.n_frames = len(decoder)
        rate = decoder.stream.average_rate
        video.fps = float(rate) if rate else cfg.video.fps
        ctx = decoder.stream.codec_context
        video.frame_size = (int(ctx.height), int(ctx.width)) if ctx.height and ctx.width else None
    finally:
        decoder.close()


def discover_videos(cfg: DataCfg) -> list[VideoSample]:
    """The videos of the data set ``cfg`` points at, sorted by id; one DataError listing every problem found."""
    scan = scan_videos(cfg)
    raise_or_warn(scan.problems, scan.warnings, scan.root)
    videos = scan.usable
    return videos[: cfg.max_samples] if cfg.max_samples is not None else videos


def video_from_path(path: str | Path, cfg: DataCfg) -> VideoSample:
    """One video to predict on, unannotated: a video file (decoded through PyAV) or a folder of frame files (ordered
    by the number ending their names, as the video_frames layout orders them). DataError in one line naming the path
    (and the frame) when it is neither, empty, unreadable, numbered with gaps or of mixed frame sizes."""
    path = Path(path).expanduser()
    if path.is_dir():
        scan = VideoScan("video_frames", path)
        frames, numbers = _order_frames(path.name, _image_files(path), scan)
        if not frames:
            raise DataError(f"{path}: no frame files (png, jpg, tif ...) in this folder; give a video file or a folder "
                            "of frames")
        video = VideoSample(id=path.name, frames=frames, n_frames=len(frames), fps=cfg.video.fps,
                            frame_numbers=numbers)
        if not scan.problems:
            _check_sizes(video, scan)
        if scan.problems:
            raise DataError(scan.problems[0])
        return video
    if not path.is_file():
        raise DataError(f"{path}: no such video file or frame folder")
    if is_image_file(path):
        raise DataError(f"{path}: a single image; give a video file or the folder of the video's frames")
    video = VideoSample(id=path.stem, frames=path, n_frames=0)
    read_stream_info(video, cfg)
    if video.n_frames == 0:
        raise DataError(f"video {video.id}: {path} holds no frames; re-encode it")
    return video
