"""The data of one run folder: samples, RUN/split.json, RUN/intensity.json (and RUN/scale.json), loaded per split.

Training, evaluation, reports and RL's `init_from` all read a run's data through these functions, so every consumer
sees the same split, the same image intensity scale and the same scale normalisation. The run files are written
by the main process only, atomically; with ``wait_for_main`` the other processes re-read them after a barrier.
"""
from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from medtune.atomic import write_text_atomic
from medtune.config import Config
from medtune.data.decode_cache import decode_cache
from medtune.data.inspect import duplicate_groups, find_near_duplicates
from medtune.data.io import dataset_image_max
from medtune.data.layouts import discover, format_problems
from medtune.data.loading import LazySamples, load_all, scale_factors
from medtune.data.splits import check_split, load_split, make_split, save_split
from medtune.data.types import DataError, LoadedSample, Sample
from medtune.data.video import VideoSample, check_video, is_video_data
from medtune.data.video_inspect import find_near_duplicate_videos
from medtune.data.video_layouts import discover_videos
from medtune.errors import ConfigError, UserError

log = logging.getLogger("medtune")

INTENSITY_FILE = "intensity.json"
READABLE_FILE = "readable.json"


@dataclass
class RunData:
    samples: dict[str, Sample] | dict[str, VideoSample]  # videos for a video layout (split by video, always)
    split: dict[str, list[str]]
    target_scale: float | None  # scale normalisation target (FOV diameter), None when off
    is_main: bool = True  # only the main process writes run files
    # scale normalisation factor of each training sample, as RUN/scale.json recorded it: a resume reads no image for it
    train_scales: dict[str, float] | None = None


def prepare_split(cfg: Config, run_dir: Path, is_main: bool = True,
                  wait_for_main: Callable[[], None] | None = None) -> RunData:
    """Discover samples and create (or reuse) RUN/split.json and RUN/intensity.json, so eval and resumes see the same
    split and read images the same way.

    Sets ``cfg.data.image_max`` (when the config leaves it open) to the data set's intensity scale, so every later
    load with ``cfg.data`` reads images like training did. Only the main process writes the files (atomically);
    pass ``wait_for_main`` (``accelerator.wait_for_everyone``) from multi-process recipes so the others then re-read
    the main process's files instead of trusting their own copy.
    """
    samples = {s.id: s for s in discover_any(cfg)}
    split_path = run_dir / "split.json"
    new_split = not split_path.exists()
    if new_split:
        seed = cfg.data.split.seed if cfg.data.split.seed is not None else cfg.run.seed
        groups = duplicate_groups_for_split(cfg, list(samples.values()))
        if cfg.data.split.folds:
            from medtune.data.kfold import kfold_split

            split = kfold_split(list(samples.values()), cfg.data.split, seed, duplicate_groups=groups)
        else:
            split = make_split(list(samples.values()), cfg.data.split, seed, duplicate_groups=groups)
    else:
        split = load_split(split_path)
        check_split(split, list(samples.values()))
    intensity_path = run_dir / INTENSITY_FILE
    recorded = _read_json(intensity_path) if intensity_path.exists() else None
    intensity = _intensity_record(cfg, recorded, samples)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if new_split:
            save_split(split_path, split)
        if intensity != recorded:
            write_text_atomic(intensity_path, json.dumps(intensity, indent=1) + "\n")
    if wait_for_main is not None:
        wait_for_main()
        if not is_main:
            split = load_split(split_path)
            check_split(split, list(samples.values()))
            intensity = _read_json(intensity_path)
    if cfg.data.image_max is None:
        cfg.data.image_max = intensity.get("image_max")
    target, train_scales = None, None
    scale_path = run_dir / "scale.json"
    if cfg.data.scale_norm.enabled and scale_path.exists():
        recorded_scale = _read_json(scale_path)
        target, train_scales = recorded_scale["target_fov_diameter"], recorded_scale.get("train_scales")
    return RunData(samples=samples, split=split, target_scale=target, is_main=is_main, train_scales=train_scales)


