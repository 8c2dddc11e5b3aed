"""Reading images and masks from disk into the array contract of ``LoadedSample``.

Every failure to read becomes a ``DataError`` that names the file and the fix: users see which file is broken,
never a PIL traceback.
"""
from __future__ import annotations

import gzip
import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from medtune.data.types import DataError
from medtune.threads import usable_cores

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm")

# DICOM files are read through pydicom (the optional `app` extra): single-frame 2-D images only.
DICOM_EXTENSIONS = (".dcm", ".dicom")

# ITU-R BT.601 weights: the conventional luminance for RGB -> grey.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# Full scales of the usual bit depths (8, 12, 16). A 16-bit container whose maximum fits in 12 bits almost always
# holds 12-bit detector data (CT, X-ray, OCT); dividing it by 65535 would leave the image nearly black.
_FULL_SCALES = (255, 4095, 65535)
# PIL modes with 8-bit samples: always divided by 255, so a data-set scan need not decode them.
_EIGHT_BIT_MODES = frozenset({"1", "L", "P", "LA", "PA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB",
                              "HSV"})
# A mask whose values are three or more distinct integers no larger than this is a label map (classes 0/1/2/3 ...),
# not a binary mask with grey edges: binarising it at half its maximum would silently merge classes.
_LABEL_MAP_MAX_VALUE = 31

_FIX_REEXPORT = "re-export the file (e.g. open and save it again as PNG/TIFF) or remove it from the data folder"


def strip_image_extension(name: str) -> str:
    """File name without its image extension(s): ``im0001.ppm.gz`` -> ``im0001``, ``a.b.png`` -> ``a.b``."""
    lower = name.lower()
    if lower.endswith(".gz"):
        name, lower = name[:-3], lower[:-3]
    for ext in IMAGE_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def is_image_file(path: Path) -> bool:
    name = path.name.lower()
    name = name.removesuffix(".gz")
    return path.is_file() and not path.name.startswith(".") and name.endswith(IMAGE_EXTENSIONS)


def _decode(path: Path) -> np.ndarray:
    """Raw pixel array ([H,W] or [H,W,C]) in the file's own dtype, palette images resolved to grey/colour."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check data.path and the layout's folder names")
    try:
        if path.name.lower().endswith(".gz"):
            # STARE ships its images gzip-compressed (im0001.ppm.gz).
            with gzip.open(path, "rb") as fh:
                payload = io.BytesIO(fh.read())
            return _decode_pil(Image.open(payload))
        if path.suffix.lower() in DICOM_EXTENSIONS:
            return _decode_dicom(path)
        if path.suffix.lower() in (".tif", ".tiff"):
            try:
                with Image.open(path) as img:
                    return _decode_pil(img)
            except (OSError, UnidentifiedImageError, ValueError):
                # PIL cannot read multi-channel 16-bit or compressed scientific TIFFs; tifffile can.
                import tifffile

                arr = np.asarray(tifffile.imread(path))
                if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
                    arr = np.moveaxis(arr, 0, -1)  # planar [C,H,W] -> interleaved
                return arr
        with Image.open(path) as img:  # closed at once: no ResourceWarning per file in `data inspect`
            return _decode_pil(img)
    except DataError:
        raise
    # PIL raises OSError, SyntaxError, ValueError, struct.error, zlib.error ... for broken files: all mean the same.
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path}: cannot be read as an image ({type(err).__name__}: {err}); {_FIX_REEXPORT}") from None


def _decode_dicom(path: Path) -> np.ndarray:
    """The stored pixels of a single-frame DICOM; windowed (VOI LUT, in float) when the file carries a window, and
    inverted for MONOCHROME1 (where 0 is white)."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise DataError(f"{path}: reading DICOM needs pydicom: pip install 'medtune[app]' (or pydicom)") from None
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise DataError(f"{path}: a DICOM with {ds.NumberOfFrames} frames; export one frame as PNG/TIFF")
    if "WindowCenter" in ds and arr.ndim == 2:
        arr = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float32)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        arr = (arr.max() - arr) if np.issubdtype(arr.dtype, np.integer) else -arr
    return arr


