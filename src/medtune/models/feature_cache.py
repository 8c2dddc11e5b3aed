"""Frozen-encoder feature cache (``train.feature_cache``): SAM / SAM 2 image-encoder outputs computed once per image
and reused every epoch, so a decoder-only fine-tune (``model.freeze_image_encoder``) runs at decoder speed.

It lives in the model's forward (``SamSegModel.forward_logits`` asks it for the encoder features of its input), so
the recipe's step and every other caller (validation, the preflight) are unchanged, and it is keyed by what the
encoder really sees. Correctness rests on three things, each checked rather than assumed:

- The key of an image is a digest of the exact tensor the model's forward receives (its bits, shape and dtype)
  combined with the encoder fingerprint (a hash of the encoder's weights and buffers, its config, the family's
  preprocessing and input size, the weight dtype, the torch/transformers versions) and the numeric context of the
  call (device type, autocast dtype, float32 matmul precision / TF32). Any difference is a miss, never a stale hit.
- The encoder cannot change under the cache: ``use_feature_cache`` refuses a trainable parameter, an adapter or an
  active dropout inside it, and every forward re-checks ``requires_grad`` and each weight's in-place version
  counter, re-hashing the weights when any moved (``load_state_dict``, ``p.add_()`` ...). Writes through
  ``p.data`` bypass version counters: call ``invalidate()`` after such surgery.
- The data must repeat the encoder input from epoch to epoch: the config refuses augmentation and random crops
  (``config.py``), without which every lookup would miss and the cache would only grow.

Cached features are detached: gradients reach the prompt encoder and mask decoder (and SAM 2's ``conv_s0`` /
``conv_s1`` / ``no_memory_embedding``, which the family applies after the cache) exactly as without it.

Stores: ``memory`` (host RAM, one entry per distinct image) or ``disk`` (one safetensors file per image under
``train.feature_cache_dir`` or ``RUN/feature_cache``, one folder per encoder fingerprint; written to a temporary
name and renamed, with a checksum of its tensors in the header, so a killed run or a torn file is a miss, not a
wrong embedding). A disk folder can be shared by runs: entries are only ever read back under the same key.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from medtune.config import Config
from medtune.errors import ConfigError, UserError

log = logging.getLogger(__name__)

# Bump when anything that shapes an entry changes (preprocessing code, layout of the stored tensors, the digest).
FORMAT_VERSION = "1"
CACHE_DIR = "feature_cache"  # under the run folder when train.feature_cache_dir is not set
ENTRY_SUFFIX = ".safetensors"

# The per-image digest: K independent linear hashes sum(w_i * x_i) mod 2^64 over the input's bit pattern (32-bit words
# for float32), computed on the input's own device. Integer sums wrap and are exact, so the result does not depend on
# the reduction order or the device; for two different inputs a collision needs all K sums to agree, about 2^-33 per
# sum in the worst case (differences confined to high bits), 2^-63 typically. A fixed seed keeps keys stable across
# processes and runs (the disk store), and the fingerprint includes the torch version that generates the weights.
_DIGEST_SUMS = 4
_DIGEST_SEED = 0x6D65647475
_WORD_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_ROW_SEED_STRIDE = 1_000_003
# (length, device, rows) weight tensors kept: whole_image inputs have one length, stored features one per level
_WEIGHT_CACHE_SIZE = 8
_KEY_BYTES = 20


# ---- digests ----------------------------------------------------------------------------------------------------------
_weights: OrderedDict[tuple[int, str, int], torch.Tensor] = OrderedDict()


def _hash_weights(n: int, device: torch.device, rows: int = _DIGEST_SUMS) -> torch.Tensor:
    """[rows, n] int64 weights, the same for every process; drawn from their own generators (the global RNG that
    resume and the preflight restore is never touched)."""
    key = (n, str(device), rows)
    if key not in _weights:
        generators = [torch.Generator().manual_seed(_DIGEST_SEED + _ROW_SEED_STRIDE * r + n) for r in range(rows)]
        _weights[key] = torch.stack([torch.empty(n, dtype=torch.int64).random_(generator=g)
                                     for g in generators]).to(device)
        while len(_weights) > _WEIGHT_CACHE_SIZE:
            _weights.popitem(last=False)
    _weights.move_to_end(key)
    return _weights[key]


def content_digests(x: torch.Tensor, sums: int = _DIGEST_SUMS) -> list[bytes]:
    """One digest per sample of ``x`` [B, ...] that changes with any bit, the shape or the dtype of the sample."""
    flat = x.detach().contiguous().reshape(x.shape[0], -1)
    if flat.element_size() not in _WORD_DTYPES:
        raise TypeError(f"cannot digest a {x.dtype} tensor")
    words = flat.view(_WORD_DTYPES[flat.element_size()]).to(torch.int64)
    weights = _hash_weights(words.shape[1], words.device, sums)
    totals = torch.stack([(words * w).sum(dim=1) for w in weights], dim=1).cpu()
    prefix = f"{tuple(x.shape[1:])}|{x.dtype}|".encode()
    return [prefix + totals[i].numpy().tobytes() for i in range(totals.shape[0])]


def _checksum(t: torch.Tensor) -> str:
    """Integrity of a stored tensor (a torn or flipped file, not an adversary): one linear sum is enough."""
    return hashlib.blake2b(content_digests(t.unsqueeze(0), sums=1)[0], digest_size=16).hexdigest()


# ---- the encoder's identity ---------------------------------------------------------------------------------------
def _encoder_tensors(encoder: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(encoder.named_parameters()) + list(encoder.named_buffers())


def encoder_fingerprint(encoder: nn.Module, description: dict) -> str:
    """Hash of everything that decides the encoder's output for a given input tensor: weights and buffers (bytes,
    names, dtypes, shapes), the family's description (config, preprocessing, input size) and the library versions."""
    import transformers

    h = hashlib.blake2b(digest_size=32)
    about = {**description, "format": FORMAT_VERSION, "torch": torch.__version__,
             "transformers": transformers.__version__}
    h.update(json.dumps(about, sort_keys=True, default=str).encode())
    for name, t in _encoder_tensors(encoder):
        data = t.detach().reshape(-1).contiguous()
        h.update(f"|{name}|{data.dtype}|{tuple(t.shape)}|".encode())
        h.update(data.view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def numeric_context(device: torch.device) -> str:
    """The settings that change a forward's numerics on this device (autocast, TF32), part of every key."""
    kind = device.type
    parts = [kind, f"fp32-matmul={torch.get_float32_matmul_precision()}"]
    if torch.is_autocast_enabled(kind):
        parts.append(f"autocast={torch.get_autocast_dtype(kind)}")
    if kind == "cuda":
        parts.append(f"tf32={torch.backends.cuda.matmul.allow_tf32},{torch.backends.cudnn.allow_tf32}")
    return ";".join(parts)


# ---- stores -----------------------------------------------------------------------------------------------------------
Entry = tuple[torch.Tensor, ...]


class MemoryStore:
    """Entries in host memory (not on the GPU, which the decoder's training needs), for the current fingerprint."""

    kind = "memory"

    def __init__(self):
        self._entries: dict[str, Entry] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, namespace: str, key: str, device: torch.device) -> Entry | None:
        entry = self._entries.get(key)
        return None if entry is None else tuple(t.to(device, non_blocking=True) for t in entry)

    def put(self, namespace: str, key: str, entry: Entry) -> None:
        stored = tuple(t.detach().to("cpu", copy=True).contiguous() for t in entry)
        self.nbytes += sum(t.numel() * t.element_size() for t in stored)
        self._entries[key] = stored

    def forget(self, namespace: str) -> None:
        """The encoder changed: its old entries can never be asked for again."""
        self._entries.clear()
        self.nbytes = 0


