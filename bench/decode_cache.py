"""What a decode-cache hit saves (``data.cache``): ms per sample for ``load_sample`` (a miss) against a memory hit
and a disk hit (page-cached file), on a folder of images + masks (generic layout) at a given scale factor.

    python bench/decode_cache.py /tmp/medtune-scale/n1000 --n 100                 # 512² PNG, native scale
    python bench/decode_cache.py ../shared/data/DRIVE/training --layout drive --scale 1.75   # TIFF + GIF, resampled
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from medtune.config import build_config
from medtune.data.decode_cache import DecodeCache
from medtune.data.layouts import discover
from medtune.data.loading import load_sample


def per_sample_ms(fn, samples) -> float:
    times = []
    for s in samples:
        t = time.perf_counter()
        fn(s)
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--layout", default="generic")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--scale", type=float, default=1.0)
    args = ap.parse_args()
    cfg = build_config({}, [f"data.layout={args.layout}", f"data.path={args.path}"]).data
    samples = sorted(discover(cfg), key=lambda s: s.id)[: args.n]
    memory = DecodeCache(cfg, "memory", 1e6)
    with tempfile.TemporaryDirectory() as tmp:
        disk = DecodeCache(cfg, "disk", 1e6, tmp)
        miss = per_sample_ms(lambda s: load_sample(s, cfg, args.scale), samples)
        fill = per_sample_ms(lambda s: (memory.load(s, args.scale), disk.load(s, args.scale)), samples)
        mem_hit = per_sample_ms(lambda s: memory.load(s, args.scale), samples)
        disk_hit = per_sample_ms(lambda s: disk.load(s, args.scale), samples)
        entry_mb = disk.store.nbytes() / len(samples) / 2**20
    shape = load_sample(samples[0], cfg, args.scale).image.shape
    print(f"{len(samples)} samples, image {tuple(shape)} after scale {args.scale}, median ms/sample: decode (miss) "
          f"{miss:.1f}, memory hit {mem_hit:.1f}, disk hit {disk_hit:.1f} (fill, both stores: {fill:.1f}); "
          f"{entry_mb:.1f} MB per disk entry; hits {memory.hits}/{disk.hits}")


if __name__ == "__main__":
    main()