def _decode_pil(img: Image.Image) -> np.ndarray:
    img.load()  # force decoding now: Image.open is lazy and truncated files only fail here
    if img.mode == "P":
        indices = np.asarray(img)
        grey = np.asarray(img.convert("L"))
        # A palette that maps distinct indices to the same grey would merge classes; fall back to the indices.
        if np.unique(indices).size > np.unique(grey).size:
            return indices
        return grey
    if img.mode in ("PA", "LA", "La"):
        return np.asarray(img.convert("L"))
    if img.mode in ("RGBA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(img.convert("RGB"))
    if img.mode == "1":
        return np.asarray(img.convert("L"))
    if img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)
    return np.asarray(img)


def full_scale(top: float) -> float:
    """The smallest 8/12/16-bit full scale that holds ``top`` (``top`` itself beyond 16 bits)."""
    return float(next((s for s in _FULL_SCALES if top <= s), top))


def wide_integer_max(path: str | Path) -> int | None:
    """Largest pixel value of an integer image wider than 8 bits; None for 8-bit and float images."""
    path = Path(path)
    if not path.name.lower().endswith(".gz"):
        try:
            with Image.open(path) as img:  # lazy: reads the header only
                if img.mode in _EIGHT_BIT_MODES:
                    return None
        except Exception:  # noqa: BLE001 - PIL cannot open it (scientific TIFF, broken file): _decode decides
            pass
    arr = _decode(path)
    if arr.dtype in (np.uint8, np.bool_) or not np.issubdtype(arr.dtype, np.integer):
        return None
    return int(arr.max()) if arr.size else 0