class DiskStore:
    """One safetensors file per entry, ROOT/<fingerprint[:16]>/<key>.safetensors; kept when the encoder changes (a
    folder per fingerprint: delete the stale ones at will)."""

    kind = "disk"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.corrupt = 0
        self.written = 0

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob(f"*/*{ENTRY_SUFFIX}"))

    def folder(self, namespace: str) -> Path:
        return self.root / namespace[:16]

    def _path(self, namespace: str, key: str) -> Path:
        return self.folder(namespace) / f"{key}{ENTRY_SUFFIX}"

    def get(self, namespace: str, key: str, device: torch.device) -> Entry | None:
        path = self._path(namespace, key)
        if not path.is_file():
            return None
        entry = self._read(path, key, device)
        if entry is None:
            self.corrupt += 1
            log.warning("feature cache: %s is unreadable or does not match its checksum; recomputing it", path)
            path.unlink(missing_ok=True)
        return entry

    @staticmethod
    def _read(path: Path, key: str, device: torch.device) -> Entry | None:
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            data = path.read_bytes()
            header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
            meta = header.get("__metadata__") or {}
            tensors = load(data)
            count = int(meta.get("count", -1))
            if meta.get("format") != FORMAT_VERSION or meta.get("key") != key or sorted(tensors) != [
                    f"f{i}" for i in range(count)]:
                return None
            entry = tuple(tensors[f"f{i}"].to(device) for i in range(count))
            if any(_checksum(t) != meta.get(f"checksum{i}") for i, t in enumerate(entry)):
                return None
            return entry
        except (OSError, ValueError, KeyError, SafetensorError):  # torn, truncated or foreign file: a miss
            return None

    def put(self, namespace: str, key: str, entry: Entry) -> None:
        from safetensors.torch import save

        folder = self.folder(namespace)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT_VERSION, "key": key, "count": str(len(entry)), "fingerprint": namespace}
        meta.update({f"checksum{i}": _checksum(t) for i, t in enumerate(entry)})
        payload = save({f"f{i}": t.detach().to("cpu").contiguous() for i, t in enumerate(entry)}, metadata=meta)
        # A unique temporary name per writer (processes of one run may write the same key), renamed into place: a
        # reader sees the whole file or none. No fsync: a file torn by a machine crash fails its checksum (a miss).
        path = self._path(namespace, key)
        tmp = folder / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_bytes(payload)
        os.replace(tmp, path)
        self.written += 1

    def forget(self, namespace: str) -> None:
        pass