def discover_any(cfg: Config) -> list[Sample] | list[VideoSample]:
    """The data set's samples: images, or videos for a video layout (a video is one sample: its frames never
    straddle two splits)."""
    if not is_video_data(cfg.data):
        return discover(cfg.data)
    if cfg.data.scale_norm.enabled:
        raise ConfigError("data.scale_norm is not supported for videos yet; set data.scale_norm.enabled=false")
    return discover_videos(cfg.data)


def _image_files(samples) -> list[Path]:
    """The image files whose bit depth sets the data set's intensity scale: every still image, or every frame file
    (a video file decodes to 8 bits)."""
    out = []
    for s in samples:
        if isinstance(s, VideoSample):
            out += [] if s.is_file else list(s.frames)
        else:
            out.append(s.image)
    return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot be read ({err}); delete it to have it made again") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object; delete it to have it made again")
    return data


def _intensity_record(cfg: Config, recorded: dict | None, samples: dict[str, Sample]) -> dict:
    """How integer images wider than 8 bits are scaled to [0, 1] in this run: one full scale for the data set, from
    the config, else as recorded, else the bit depth of the data set's images (all splits: a property of the
    acquisition, not of one split, so the k runs of a cross-validation read images alike)."""
    if cfg.data.image_max is not None:
        if recorded is not None and recorded.get("image_max") == cfg.data.image_max:
            return recorded
        return {"image_max": cfg.data.image_max, "source": "data.image_max"}
    if recorded is not None:
        return recorded
    image_max, observed = dataset_image_max(_image_files(samples.values()))
    if image_max is None:
        return {"image_max": None, "source": f"the data set's {len(samples)} images are 8-bit (or float): /255"}
    return {"image_max": image_max, "observed_max": observed,
            "source": f"smallest 8/12/16-bit full scale holding the maximum of the data set's {len(samples)} images"}


def use_recorded_image_max(cfg: Config, run_dir: str | Path) -> None:
    """Set ``cfg.data.image_max`` from RUN/intensity.json (when the config leaves it open), so predictions and
    reports read images like training did."""
    path = Path(run_dir) / INTENSITY_FILE
    if cfg.data.image_max is None and path.exists():
        cfg.data.image_max = _read_json(path).get("image_max")


def duplicate_groups_for_split(cfg: Config, samples: list[Sample]) -> dict[str, str] | None:
    """Near-duplicate groups that must not straddle splits (a near-copy of a test image must not train), or None.

    Not used when the layout ships its split (the published test set stays as published; `data inspect --split`
    reports straddling pairs), nor when the hash chains a large share of the images into one group: in homogeneous
    modalities (fundus photographs) distinct images hash as close as true copies do, and grouping them would
    collapse the split."""
    if not cfg.data.split.keep_duplicates_together:
        return None
    if cfg.data.split.use_layout_split and any(s.split for s in samples) and not cfg.data.split.folds:
        return None
    if samples and isinstance(samples[0], VideoSample):
        pairs = find_near_duplicate_videos(samples, cfg.data, cfg.data.duplicate_hash_distance)
    else:
        pairs = find_near_duplicates(samples, cfg.data.duplicate_hash_distance)
    groups = duplicate_groups(pairs)
    largest = max(Counter(groups.values()).values(), default=0)
    if largest > max(3, 0.1 * len(samples)):
        _warn(f"near-duplicate grouping skipped: the perceptual hash (distance <= {cfg.data.duplicate_hash_distance}) "
             f"chains {largest} of {len(samples)} images into one group, so it cannot tell these images apart; "
             "check `medtune data inspect` and lower data.duplicate_hash_distance if copies are expected")
        return None
    if pairs:
        log.info("%d near-duplicate pairs kept within one split", len(pairs))
    return groups