def image_header_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file from its header (PIL opens lazily); formats PIL cannot size (gzipped PPM, DICOM,
    scientific TIFF) are decoded."""
    path = Path(path)
    if not path.name.lower().endswith(".gz") and path.suffix.lower() not in DICOM_EXTENSIONS:
        try:
            with Image.open(path) as img:
                return int(img.height), int(img.width)
        except Exception:  # noqa: BLE001 - _decode below names the file and the fix
            pass
    arr = _decode(path)
    return int(arr.shape[0]), int(arr.shape[1])


def dataset_image_max(paths: list[Path], skip_unreadable: bool = False) -> tuple[float | None, int | None]:
    """(full scale, observed maximum) of the integer images wider than 8 bits among ``paths``; (None, None) if none.

    One scale per data set: dividing each image by its own maximum (or its own bit-depth tier) would make one
    scanner's images differ up to 16x in brightness depending on their content. ``skip_unreadable`` leaves broken
    files to the caller's own report instead of raising for the first one.
    """
    def top(path: Path) -> int | None:
        try:
            return wide_integer_max(path)
        except DataError:
            if not skip_unreadable:
                raise
            return None

    # 8-bit files answer from their header; wider ones are decoded, on the usable cores (PIL and tifffile decode
    # without the GIL). Recorded in RUN/intensity.json, so a run pays this once.
    with ThreadPoolExecutor(max_workers=usable_cores()["cores"]) as pool:
        tops = [t for t in pool.map(top, list(dict.fromkeys(paths))) if t is not None]
    if not tops:
        return None, None
    return full_scale(max(tops)), max(tops)


def _to_unit_range(arr: np.ndarray, image_max: float | None = None, path: Path | None = None) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        top = float(arr.max()) if arr.size else 0.0
        # Without a data-set scale (a lone image), the image's own bit-depth tier is the best guess.
        denom = float(image_max) if image_max is not None else full_scale(top)
        if top > denom:
            warnings.warn(f"{path}: pixel values up to {top:g} exceed data.image_max={denom:g} and are clipped; set "
                          "data.image_max to the data's full scale (e.g. 65535 for 16-bit)", stacklevel=3)
        return np.clip(arr.astype(np.float32) / denom, 0.0, 1.0)
    arr = arr.astype(np.float32)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    arr = np.nan_to_num(arr, nan=0.0)
    if lo >= 0.0 and hi <= 1.0:
        return arr
    # Float images in arbitrary units (HU, raw intensities): min-max is the only scale-free choice.
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def read_image(path: str | Path, channels: int = 3, image_max: float | None = None) -> np.ndarray:
    """Image file -> float32 [channels, H, W] in [0, 1]; grey is repeated to 3 channels, colour -> luminance for 1.

    8-bit data is divided by 255; wider integer data by ``image_max`` (the data set's full scale, ``data.image_max``),
    or, when None, by the image's own bit-depth tier (255 / 4095 / 65535).
    """
    return pixels_to_chw(_decode(Path(path)), channels, image_max, Path(path))


def pixels_to_chw(arr: np.ndarray, channels: int = 3, image_max: float | None = None,
                  path: Path | str | None = None) -> np.ndarray:
    """Decoded pixels ([H,W] grey or [H,W,C]) -> float32 [channels, H, W] in [0, 1], as ``read_image`` scales them
    (also for frames decoded from a video file); ``path`` names the source in errors."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]  # alpha carries no intensity
    if arr.ndim == 3 and arr.shape[-1] == 2:
        arr = arr[..., 0]  # grey + alpha
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise DataError(
            f"{path}: unsupported image shape {arr.shape} (expected H×W grey or H×W×3 colour); "
            "export a 2-D slice as PNG/TIFF"
        )
    unit = _to_unit_range(arr, image_max, path)
    if unit.ndim == 2:
        chw = unit[None]
        if channels == 3:
            chw = np.repeat(chw, 3, axis=0)
    else:
        chw = np.moveaxis(unit, -1, 0)
        if channels == 1:
            chw = np.tensordot(LUMA_WEIGHTS, chw, axes=1)[None]
    return np.ascontiguousarray(chw, dtype=np.float32)


def read_mask(path: str | Path, labels: list[int] | None = None) -> tuple[np.ndarray, str | None]:
    """Mask file -> (uint8 [H, W] in {0, 1}, warning or None).

    With ``labels`` (``data.mask_labels``) the mask is a label map and those values are the foreground. Otherwise
    two-level masks ({0,1}, {0,255}, palette GIFs) map the higher level to 1; a label map (three or more small
    integer values) is refused, since any binarisation would merge classes; anything else with more levels (JPEG
    artefacts, anti-aliased edges) is binarised at half its maximum and a warning naming the file is returned.
    """
    arr = _decode(Path(path))
    if arr.ndim == 3:
        # Coloured annotations: any colour channel lit counts as foreground.
        arr = arr[..., :3].max(axis=-1) if arr.shape[-1] >= 3 else arr[..., 0]
    if arr.ndim != 2:
        raise DataError(f"{path}: unsupported mask shape {arr.shape}; save the mask as a single-channel PNG")
    if labels is not None:
        return np.isin(arr, labels).astype(np.uint8), None
    levels = np.unique(arr)
    if levels.size == 1:
        value = 1 if levels[0] > 0 else 0
        return np.full(arr.shape, value, dtype=np.uint8), None
    if levels.size == 2:
        return (arr == levels[1]).astype(np.uint8), None
    if np.issubdtype(arr.dtype, np.integer) and levels[-1] <= _LABEL_MAP_MAX_VALUE:
        values = levels.tolist()
        raise DataError(
            f"{path}: mask is a label map with values {values} (several classes, not a binary mask); set "
            f"data.mask_labels to the foreground label(s), e.g. data.mask_labels={[v for v in values if v]} for all "
            "non-zero labels"
        )
    top = float(levels[-1])
    binary = (arr.astype(np.float64) > top / 2.0).astype(np.uint8)
    warning = (
        f"{path}: mask has {levels.size} grey levels (e.g. JPEG compression or anti-aliasing), binarised at half "
        f"its maximum ({top / 2:g}); save masks losslessly (PNG) with two values such as 0/255"
    )
    return binary, warning


def rasterize_polygons(polygons: list[list[float]], shape: tuple[int, int]) -> np.ndarray:
    """Union of filled polygons ``[[x1, y1, x2, y2, ...], ...]`` (pixel coordinates) as uint8 [H, W] in {0, 1}.

    A pixel is in a polygon when its centre is (even-odd rule), as skimage.draw.polygon decides, but filled by
    scanline: each edge toggles the rows it crosses from its crossing onwards, so the cost grows with the rows
    the edges span, not with (polygon area x vertex count) as a per-pixel test does (traced lesion contours have
    thousands of vertices: 1-3 s per image that way).
    """
    h, w = int(shape[0]), int(shape[1])
    mask = np.zeros(shape, dtype=np.uint8)
    for coords in polygons:
        xy = np.asarray(coords, dtype=np.float64)
        if xy.ndim != 1 or xy.size % 2 or xy.size < 6:
            raise ValueError(f"polygon needs an even number (>= 6) of coordinates x1,y1,x2,y2,..., got {xy.size}")
        mask |= _fill_polygon(xy[0::2], xy[1::2], h, w)
    return mask


def _fill_polygon(x: np.ndarray, y: np.ndarray, h: int, w: int) -> np.ndarray:
    """uint8 [h, w]: pixels whose centre (c, r) lies inside the closed polygon (x, y) by the even-odd rule."""
    x0, y0, x1, y1 = x, y, np.roll(x, -1), np.roll(y, -1)
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    # An edge crosses row r when lo <= r < hi (half-open, so a vertex on a row counts once; horizontal edges never)
    first = np.clip(np.ceil(lo), 0, h).astype(np.int64)
    stop = np.clip(np.ceil(hi), 0, h).astype(np.int64)
    count = np.maximum(stop - first, 0)
    edge = np.repeat(np.arange(x.size), count)
    rows = np.repeat(first, count) + (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count))
    cross = x0[edge] + (rows - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    # pixel c is inside when an odd number of crossings lie left of its centre: toggle from the first c > crossing
    cols = np.clip(np.floor(cross).astype(np.int64) + 1, 0, w)
    toggles = np.zeros((h, w + 1), dtype=np.uint8)
    np.add.at(toggles, (rows, cols), 1)
    # uint8 wrap-around keeps the parity (256 is even)
    inside = np.cumsum(toggles[:, :w], axis=1, dtype=np.uint8) & 1
    _mark_centres_on_edges(inside, x0, y0, x1, y1)
    return inside.astype(np.uint8)


def _mark_centres_on_edges(out: np.ndarray, x0, y0, x1, y1) -> None:
    """Set the pixels whose centre lies exactly on an edge (integer vertex coordinates): the boundary is part of
    the polygon, as in skimage.draw.polygon, so a square [0, 4] x [0, 4] covers rows and columns 0..4."""
    h, w = out.shape
    flat = y0 == y1
    for xa, ya, xb, yb in zip(x0[flat], y0[flat], x1[flat], y1[flat]):
        if ya == np.round(ya) and 0 <= ya < h:
            out[int(ya), max(0, int(np.ceil(min(xa, xb)))):max(0, int(np.floor(max(xa, xb))) + 1)] = 1
    x0, y0, x1, y1 = x0[~flat], y0[~flat], x1[~flat], y1[~flat]
    first = np.clip(np.ceil(np.minimum(y0, y1)), 0, h).astype(np.int64)
    stop = np.clip(np.floor(np.maximum(y0, y1)) + 1, 0, h).astype(np.int64)
    count = np.maximum(stop - first, 0)
    edge = np.repeat(np.arange(x0.size), count)
    rows = np.repeat(first, count) + (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count))
    cross = x0[edge] + (rows - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    on = (cross == np.round(cross)) & (cross >= 0) & (cross < w)
    out[rows[on], cross[on].astype(np.int64)] = 1


# A pixel is outside the field of view when its luminance is below this fraction of the image's bright level.
_FOV_DARK_FRACTION = 0.1
# Below this fraction of dark pixels on the image frame there is no dark border to strip.
_FOV_MIN_DARK_FRAME = 0.25


def derive_fov(image: np.ndarray) -> np.ndarray:
    """Field of view of an image with a dark border (fundus, ultrasound fan) as uint8 [H, W] in {0, 1}.

    Thresholds luminance at a small fraction of its bright level, keeps the largest connected component and fills
    its holes (dark vessels and lesions inside stay in). Returns all ones when the image has no dark border.
    """
    img = np.asarray(image, dtype=np.float32)
    lum = np.tensordot(LUMA_WEIGHTS, img, axes=1) if img.ndim == 3 and img.shape[0] == 3 else img.reshape(img.shape[-2:])
    h, w = lum.shape
    ones = np.ones((h, w), dtype=np.uint8)
    # The 99th percentile, not the max, so a few hot pixels or burnt-in text do not raise the threshold.
    bright = float(np.percentile(lum, 99))
    if bright <= 0:
        return ones
    inside = lum > _FOV_DARK_FRACTION * bright
    frame = np.concatenate([inside[0], inside[-1], inside[:, 0], inside[:, -1]])
    if 1.0 - frame.mean() < _FOV_MIN_DARK_FRAME:
        return ones
    labels, count = ndimage.label(inside)
    if count == 0:
        return ones
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    fov = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))
    return fov.astype(np.uint8)
