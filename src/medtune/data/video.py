"""Videos as data: ``VideoSample`` (paths, nothing decoded), frame readers with bounded memory, masks of annotated
frames, the training clip sampler and the clip dataset.

A video is a run of frames (a folder of frame files, or one video file decoded through PyAV) of which any subset is
annotated. Training sees clips of ``data.video.clip_length`` frames around annotated frames: the unannotated frames
of a clip carry no loss but do carry the model's memory. A clip is a pure function of (seed, epoch, index), like
``TrainPatchDataset``'s items, so a resumed run replays exactly the clips an uninterrupted one would have seen.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medtune.config import DataCfg
from medtune.data.augment import Augmentation
from medtune.data.datasets import resize_square
from medtune.data.io import pixels_to_chw, read_image, read_mask
from medtune.data.layouts import VIDEO_LAYOUTS, detect_layout
from medtune.data.loading import MaskWarning
from medtune.data.types import DataError

# A forward jump of at most this many frames is decoded through; a longer one (or a step back) seeks to the nearest
# key frame before the target: decoding 30 frames costs about what a seek and a GOP of decoding do.
_MAX_DECODE_AHEAD = 30
# collate_clips marks the frames it appends to a short clip with this frame index (never annotated)
PAD_FRAME_INDEX = -1
# a clip's target when its masks are the union of the video's objects (no expression drawn)
NO_TARGET = -1
# the seed-sequence entry of the random stream a clip's expression is drawn from (sample_clip's has none, the
# augmentation's 1)
_TARGET_STREAM = 2


@dataclass
class VideoTarget:
    """One referring expression of a video (Sa2VA-style annotations) and its masks: frame index -> RLE objects
    (COCO run-length encodings, unioned; an empty list is an annotated frame where the object is absent)."""

    text: str | None
    rles: dict[int, list[dict]] = field(default_factory=dict)


@dataclass
class VideoSample:
    """One video, nothing decoded. Frame ``i`` is ``frames[i]`` (frame files) or the i-th frame of the video file."""

    id: str  # unique and stable: the video's folder / file / entry name
    frames: list[Path] | Path  # frame files in order, or one video file
    n_frames: int
    masks: dict[int, Path] = field(default_factory=dict)  # annotated frame index -> mask file
    targets: list[VideoTarget] = field(default_factory=list)  # sa2va_video: per expression, RLE per frame
    expressions: list[str] = field(default_factory=list)
    fps: float | None = None
    split: str | None = None  # split shipped by the layout (none of the video layouts ships one yet)
    group: str | None = None  # patient id (data.split.group_by): videos of one group never straddle two splits
    frame_numbers: list[int] | None = None  # the number in each frame file's name (gaps are checked on it)
    frame_size: tuple[int, int] | None = None  # (H, W) of the frames, as far as discovery could tell

    @property
    def annotated(self) -> list[int]:
        """Indices of the annotated frames, ascending."""
        return sorted(set(self.masks) | {i for t in self.targets for i in t.rles})

    @property
    def is_file(self) -> bool:
        return isinstance(self.frames, Path)

    def frame_name(self, i: int) -> str:
        """How a message names frame ``i``: its file, or its index in the video file."""
        if self.is_file:
            return f"video {self.id} frame {i}"
        return f"video {self.id} frame {i} ({self.frames[i].name})"


def is_video_data(cfg: DataCfg) -> bool:
    """Whether ``cfg`` points at videos (a video layout, given or detected)."""
    if cfg.layout != "auto":
        return cfg.layout in VIDEO_LAYOUTS
    if cfg.path is None:
        return False
    try:
        return detect_layout(cfg.path, cfg) in VIDEO_LAYOUTS
    except DataError:
        return False


# ---- reading frames -----------------------------------------------------------------------------------------------
def _av_error_types() -> tuple[type[BaseException], ...]:
    import av

    return (av.FFmpegError, OSError, ValueError)


class VideoFileDecoder:
    """Frames of a video file by index, decoded sequentially: reading i, i+1, ... decodes each frame once; a jump
    back or far ahead seeks to the key frame before it. Holds one decoded frame, never the video."""

    def __init__(self, video: VideoSample):
        import av

        self.video = video
        try:
            self.container = av.open(str(video.frames))
            self.stream = self.container.streams.video[0]
            # presentation timestamps of every frame, in display order, from the packets alone (no decoding)
            self.pts = sorted(p.pts for p in self.container.demux(self.stream) if p.pts is not None)
        except _av_error_types() as err:
            raise DataError(f"video {video.id}: {video.frames} cannot be read as a video ({type(err).__name__}: "
                            f"{err}); re-encode it (e.g. ffmpeg -i in.avi out.mp4) or remove it") from None
        except IndexError:
            raise DataError(f"video {video.id}: {video.frames} holds no video stream; remove it") from None
        self._frames: Iterator | None = None
        self._next = 0  # index of the frame self._frames yields next

    def __len__(self) -> int:
        return len(self.pts)

    def _restart(self, i: int) -> None:
        self.container.seek(self.pts[i], stream=self.stream, backward=True, any_frame=False)
        self._frames = self.container.decode(self.stream)
        self._next = None  # unknown until a frame's pts says where the seek landed

    def read_pixels(self, i: int) -> np.ndarray:
        try:
            if self._frames is None or self._next is None or not 0 <= i - self._next <= _MAX_DECODE_AHEAD:
                self._restart(i)
            target = self.pts[i]
            for frame in self._frames:
                if frame.pts is None or frame.pts < target:
                    continue
                self._next = i + 1
                return frame.to_ndarray(format="rgb24")
        except _av_error_types() as err:
            self._frames = None
            raise DataError(f"{self.video.frame_name(i)}: cannot be decoded ({type(err).__name__}: {err}); "
                            "re-encode the video or remove it") from None
        self._frames = None
        raise DataError(f"{self.video.frame_name(i)}: the video file ends before this frame; re-encode it")

    def close(self) -> None:
        self.container.close()


class FrameReader:
    """``len()``, ``read(i) -> float32 [C, H, W] in [0, 1]`` and iteration in order over one video's frames, one
    frame in memory at a time. Every frame must have the size of the first one read (DataError naming the frame)."""

    def __init__(self, video: VideoSample, cfg: DataCfg):
        self.video, self.channels, self.image_max = video, cfg.channels, cfg.image_max
        self._decoder = VideoFileDecoder(video) if video.is_file else None
        self.size: tuple[int, int] | None = video.frame_size
        # the last frame read: propagation reads each frame for the model and again for its outputs (overlay), and a
        # second read of a video file's frame would seek back to the key frame and decode forward again
        self._last: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._decoder) if self._decoder is not None else len(self.video.frames)

    def read(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"video {self.video.id} has {len(self)} frames, not a frame {i}")
        if self._last is not None and self._last[0] == i:
            return self._last[1].copy()
        if self._decoder is not None:
            image = pixels_to_chw(self._decoder.read_pixels(i), self.channels, self.image_max, self.video.frames)
        else:
            image = read_image(self.video.frames[i], self.channels, self.image_max)
        size = tuple(image.shape[-2:])
        if self.size is None:
            self.size = size
        elif size != tuple(self.size):
            raise DataError(f"{self.video.frame_name(i)}: frame is {size[0]}x{size[1]} but the video's frames are "
                            f"{self.size[0]}x{self.size[1]}; re-export the frames at one size")
        self._last = (i, image)
        return image.copy()

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.read(i)

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_frames(video: VideoSample, cfg: DataCfg) -> FrameReader:
    """A reader of the video's frames (close it, or use it as a context manager)."""
    return FrameReader(video, cfg)


