"""The decode cache (data.cache): hits serve what load_sample gives, the bound holds, a changed file or a corrupt
entry is a miss, and training reads the same data with and without it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import tiny_cfg, write_generic
from PIL import Image
from safetensors.torch import load_file

from medtune.config import build_config
from medtune.data.decode_cache import DecodeCache, DiskStore
from medtune.data.layouts import discover
from medtune.data.loading import LazySamples, load_sample
from medtune.train.sft import train

MB = 1024 * 1024


@pytest.fixture
def samples(tmp_path):
    root = write_generic(tmp_path / "data", n=4, size=32)
    cfg = build_config({}, ["data.layout=generic", f"data.path={root}"])
    return cfg.data, sorted(discover(cfg.data), key=lambda s: s.id)


def _same(a, b) -> bool:
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("image", "mask", "fov")) and a.id == b.id


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_a_second_load_is_a_hit_equal_to_decoding(samples, tmp_path, kind):
    cfg, found = samples
    cache = DecodeCache(cfg, kind, 16, tmp_path / "cache")
    first = cache.load(found[0])
    second = cache.load(found[0])
    assert (cache.misses, cache.hits) == (1, 1)
    assert _same(first, load_sample(found[0], cfg)) and _same(second, first)
    second.image[:] = 0  # a dataset writing into its item does not write into the cache
    assert _same(cache.load(found[0]), first)
    cache.load(found[0], scale=0.5)  # other decode settings: another entry
    assert cache.misses == 2


def test_memory_bound_evicts_the_least_recently_used(samples):
    cfg, found = samples
    one = sum(a.nbytes for a in (load_sample(found[0], cfg).image, load_sample(found[0], cfg).mask,
                                 load_sample(found[0], cfg).fov))
    cache = DecodeCache(cfg, "memory", 2.5 * one / MB)  # room for two entries
    for s in (found[0], found[1], found[0], found[2]):  # found[0] used again before found[2] comes in
        cache.load(s)
    assert len(cache.store) == 2 and cache.store.nbytes <= cache.store.max_bytes
    cache.load(found[0])
    assert cache.hits == 2  # kept as recently used ...
    cache.load(found[1])
    assert cache.misses == 4  # ... while found[1] was evicted


def test_disk_bound_holds_across_writes(samples, tmp_path):
    cfg, found = samples
    probe = DecodeCache(cfg, "disk", 16, tmp_path / "probe")
    probe.load(found[0])
    entry = probe.store.nbytes()
    cache = DecodeCache(cfg, "disk", 2.5 * entry / MB, tmp_path / "cache")
    for s in found:
        cache.load(s)
        assert cache.store.nbytes() <= cache.store.max_bytes
    assert len(cache.store.entries()) == 2  # evicted down to 90 % of the bound: two of the four


def test_a_changed_file_is_a_miss(samples, tmp_path):
    cfg, found = samples
    cache = DecodeCache(cfg, "disk", 16, tmp_path / "cache")
    before = cache.load(found[0])
    pixels = np.asarray(Image.open(found[0].image)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]  # one pixel: same size, same name
    Image.fromarray(pixels).save(found[0].image)
    after = cache.load(found[0])
    assert cache.misses == 2 and not np.array_equal(after.image, before.image)
    assert _same(after, load_sample(found[0], cfg))


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_corrupt_disk_entry_is_a_miss_not_a_crash(samples, tmp_path, damage):
    cfg, found = samples
    cache = DecodeCache(cfg, "disk", 16, tmp_path / "cache")
    cache.load(found[0])
    (_, _, path), = cache.store.entries()
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF  # inside the image array: only the digest can tell
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"not a safetensors file")
    path.write_bytes(bytes(data))
    again = DecodeCache(cfg, "disk", 16, tmp_path / "cache")
    assert _same(again.load(found[0]), load_sample(found[0], cfg))
    assert again.misses == 1 and again.store.corrupt == 1
    assert isinstance(again.store, DiskStore) and again.store.get(path.stem) is not None  # written again, whole


def test_lazy_samples_read_through_the_cache(samples, tmp_path):
    cfg, found = samples
    cache = DecodeCache(cfg, "memory", 16)
    lazy = LazySamples(found, cfg, cache=cache)
    assert [s.id for s in lazy] == [s.id for s in found] and cache.misses == 4
    assert all(_same(a, load_sample(s, cfg)) for a, s in zip(lazy, found))
    assert cache.hits == 4


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_training_with_the_cache_gives_the_same_weights(tmp_path, cache):
    plain = train(tiny_cfg(tmp_path, "train.preflight=false", steps=4, name="plain"))
    cached = train(tiny_cfg(tmp_path, "train.preflight=false", f"data.cache={cache}", steps=4, name=cache))
    a = load_file(str(plain / "checkpoints" / "last" / "model" / "model.safetensors"))
    b = load_file(str(cached / "checkpoints" / "last" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a)
    if cache == "disk":  # it was used: one entry per training and validation image, under the run folder
        split = json.loads((cached / "split.json").read_text())
        assert len(list((cached / "decode_cache").glob("*.safetensors"))) == len(split["train"]) + len(split["val"])
