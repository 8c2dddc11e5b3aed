"""``Sample`` (paths) -> ``LoadedSample`` (arrays), with optional scale normalisation by FOV diameter."""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from skimage.transform import resize
from tqdm.auto import tqdm

from medtune.config import DataCfg, ScaleNormCfg
from medtune.data.io import derive_fov, image_header_size, rasterize_polygons, read_image, read_mask
from medtune.data.layouts import format_problems
from medtune.data.types import DataError, LoadedSample, Sample
from medtune.threads import usable_cores

log = logging.getLogger(__name__)


class MaskWarning(UserWarning):
    """A mask was readable but not clean (e.g. more than two grey levels) and was repaired on load."""


def _shape_text(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}x{shape[1]}"


def _resample(arr: np.ndarray, shape: tuple[int, int], order: int) -> np.ndarray:
    """[H,W] or [C,H,W] -> same layout at ``shape``; order 1 = bilinear (images), 0 = nearest (labels)."""
    if arr.shape[-2:] == tuple(shape):
        return arr
    downscale = shape[0] < arr.shape[-2] or shape[1] < arr.shape[-1]
    out_shape = (*arr.shape[:-2], *shape)
    # Anti-aliasing only for bilinear downscaling: thin vessels alias into broken dashes without it, while label
    # maps must keep exact {0,1} values.
    out = resize(arr, out_shape, order=order, anti_aliasing=bool(order and downscale), preserve_range=True,
                 mode="edge")
    return out.astype(arr.dtype, copy=False)


def load_sample(sample: Sample, cfg: DataCfg, scale: float = 1.0) -> LoadedSample:
    """Read one sample's image, mask (union of mask files / polygons) and FOV; resample by ``scale`` if != 1.

    The FOV comes from the image alone (a shipped FOV mask, or derived from the dark border), never from the mask:
    evaluation and scale normalisation must see what ``predict`` sees on an unlabelled image. Training adds the
    annotated foreground to its loss region itself (``datasets.loss_region``).
    """
    image = read_image(sample.image, cfg.channels, cfg.image_max)
    shape = image.shape[-2:]
    problems: list[str] = []
    mask = np.zeros(shape, dtype=np.uint8)
    for mask_path in sample.masks:
        part, warning = read_mask(mask_path, cfg.mask_labels)
        if warning:
            warnings.warn(warning, MaskWarning, stacklevel=2)
            log.warning(warning)
        if part.shape != shape:
            problems.append(
                f"image {sample.image} is {_shape_text(shape)} but mask {mask_path} is {_shape_text(part.shape)}; "
                "re-export the mask at the image size"
            )
            continue
        mask |= part
    if sample.polygons:
        try:
            mask |= rasterize_polygons(sample.polygons, shape)
        except ValueError as err:
            problems.append(f"{sample.image}: bad polygon annotation ({err}); fix the annotations file")
    targets = _load_targets(sample, shape, problems, cfg.mask_labels) if sample.targets else None
    if sample.fov is not None:
        fov, warning = read_mask(sample.fov)
        if warning:
            warnings.warn(warning, MaskWarning, stacklevel=2)
        if fov.shape != shape:
            problems.append(
                f"image {sample.image} is {_shape_text(shape)} but FOV mask {sample.fov} is "
                f"{_shape_text(fov.shape)}; re-export the FOV mask at the image size"
            )
    elif cfg.derive_fov:
        fov = derive_fov(image)
    else:
        fov = np.ones(shape, dtype=np.uint8)
    if problems:
        raise DataError("\n".join(problems))
    native_shape = (int(shape[0]), int(shape[1]))
    if scale != 1.0:
        if not (scale > 0 and np.isfinite(scale)):
            raise DataError(f"{sample.image}: scale factor {scale} is not a positive number; check data.scale_norm")
        new_shape = (max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale)))
        image = np.clip(_resample(image, new_shape, order=1), 0.0, 1.0).astype(np.float32)
        mask = _resample(mask, new_shape, order=0)
        fov = _resample(fov, new_shape, order=0)
        if targets is not None:
            targets = _resample(targets, new_shape, order=0)
    return LoadedSample(
        id=sample.id,
        image=np.ascontiguousarray(image, dtype=np.float32),
        mask=np.ascontiguousarray(mask, dtype=np.uint8),
        fov=np.ascontiguousarray(fov, dtype=np.uint8),
        scale=float(scale),
        native_shape=native_shape,
        targets=None if targets is None else np.ascontiguousarray(targets, dtype=np.uint8),
        texts=[t.text for t in sample.targets],
        conversations=sample.conversations,
        label=sample.label,
    )


def _load_targets(sample: Sample, shape: tuple[int, int], problems: list[str], mask_labels) -> np.ndarray:
    """uint8 [K, H, W]: each referring expression's own mask (its mask files and polygons unioned)."""
    out = np.zeros((len(sample.targets), *shape), dtype=np.uint8)
    for k, target in enumerate(sample.targets):
        for mask_path in target.masks:
            part, _ = read_mask(mask_path, mask_labels)
            if part.shape != shape:
                problems.append(f"image {sample.image} is {_shape_text(shape)} but mask {mask_path} is "
                                f"{_shape_text(part.shape)}; re-export the mask at the image size")
                continue
            out[k] |= part
        if target.polygons:
            try:
                out[k] |= rasterize_polygons(target.polygons, shape)
            except ValueError as err:
                problems.append(f"{sample.image}: bad polygon annotation ({err}); fix the annotations file")
    return out


def fov_diameter(fov: np.ndarray) -> float:
    """Field-of-view diameter in pixels: the larger side of the FOV's bounding box (0 for an empty FOV)."""
    rows = np.flatnonzero(np.asarray(fov).any(axis=1))
    cols = np.flatnonzero(np.asarray(fov).any(axis=0))
    if rows.size == 0:
        return 0.0
    return float(max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1))


