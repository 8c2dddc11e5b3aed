"""Optional cache of decoded training and validation samples (``data.cache: off | memory | disk``), for data that is
expensive to decode (DICOM, compressed TIFF, gzipped PPM, large polygon outlines, scale-normalised resampling).

One implementation for every task's lazy decoding: ``LazySamples`` (masks, SAM, the segmenting VLM and instruction
tuning all index it) asks ``DecodeCache.load`` instead of ``load_sample``.

- Key: a digest of the bytes of every file the sample reads (image, masks, FOV, target masks), the sample's inline
  annotations (polygons, expressions) and the decode settings (channels, intensity scale, mask labels, FOV
  derivation, scale factor), plus ``FORMAT_VERSION``. A file changed in place is a miss, never a stale array; two
  entries of one image (several questions about it) share one entry.
- Bounded: least recently used entries are evicted by bytes. ``memory``: each process holds at most its share of
  ``data.cache_max_mb`` (the DataLoader workers split it). ``disk``: the folder holds at most ``cache_max_mb``; a hit
  touches the file's mtime, eviction removes the oldest mtimes first (the folder may be shared by workers and runs).
- Disk entries are safetensors files written to a temporary name and renamed (``medtune.atomic``'s rule: a reader
  sees all of a file or none), with a digest of the arrays in the header: a torn, truncated or foreign file is a
  miss (and removed), never a crash or a wrong array.

Why not MONAI's caching datasets (1.6): ``CacheDataset`` decodes its whole cache share before the first step (the
start-up this cache exists to avoid) and never evicts; ``PersistentDataset`` keys items by a pickle of the data item
(the file *path*, so an edited file is served stale), has no size bound or eviction, detects only unpicklable files
as corrupt (a truncated torch zip re-raises) and moves its temporary file from the system temp dir (a copy, not an
atomic rename, across file systems); ``LMDBDataset`` adds an lmdb dependency, a fixed map size and no eviction. Each
also wraps the dataset as a MONAI transform chain, while medtune's items are ``load_sample`` + task datasets.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np

from medtune.config import DataCfg
from medtune.data.loading import load_sample
from medtune.data.types import LoadedSample, Sample

log = logging.getLogger(__name__)

# Bump when anything that shapes an entry changes (load_sample's output, the stored layout, the key).
FORMAT_VERSION = "1"
ENTRY_SUFFIX = ".safetensors"
DEFAULT_DIR = "decode_cache"  # under the run folder when data.cache_dir is not set
_MB = 1024 * 1024
_READ_CHUNK = 1 << 20
# A disk store over its bound evicts down to this fraction of it, so one eviction scan serves many writes.
_EVICT_TO = 0.9
_ARRAYS = ("image", "mask", "fov", "targets")


def _file_digest(path: Path, h) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)


def sample_key(sample: Sample, cfg: DataCfg, scale: float) -> str:
    """Digest of what decides ``load_sample(sample, cfg, scale)``: file contents, inline annotations, settings."""
    h = hashlib.blake2b(digest_size=20)
    settings = {"format": FORMAT_VERSION, "channels": cfg.channels, "image_max": cfg.image_max,
                "mask_labels": cfg.mask_labels, "derive_fov": cfg.derive_fov, "scale": repr(float(scale)),
                "polygons": sample.polygons, "has_fov": sample.fov is not None, "n_masks": len(sample.masks),
                "targets": [{"text": t.text, "polygons": t.polygons, "n_masks": len(t.masks)} for t in sample.targets]}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for path in sample.files():
        h.update(b"\0file\0")
        _file_digest(Path(path), h)
    return h.hexdigest()


def _arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=20)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.data)
    return h.hexdigest()


def _arrays(ls: LoadedSample) -> dict[str, np.ndarray]:
    return {k: getattr(ls, k) for k in _ARRAYS if getattr(ls, k) is not None}


def _rebuild(sample: Sample, arrays: dict[str, np.ndarray], scale: float, native_shape: tuple[int, int]
             ) -> LoadedSample:
    """The LoadedSample of ``sample`` from cached arrays; its metadata comes from ``sample`` (an entry may be shared
    by several samples of one image)."""
    return LoadedSample(id=sample.id, image=arrays["image"], mask=arrays["mask"], fov=arrays["fov"], scale=scale,
                        native_shape=native_shape, targets=arrays.get("targets"),
                        texts=[t.text for t in sample.targets], conversations=sample.conversations,
                        label=sample.label)


class MemoryStore:
    """LRU over entries held in this process, at most ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._entries: OrderedDict[str, tuple[dict[str, np.ndarray], tuple[int, int]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str):
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: str, arrays: dict[str, np.ndarray], native_shape: tuple[int, int]) -> None:
        size = sum(a.nbytes for a in arrays.values())
        if size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = (arrays, native_shape)
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, (old, _) = self._entries.popitem(last=False)
            self.nbytes -= sum(a.nbytes for a in old.values())