# COCO's compressed run-length strings: each count (from the third on, as the difference to the count two before)
# in little-endian 5-bit groups, a 6th bit saying another group follows, offset into printable ASCII from "0";
# the last group's top data bit is the sign.
_RLE_CHAR_OFFSET = 48
_RLE_MORE, _RLE_SIGN, _RLE_DATA = 0x20, 0x10, 0x1F


def _rle_string_counts(text: str | bytes) -> list[int]:
    data = text.encode() if isinstance(text, str) else bytes(text)
    counts: list[int] = []
    p = 0
    while p < len(data):
        value = shift = 0
        while True:
            if p >= len(data):
                raise ValueError("the string ends inside a count")
            c = data[p] - _RLE_CHAR_OFFSET
            p += 1
            value |= (c & _RLE_DATA) << shift
            shift += 5
            if not c & _RLE_MORE:
                if c & _RLE_SIGN:
                    value -= 1 << shift
                break
        counts.append(value + counts[-2] if len(counts) > 2 else value)
    return counts


def encode_rle(mask: np.ndarray) -> dict:
    """uint8/bool [H, W] -> COCO's compressed RLE ``{"size": [H, W], "counts": str}`` (as Sa2VA's mask_dict.json
    and pycocotools write it)."""
    mask = np.asarray(mask).astype(bool)
    flat = mask.ravel(order="F")  # COCO runs go down the columns
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs  # runs start with background
    chars = []
    for i, x in enumerate(runs):
        x = x - runs[i - 2] if i > 2 else x
        while True:
            c, x = x & _RLE_DATA, x >> 5
            more = x != -1 if c & _RLE_SIGN else x != 0
            chars.append(chr((c | (_RLE_MORE if more else 0)) + _RLE_CHAR_OFFSET))
            if not more:
                break
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": "".join(chars)}