# ---- the cache --------------------------------------------------------------------------------------------------------
class FeatureCache:
    """``features(image, encode)``: ``encode(image)``'s list of [B, ...] tensors, from the store where possible.

    ``encoder`` is the module whose weights decide the features (checked frozen on every call); ``description`` what
    else does (config, preprocessing). Counters: ``hits`` / ``misses`` (per image), ``invalidations`` (encoder
    changes seen)."""

    def __init__(self, encoder: nn.Module, description: dict, store: MemoryStore | DiskStore):
        self.encoder = encoder
        self.description = description
        self.store = store
        self.hits = self.misses = self.invalidations = 0
        self._fingerprint: str | None = None
        self._state: tuple | None = None
        self._announced = False

    def invalidate(self) -> None:
        """Forget the encoder fingerprint: the next call re-hashes the weights (after writes through ``p.data``)."""
        self._state = None

    def fingerprint(self) -> str:
        """The current encoder fingerprint, re-hashed only when a weight moved, was replaced or changed dtype."""
        tensors = _encoder_tensors(self.encoder)
        trainable = [n for n, t in tensors if t.requires_grad]
        if trainable:
            raise UserError(f"feature cache: the image encoder has trainable tensors ({', '.join(trainable[:4])}"
                            f"{' ...' if len(trainable) > 4 else ''}); cached embeddings would go stale. Freeze it "
                            "(model.freeze_image_encoder=true) or set train.feature_cache=off")
        state = tuple((n, t.data_ptr(), t._version, t.dtype, t.device) for n, t in tensors)
        if state != self._state:
            fingerprint = encoder_fingerprint(self.encoder, self.description)
            if self._fingerprint is not None and fingerprint != self._fingerprint:
                self.invalidations += 1
                self.store.forget(self._fingerprint)
                log.info("feature cache: the image encoder changed; its cached features are no longer used")
            self._fingerprint, self._state = fingerprint, state
        return self._fingerprint

    def keys(self, image: torch.Tensor) -> list[str]:
        prefix = f"{self.fingerprint()}|{numeric_context(image.device)}|".encode()
        return [hashlib.blake2b(prefix + d, digest_size=_KEY_BYTES).hexdigest() for d in content_digests(image)]

    def features(self, image: torch.Tensor, encode: Callable[[torch.Tensor], list[torch.Tensor]]) -> list[torch.Tensor]:
        keys = self.keys(image)
        namespace = self._fingerprint
        found: dict[str, Entry] = {}
        for key in dict.fromkeys(keys):
            entry = self.store.get(namespace, key, image.device)
            if entry is not None:
                found[key] = entry
        missing = [key for key in dict.fromkeys(keys) if key not in found]
        self.hits += len(keys) - sum(1 for k in keys if k in missing)
        self.misses += sum(1 for k in keys if k in missing)
        if missing:
            rows = [keys.index(k) for k in missing]
            with torch.no_grad():
                computed = encode(image[rows])
            for j, key in enumerate(missing):
                entry = tuple(t[j].detach() for t in computed)
                self.store.put(namespace, key, entry)
                found[key] = entry
        if self.hits and not self._announced:
            self._announced = True
            per_image = sum(t.numel() * t.element_size() for t in next(iter(found.values())))
            log.info("feature cache (%s): first hits after %d encoder runs; %.1f MB per image",
                     self.store.kind, self.misses, per_image / 1e6)
        return [torch.stack([found[k][level] for k in keys]) for level in range(len(found[keys[0]]))]

    def stats(self) -> dict[str, int]:
        stats = {"hits": self.hits, "misses": self.misses, "invalidations": self.invalidations,
                 "entries": len(self.store)}
        if isinstance(self.store, MemoryStore):
            stats["megabytes"] = round(self.store.nbytes / 1e6)
        return stats