class DiskStore:
    """One safetensors file per entry in ``root``, the folder kept under ``max_bytes`` (LRU by mtime)."""

    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = Path(root), int(max_bytes)
        self.corrupt = 0
        self._estimate: int | None = None  # bytes in the folder as this process last knew it

    def _path(self, key: str) -> Path:
        return self.root / f"{key}{ENTRY_SUFFIX}"

    def entries(self) -> list[tuple[float, int, Path]]:
        out = []
        for entry in os.scandir(self.root) if self.root.is_dir() else ():
            if entry.name.endswith(ENTRY_SUFFIX):
                try:
                    st = entry.stat()
                except FileNotFoundError:  # evicted by another process meanwhile
                    continue
                out.append((st.st_mtime, st.st_size, Path(entry.path)))
        return out

    def nbytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def get(self, key: str):
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        entry = self._read(data, key)
        if entry is None:
            self.corrupt += 1
            log.warning("decode cache: %s is unreadable or fails its checksum; decoding the image again", path)
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # recently used: evicted last
        except FileNotFoundError:
            pass
        return entry

    @staticmethod
    def _read(data: bytes, key: str):
        from safetensors import SafetensorError
        from safetensors.numpy import load

        try:
            header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
            meta = header.get("__metadata__") or {}
            arrays = load(data)
            if meta.get("format") != FORMAT_VERSION or meta.get("key") != key or "image" not in arrays:
                return None
            if _arrays_digest(arrays) != meta.get("digest"):
                return None
            return arrays, tuple(json.loads(meta["native_shape"]))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):  # torn, truncated or foreign file
            return None

    def put(self, key: str, arrays: dict[str, np.ndarray], native_shape: tuple[int, int]) -> None:
        from safetensors.numpy import save

        meta = {"format": FORMAT_VERSION, "key": key, "digest": _arrays_digest(arrays),
                "native_shape": json.dumps(list(native_shape))}
        payload = save({k: np.ascontiguousarray(a) for k, a in arrays.items()}, metadata=meta)
        if len(payload) > self.max_bytes:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        # a unique temporary name per writer (workers may write the same key), renamed into place; no fsync: a file
        # torn by a machine crash fails its digest (a miss)
        tmp = self.root / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_bytes(payload)
        os.replace(tmp, self._path(key))
        if self._estimate is None:
            self._estimate = self.nbytes()
        else:
            self._estimate += len(payload)
        if self._estimate > self.max_bytes:
            self._evict()

    def _evict(self) -> None:
        """Remove the least recently used files until the folder holds at most _EVICT_TO of the bound (the folder is
        re-read: other processes write to it too)."""
        entries = sorted(self.entries(), key=lambda e: e[0])
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= _EVICT_TO * self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
        self._estimate = total


class DecodeCache:
    """``load(sample, scale)``: ``load_sample``'s result, from the store where possible. Picklable: a DataLoader
    worker gets the settings and opens its own store (a memory store starts empty in each worker)."""

    def __init__(self, cfg: DataCfg, kind: str, max_mb: float, root: str | Path | None = None):
        if kind == "disk" and root is None:
            raise ValueError("a disk decode cache needs a folder (data.cache_dir or the run folder)")
        self.cfg, self.kind, self.max_bytes = cfg, kind, int(max_mb * _MB)
        self.root = None if root is None else Path(root)
        self.hits = self.misses = 0
        self._store = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None, "hits": 0, "misses": 0}

    @property
    def store(self):
        if self._store is None:
            if self.kind == "memory":
                from torch.utils.data import get_worker_info

                info = get_worker_info()  # the workers share the bound
                self._store = MemoryStore(self.max_bytes // (info.num_workers if info is not None else 1))
            else:
                self._store = DiskStore(self.root, self.max_bytes)
        return self._store

    def load(self, sample: Sample, scale: float = 1.0) -> LoadedSample:
        key = sample_key(sample, self.cfg, scale)
        entry = self.store.get(key)
        if entry is not None:
            self.hits += 1
            arrays, native_shape = entry
            if self.kind == "memory":  # a dataset may write into its item's arrays: never into the cached ones
                arrays = {k: a.copy() for k, a in arrays.items()}
            return _rebuild(sample, arrays, scale, native_shape)
        self.misses += 1
        loaded = load_sample(sample, self.cfg, scale)
        self.store.put(key, _arrays(loaded), loaded.native_shape)
        return loaded


def decode_cache(cfg: DataCfg, run_dir: str | Path | None = None) -> DecodeCache | None:
    """The cache ``data.cache`` asks for (None when off); a disk cache lives in ``data.cache_dir``, else
    RUN/decode_cache."""
    if cfg.cache == "off":
        return None
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else (Path(run_dir) / DEFAULT_DIR if run_dir else None)
    return DecodeCache(cfg, cfg.cache, cfg.cache_max_mb, root)