def scale_factors(
    samples_loaded_natively: list[LoadedSample], cfg: ScaleNormCfg, target: float | None = None
) -> tuple[float | None, dict[str, float]]:
    """(target FOV diameter, {id: scale}) that resamples every sample's FOV to the target diameter.

    The target is ``target`` if given (pass the training set's target when scaling val/test), else
    ``cfg.target_fov_diameter``, else the median diameter of ``samples_loaded_natively`` (the training set).
    Disabled normalisation gives scale 1 everywhere.
    """
    if not cfg.enabled:
        return target, {s.id: 1.0 for s in samples_loaded_natively}
    if cfg.target_pixel_size is not None and target is None and cfg.target_fov_diameter is None:
        raise DataError(
            "data.scale_norm.target_pixel_size needs a pixel size per image, which no supported layout provides; "
            "set data.scale_norm.target_fov_diameter (pixels) instead"
        )
    diameters = {s.id: fov_diameter(s.fov) for s in samples_loaded_natively}
    empty = sorted(i for i, d in diameters.items() if d <= 0)
    if empty:
        raise DataError(
            format_problems([f"sample {i}: empty FOV, cannot normalise its scale; fix its FOV mask" for i in empty],
                            "scale normalisation")
        )
    if target is None:
        target = cfg.target_fov_diameter
    if target is None:
        if not diameters:
            raise DataError("scale normalisation needs training samples to take the median FOV diameter from")
        target = float(np.median(list(diameters.values())))
    return float(target), {i: float(target) / d for i, d in diameters.items()}


def load_all(samples: list[Sample], cfg: DataCfg, scales: dict[str, float] | None = None,
             keep: bool = True) -> list[LoadedSample]:
    """Load every sample (progress bar); one DataError with every sample that failed. ``keep=False`` only checks
    that each loads, holding one at a time per usable core (the decoders release the GIL), and returns []."""
    loaded: list[LoadedSample] = []
    problems: list[str] = []
    failed = 0

    def load(sample: Sample) -> LoadedSample | DataError | None:
        try:
            one = load_sample(sample, cfg, (scales or {}).get(sample.id, 1.0))
        except DataError as err:
            return err
        return one if keep else None  # a check holds nothing

    with ThreadPoolExecutor(max_workers=1 if keep else usable_cores()["cores"]) as pool:
        results = pool.map(load, samples)
        for one in tqdm(results, total=len(samples), desc="loading images", unit="img", leave=False,
                        disable=len(samples) < 8):
            if isinstance(one, DataError):
                failed += 1
                problems.extend(line.strip(" -") for line in str(one).splitlines() if line.strip())
            elif keep:
                loaded.append(one)
    if problems:
        raise DataError(format_problems(problems, f"{failed} of {len(samples)} samples"))
    return loaded


class LazySamples(Sequence):
    """The samples of a split as a sequence of ``LoadedSample`` decoded on access (``load_sample``), holding none.

    Training datasets index it from DataLoader workers, so each worker decodes only the images its batches need and
    memory does not grow with the data set; an item is a pure function of (sample, settings, scale), so the batches
    of a step are the same whichever process decodes them (exact resume). ``records`` are the undecoded ``Sample``s:
    what a dataset may know of each item up front (ids, conversations, targets). ``cache`` (a
    ``decode_cache.DecodeCache``) serves decodes it has seen. ``decodes`` counts the loads done in this process
    (tests prove that nothing is decoded up front).
    """

    def __init__(self, samples: list[Sample], cfg: DataCfg, scales: dict[str, float] | None = None, cache=None):
        self.samples, self.cfg, self.scales = list(samples), cfg, dict(scales or {})
        self.cache = cache
        self.decodes = 0

    @property
    def records(self) -> list[Sample]:
        return self.samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        sample = self.samples[index]
        self.decodes += 1
        scale = self.scales.get(sample.id, 1.0)
        return self.cache.load(sample, scale) if self.cache is not None else load_sample(sample, self.cfg, scale)

    def image_size(self, index: int) -> tuple[int, int]:
        """(H, W) item ``index``'s image will have, from the file's header where it tells (no decode)."""
        sample = self.samples[index]
        h, w = image_header_size(sample.image)
        scale = self.scales.get(sample.id, 1.0)
        return (h, w) if scale == 1.0 else (max(1, round(h * scale)), max(1, round(w * scale)))


def records(samples: Sequence) -> Sequence:
    """What a dataset may read of each sample without decoding it: ``LazySamples.records`` (``Sample``), or the
    already loaded samples themselves; both carry ``id``, ``conversations``, ``label`` and ``target_texts()``."""
    return samples.records if isinstance(samples, LazySamples) else samples


def image_size(samples: Sequence, index: int) -> tuple[int, int]:
    """(H, W) of item ``index``'s image, without decoding it when ``samples`` is lazy."""
    if isinstance(samples, LazySamples):
        return samples.image_size(index)
    return tuple(samples[index].image.shape[-2:])


def resample_to_native(prob: np.ndarray, native_shape: tuple[int, int]) -> np.ndarray:
    """Map a [H, W] prediction made at normalised scale back to the image's native (H, W), bilinearly."""
    prob = np.asarray(prob)
    if native_shape is None or prob.shape == tuple(native_shape):
        return prob
    out = resize(prob.astype(np.float32), tuple(native_shape), order=1, anti_aliasing=False, preserve_range=True,
                 mode="edge")
    return out.astype(prob.dtype if np.issubdtype(prob.dtype, np.floating) else np.float32)