# ---- set-up -------------------------------------------------------------------------------------------------------
def _stochastic_layers(encoder: nn.Module) -> list[str]:
    dropouts = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
    found = [n for n, m in encoder.named_modules() if isinstance(m, dropouts) and m.p > 0]
    # transformers' attention applies functional dropout from its config (SAM's vision attention_dropout)
    config = getattr(encoder, "config", None)
    for key in ("attention_dropout", "dropout", "hidden_dropout", "drop_path_rate"):
        if float(getattr(config, key, 0.0) or 0.0) > 0:
            found.append(f"config.{key}")
    return found


def _adapter_layers(encoder: nn.Module) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [n for n, m in encoder.named_modules() if isinstance(m, BaseTunerLayer)]


def use_feature_cache(model: nn.Module, cfg: Config, run_dir: str | Path | None = None) -> FeatureCache | None:
    """Attach the cache ``train.feature_cache`` asks for to ``model`` (a built SegModel), or refuse with the key and
    the fix when it could change what is trained. Returns the cache (None when off)."""
    mode = cfg.train.feature_cache
    if mode == "off":
        return None
    family = cfg.model.family
    encoder = model.image_encoder() if getattr(model, "supports_feature_cache", False) else None
    if encoder is None:
        raise ConfigError(f"train.feature_cache={mode}: model.family {family!r} has no separate image encoder whose "
                          "output could be cached (sam and sam2 have); set train.feature_cache=off")
    adapters = _adapter_layers(encoder)
    if adapters:
        raise ConfigError(f"train.feature_cache={mode}: LoRA adapters sit in the image encoder ({adapters[0]} ...), "
                          "so its output changes every step; keep lora.target_modules out of the encoder (see "
                          "model.freeze_image_encoder) or set train.feature_cache=off")
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    if trainable:
        raise ConfigError(f"train.feature_cache={mode}: the image encoder trains ({len(trainable)} tensors, e.g. "
                          f"{trainable[0]}), so cached embeddings would go stale; set model.freeze_image_encoder=true "
                          "(decoder-only fine-tuning) or train.feature_cache=off")
    stochastic = _stochastic_layers(encoder)
    if stochastic:
        raise ConfigError(f"train.feature_cache={mode}: the image encoder is stochastic in training ({stochastic[0]} "
                          "> 0), so one cached output would replace a new random one each step; set its dropout to 0 "
                          "(model.config) or train.feature_cache=off")
    if mode == "memory":
        store: MemoryStore | DiskStore = MemoryStore()
    else:
        if cfg.train.feature_cache_dir is None and run_dir is None:
            raise ConfigError("train.feature_cache=disk needs train.feature_cache_dir (or a run folder to put it in)")
        store = DiskStore(Path(cfg.train.feature_cache_dir).expanduser() if cfg.train.feature_cache_dir
                          else Path(run_dir) / CACHE_DIR)
    cache = FeatureCache(encoder, model.encoder_description(), store)
    model.feature_cache = cache
    where = f" in {store.root}" if isinstance(store, DiskStore) else ""
    log.info("feature cache (%s%s): image-encoder outputs computed once per distinct image, reused after", mode, where)
    return cache