def load_split_samples(cfg: Config, data: RunData, name: str, run_dir: Path | None = None,
                       limit: int | None = None, lazy: bool = False) -> Sequence[LoadedSample]:
    """The split's samples, decoded now (a list) or, with ``lazy``, on access (``LazySamples``: training, whose
    data may not fit in memory; through the ``data.cache`` decode cache when one is set). Scale normalisation reads
    each image's FOV once, one image at a time."""
    ids = data.split.get(name, [])[: limit or None]
    samples = [data.samples[i] for i in ids]
    if samples and isinstance(samples[0], VideoSample):
        return samples  # videos stay undecoded: clips and evaluation read their frames on demand (open_frames)
    cache = decode_cache(cfg.data, run_dir) if lazy else None
    if not cfg.data.scale_norm.enabled:
        return LazySamples(samples, cfg.data, cache=cache) if lazy else load_all(samples, cfg.data)
    # the native-scale pass is not what training reads: it bypasses the cache
    native = LazySamples(samples, cfg.data) if lazy else load_all(samples, cfg.data)
    # The target is fixed by the training set once and stored, so val/test and later evals resample identically.
    # scale_factors takes one pass over its samples, so a LazySamples streams through them, holding one at a time.
    scales = None
    if data.target_scale is None:
        train = native if name == "train" else LazySamples([data.samples[i] for i in data.split["train"]], cfg.data)
        data.target_scale, data.train_scales = scale_factors(train, cfg.data.scale_norm)
        if run_dir is not None and data.is_main:
            write_text_atomic(run_dir / "scale.json", json.dumps({"target_fov_diameter": data.target_scale,
                                                                   "train_scales": data.train_scales}))
    if name == "train" and data.train_scales is not None and all(s.id in data.train_scales for s in samples):
        scales = {s.id: data.train_scales[s.id] for s in samples}
    if scales is None:
        _, scales = scale_factors(native, cfg.data.scale_norm, target=data.target_scale)
    return LazySamples(samples, cfg.data, scales, cache) if lazy else load_all(samples, cfg.data, scales=scales)


# ---- another data set for a trained run (`medtune eval RUN --data FILE`) ------------------------------------------
EXTERNAL_PREFIX = "data-"  # RUN/eval/data-<name>: never a split name, so the run's own evaluations stay as they are


def evaluation_data(cfg: Config, run_dir: Path, split: str, data_file: str | Path | None = None,
                    image_root: str | Path | None = None) -> tuple[RunData, tuple[Config, RunData] | None]:
    """What an evaluation of ``split`` reads: the run's data and, with ``data_file``, the other data set
    (``external_data``: read, and refused if it must be, before any validation pass). An empty split is one line."""
    data = prepare_split(cfg, run_dir)
    if data_file is None and not data.split.get(split):
        raise UserError(f"split '{split}' of {run_dir / 'split.json'} is empty; choose one of "
                        f"{[k for k, v in data.split.items() if v]}")
    return data, (external_data(cfg, data, data_file, image_root, run_dir) if data_file is not None else None)


def evaluated_split(cfg: Config, data: RunData, split: str, external: tuple[Config, RunData] | None,
                    ) -> tuple[Config, RunData, str, dict]:
    """What an evaluation measures once it has calibrated on the run's validation split: the run's ``split``, or
    (``external`` from ``evaluation_data``) every sample of the other data set, its one split. Returns (config, data,
    split, the summary's ``source`` entries: {"data": path} for another data set)."""
    if external is None:
        return cfg, data, split, {}
    ext_cfg, ext_data = external
    return ext_cfg, ext_data, next(iter(ext_data.split)), {"data": ext_cfg.data.path}


def external_eval_name(path: str | Path) -> str:
    """The eval folder (and split) name of another data file: ``data-`` + its name without extension."""
    return EXTERNAL_PREFIX + Path(path).stem


