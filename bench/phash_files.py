"""Near-duplicate hashing as the split does it (``inspect.file_phash64``: the file read for the hash only) against
the hash of the image as training decodes it (``phash64(read_image(...))``, what the split hashed before): ms per
image and how many of the 64 bits differ.

    python bench/phash_files.py "../shared/data/BUSI/*/*).png" --n 100
    python bench/phash_files.py "jpg/*.jpg" --n 100          # e.g. those BUSI images re-saved as JPEG (quality 90)
"""
from __future__ import annotations

import argparse
import glob
import time

import numpy as np

from medtune.data.inspect import file_phash64, phash64
from medtune.data.io import read_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pattern")
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    files = sorted(glob.glob(args.pattern))[: args.n]
    t0 = time.perf_counter()
    decoded = [phash64(read_image(f, channels=1)) for f in files]
    t1 = time.perf_counter()
    from_file = [file_phash64(f) for f in files]
    t2 = time.perf_counter()
    bits = np.array([bin(a ^ b).count("1") for a, b in zip(decoded, from_file)])
    print(f"{len(files)} files: decoded image {1000 * (t1 - t0) / len(files):.1f} ms/image, file hash "
          f"{1000 * (t2 - t1) / len(files):.1f} ms/image (one thread); bits differing: max {bits.max()}, "
          f"images with any {int((bits > 0).sum())}, mean {bits.mean():.2f}")


if __name__ == "__main__":
    main()