def decode_rle(rle: dict, where: str) -> np.ndarray:
    """A COCO run-length encoding (compressed string or uncompressed counts list) -> uint8 [H, W] in {0, 1}."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
        counts = [int(c) for c in counts] if isinstance(counts, list) else _rle_string_counts(counts)
        if any(c < 0 for c in counts) or sum(counts) != h * w:
            raise ValueError(f"its runs cover {sum(counts)} pixels, not {h}x{w}")
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{where}: not a run-length encoded mask ({type(err).__name__}: {err}); fix the mask "
                        "file") from None
    flat = np.repeat(np.arange(len(counts), dtype=np.uint8) % 2, counts)
    return np.ascontiguousarray(flat.reshape((h, w), order="F"))


def read_video_mask(video: VideoSample, i: int, cfg: DataCfg | None = None,
                    target: int | None = None) -> np.ndarray:
    """The mask of annotated frame ``i``: uint8 [H, W] in {0, 1} (the union of the video's expressions, or the
    expression ``target``). DataError when frame ``i`` is not annotated."""
    labels = cfg.mask_labels if cfg is not None else None
    if i in video.masks and target is None:
        mask, warning = read_mask(video.masks[i], labels)
        if warning:
            warnings.warn(warning, MaskWarning, stacklevel=2)
        return mask
    targets = video.targets if target is None else [video.targets[target]]
    rles = [rle for t in targets for rle in t.rles.get(i, [])]
    if not any(i in t.rles for t in targets):
        raise DataError(f"{video.frame_name(i)}: not annotated (annotated frames: {video.annotated[:10]} ...)")
    if not rles:  # annotated, object absent
        if video.frame_size is None:
            raise DataError(f"{video.frame_name(i)}: empty annotation and the frame size is unknown")
        return np.zeros(video.frame_size, dtype=np.uint8)
    mask = decode_rle(rles[0], video.frame_name(i))
    for rle in rles[1:]:
        part = decode_rle(rle, video.frame_name(i))
        if part.shape != mask.shape:
            raise DataError(f"{video.frame_name(i)}: its masks have different sizes; fix the mask file")
        mask |= part
    return mask


def check_video(video: VideoSample, cfg: DataCfg) -> list[str]:
    """Decode every frame and every mask of a video: the problems found (each one line naming video and frame)."""
    problems: list[str] = []
    try:
        with open_frames(video, cfg) as reader:
            if len(reader) != video.n_frames:
                problems.append(f"video {video.id}: {len(reader)} frames decoded but {video.n_frames} were counted; "
                                "re-encode the video")
            for i in range(len(reader)):
                try:
                    reader.read(i)
                except DataError as err:
                    problems.append(str(err))
            size = reader.size
    except DataError as err:
        return [str(err)]
    for i in video.annotated:
        try:
            mask = read_video_mask(video, i, cfg)
        except DataError as err:
            problems.append(str(err))
            continue
        if size is not None and mask.shape != tuple(size):
            problems.append(f"{video.frame_name(i)}: mask is {mask.shape[0]}x{mask.shape[1]} but the frame is "
                            f"{size[0]}x{size[1]}; re-export the mask at the frame size")
    return problems


# ---- training clips -----------------------------------------------------------------------------------------------
def sample_clip(n_frames: int, annotated: Sequence[int], length: int, seed: int, epoch: int, index: int,
                stride: int = 1) -> list[int]:
    """Frame indices (ascending) of a training clip: ``length`` frames ``stride`` apart holding an annotated frame,
    a pure function of its arguments.

    An annotated frame (the anchor) is drawn uniformly, then the clip's position around it, uniformly among those
    that fit in the video; other annotated frames the clip covers are supervised too, the rest carry memory only.
    A video with fewer than ``length`` frames at ``stride`` (from the anchor's phase) gives a shorter clip: frames
    are never repeated, since a repeated frame would show the memory a scene standing still.
    """
    if not annotated:
        raise ValueError("sample_clip needs at least one annotated frame")
    if length < 1 or stride < 1:
        raise ValueError(f"clip length and stride must be >= 1, got {length} and {stride}")
    rng = np.random.default_rng([int(seed), int(epoch), int(index)])
    anchor = int(annotated[int(rng.integers(len(annotated)))])
    if not 0 <= anchor < n_frames:
        raise ValueError(f"annotated frame {anchor} is outside a video of {n_frames} frames")
    phase, position = anchor % stride, anchor // stride  # the anchor's grid of frames `stride` apart
    grid = len(range(phase, n_frames, stride))
    take = min(length, grid)
    first = int(rng.integers(max(0, position - take + 1), min(position, grid - take) + 1))
    return [phase + stride * (first + k) for k in range(take)]


class VideoClipDataset(Dataset):
    """Training clips keyed by ``(index, epoch)`` (the keys ``StepBatchSampler`` yields): item ``index`` is clip
    ``index // len(videos)`` of video ``index % len(videos)``, ``data.video.clips_per_video`` clips per video per
    epoch. Frames are resized to data.patch_size square (as data.sampling=whole_image) and augmented alike (one
    transform for the whole clip). An item:

    ``{"frames": float32 [T, C, S, S] in [0, 1], "masks": float32 [T, 1, S, S] (zeros where not annotated),
    "annotated": bool [T], "frame_index": long [T], "fov": float32 [T, 1, S, S] (the in-view region: ones, less
    what augmentation moved out), "id": str, "target": int (the expression, or NO_TARGET), "text": str | None}``.

    ``per_target``: a clip of a video with referring expressions (sa2va_video) is about one of them, drawn with the
    clip (its masks and annotated frames are that expression's, ``text`` its words, not augmented: a flip would make
    "the left vessel" wrong), as a model that reads the question needs; otherwise the masks are the union of the
    video's objects.
    """

    def __init__(self, videos: Sequence[VideoSample], cfg: DataCfg, seed: int, per_target: bool = False):
        if not videos:
            raise DataError("VideoClipDataset needs at least one training video")
        unannotated = [v.id for v in videos if not v.annotated]
        if unannotated:
            raise DataError(f"video {unannotated[0]}: no annotated frame; annotate at least one frame or remove it")
        self.videos, self.cfg, self.seed, self.per_target = list(videos), cfg, int(seed), per_target
        self._augment = Augmentation(cfg.augment)

    def __len__(self) -> int:
        return len(self.videos) * self.cfg.video.clips_per_video

    def clip_target(self, index: int, epoch: int = 0) -> int:
        """The expression clip ``index`` is about (among those with an annotated frame), or NO_TARGET: a pure
        function of (seed, epoch, index), on a stream of its own."""
        video = self.videos[index % len(self.videos)]
        annotated = [k for k, t in enumerate(video.targets) if t.rles]
        if not self.per_target or not annotated:
            return NO_TARGET
        rng = np.random.default_rng([self.seed, epoch, index, _TARGET_STREAM])
        return annotated[int(rng.integers(len(annotated)))]

    def clip_frames(self, index: int, epoch: int = 0) -> list[int]:
        video = self.videos[index % len(self.videos)]
        v = self.cfg.video
        target = self.clip_target(index, epoch)
        annotated = video.annotated if target == NO_TARGET else sorted(video.targets[target].rles)
        return sample_clip(video.n_frames, annotated, v.clip_length, self.seed, epoch, index, v.clip_stride)

    def __getitem__(self, key) -> dict:
        index, epoch = (key, 0) if isinstance(key, (int, np.integer)) else key
        index, epoch = int(index), int(epoch)
        video = self.videos[index % len(self.videos)]
        target = self.clip_target(index, epoch)
        frame_index = self.clip_frames(index, epoch)
        annotated = set(video.annotated if target == NO_TARGET else video.targets[target].rles)
        with open_frames(video, self.cfg) as reader:
            frames = np.stack([reader.read(i) for i in frame_index])  # ascending: one sequential decode
            size = reader.size
        masks = np.zeros((len(frame_index), *size), dtype=np.float32)
        for k, i in enumerate(frame_index):
            if i in annotated:
                mask = read_video_mask(video, i, self.cfg, None if target == NO_TARGET else target)
                if mask.shape != tuple(size):
                    raise DataError(f"{video.frame_name(i)}: mask is {mask.shape[0]}x{mask.shape[1]} but the frame "
                                    f"is {size[0]}x{size[1]}; re-export the mask at the frame size")
                masks[k] = mask
        t, c = frames.shape[:2]
        labels = torch.cat([torch.from_numpy(masks), torch.ones(1, *size)])  # [T + 1, H, W]: masks, in-view
        image, labels = resize_square(torch.from_numpy(frames).reshape(t * c, *size), labels, self.cfg.patch_size)
        text = None if target == NO_TARGET else video.targets[target].text
        mask, fov = labels[:t], labels[t:]
        if text is None:  # a flip would make "the left vessel" a wrong answer: words are not augmented (as images)
            rng = np.random.default_rng([self.seed, epoch, index, 1])  # the clip's own stream, apart from sample_clip's
            image, mask, fov = self._augment(image, mask, fov, rng)
        s = self.cfg.patch_size
        return {
            "frames": image.float().clamp(0.0, 1.0).reshape(t, c, s, s).contiguous(),
            "masks": (mask > 0.5).float().reshape(t, 1, s, s).contiguous(),
            "annotated": torch.tensor([i in annotated for i in frame_index], dtype=torch.bool),
            "frame_index": torch.tensor(frame_index, dtype=torch.long),
            "fov": (fov > 0.5).float().reshape(1, 1, s, s).expand(t, 1, s, s).contiguous(),
            "id": video.id,
            "target": target,
            "text": text,
        }


def collate_clips(items: list[dict]) -> dict:
    """Clips -> a batch: tensors stacked to [B, T, ...], ids a list. Shorter clips (short videos) are padded at the
    end with their last frame, not annotated, frame_index ``PAD_FRAME_INDEX``: memory runs forward, so frames after
    a clip's last real one change none of its predictions, and carry no loss."""
    if not items:
        raise ValueError("collate_clips needs at least one clip")
    longest = max(len(item["frame_index"]) for item in items)
    padded = []
    for item in items:
        missing = longest - len(item["frame_index"])
        if missing:
            item = dict(item)
            for key in ("frames", "masks", "fov"):
                item[key] = torch.cat([item[key], item[key][-1:].expand(missing, *item[key].shape[1:])])
            item["annotated"] = torch.cat([item["annotated"], torch.zeros(missing, dtype=torch.bool)])
            item["frame_index"] = torch.cat([item["frame_index"],
                                             torch.full((missing,), PAD_FRAME_INDEX, dtype=torch.long)])
        padded.append(item)
    batch = {key: torch.stack([item[key] for item in padded])
             for key in ("frames", "masks", "annotated", "frame_index", "fov")}
    batch["id"] = [item["id"] for item in padded]
    return batch