def external_data(cfg: Config, run_data: RunData, path: str | Path, image_root: str | Path | None = None,
                  run_dir: Path | None = None) -> tuple[Config, RunData]:
    """Every sample of another data file (or folder, in the run's layout) as one split named
    ``external_eval_name(path)``, read like the run's own data: its intensity scale and scale-normalisation target.
    Image paths stay inside the file's image root (``image_root``, default the file's folder), as in training.
    Returns (the run's config with data.path / data.image_root pointing there, the data)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"--data {path}: no such file or folder")
    ext = cfg.model_copy(deep=True)
    ext.data.path = str(path.absolute())
    ext.data.image_root = str(Path(image_root).expanduser().absolute()) if image_root else None
    ext.data.max_samples = None  # the run's quick-trial limit is about its own data
    if run_dir is not None:
        use_recorded_image_max(ext, run_dir)
    samples = {s.id: s for s in discover_any(ext)}
    if not samples:
        raise DataError(f"--data {path}: no samples found")
    if cfg.data.scale_norm.enabled and run_data.target_scale is None:  # fixed by the run's training set, as in eval
        load_split_samples(cfg, run_data, "train", run_dir)
    name = external_eval_name(path)
    earlier = run_dir / "eval" / name / "summary.json" if run_dir is not None else None
    if earlier is not None and earlier.is_file():
        other = json.loads(earlier.read_text()).get("data")
        if other != ext.data.path:
            raise UserError(f"{earlier.parent} holds the evaluation of {other}, another file of that name: copy "
                            f"{path} under another name (the folder is named after it), or delete that folder")
    trained = {_source(run_data.samples[i]) for i in run_data.split.get("train", []) if i in run_data.samples}
    seen = sum(_source(s) in trained for s in samples.values())
    if seen:
        _warn(f"--data {path}: {seen} of its {len(samples)} images are in the run's training split; its scores are "
              "not held-out scores")
    return ext, RunData(samples=samples, split={name: list(samples)}, target_scale=run_data.target_scale,
                        is_main=False)


def _source(sample: Sample | VideoSample) -> str:
    """The file(s) a sample is read from: its image, a video's file or first frame."""
    if isinstance(sample, VideoSample):
        return str(sample.frames if sample.is_file else sample.frames[0])
    return str(sample.image)


def check_readable(cfg: Config, data: RunData, names: tuple[str, ...] = ("test",), run_dir: Path | None = None
                   ) -> None:
    """Read the splits training decodes only later (validation, on access) or never (test), so a broken image fails
    now with every problem listed, not after a night of training. Holds one image per thread. With ``run_dir``, the
    files found readable are recorded in RUN/readable.json (size and modification time, with the decode settings),
    and a resume reads only the files that changed since."""
    samples = [data.samples[i] for name in names for i in data.split.get(name, [])]
    if samples and isinstance(samples[0], VideoSample):
        problems = [p for video in samples for p in check_video(video, cfg.data)]
        if problems:
            raise DataError(format_problems(problems, f"the {'/'.join(names)} videos"))
        return
    path = run_dir / READABLE_FILE if run_dir is not None else None
    settings = cfg.data.model_dump(mode="json", include={"channels", "image_max", "mask_labels", "derive_fov"})
    recorded = _read_json(path) if path is not None and path.exists() else {}
    seen = recorded.get("files", {}) if recorded.get("settings") == settings else {}
    stamps = {str(f): _stamp(f) for s in samples for f in s.files()}
    load_all([s for s in samples if any(seen.get(str(f)) != stamps[str(f)] for f in s.files())], cfg.data,
             keep=False)
    if path is not None and data.is_main and stamps != seen:
        write_text_atomic(path, json.dumps({"settings": settings, "files": stamps}) + "\n")


def _stamp(path: Path) -> list[int] | None:
    try:
        st = Path(path).stat()
    except OSError:  # missing: load_all names it
        return None
    return [st.st_size, st.st_mtime_ns]


def _warn(msg: str) -> None:
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
