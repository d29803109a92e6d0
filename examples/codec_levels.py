"""Blosc codec settings on a store's own feature chunks: stored/raw and one-thread encode and
decode MB/s (of the raw size, the fastest of 3 passes) for zstd levels 1/2/3/5 and lz4, byte and
bit shuffle, 256 KiB blocks (the store's ``BLOSC_BLOCKSIZE``). Re-encodes the stored values, so
the numbers are those of the store's dtype (docs/store.md, "Writer budget").

Usage: PYTHONPATH=. python examples/codec_levels.py STORE.zarr [IMAGES] [VIEW]
e.g. after ``dfmsd precompute --teacher retina_r50 --data ../shared/data/coco2017-subset
--split val2017 --cache /tmp/r50c --max-images 8 --views orig``:
``PYTHONPATH=. python examples/codec_levels.py /tmp/r50c/retina_r50/val2017.zarr 8``
"""

from __future__ import annotations

import sys
import time

import numcodecs
import numpy as np
import zarr

from dfmsd_cli.store.create import BLOSC_BLOCKSIZE

path = sys.argv[1]
images = int(sys.argv[2]) if len(sys.argv) > 2 else 8
view = sys.argv[3] if len(sys.argv) > 3 else "orig"
REPEATS = 3
g = zarr.open_group(path, mode="r")
strides = sorted(int(s) for s in g[f"feat/{view}"].array_keys())
arrays = [g[f"feat/{view}/{s}"] for s in strides]
chunks = [np.ascontiguousarray(a[i]) for i in range(images) for a in arrays]
raw = sum(x.nbytes for x in chunks)
print(f"{path}: {images} images, view {view}, strides {strides}, {chunks[0].dtype}, "
      f"{raw / images / 1e6:.2f} MB raw per image")  # fmt: skip
print("| codec | stored/raw | encode MB/s | decode MB/s |\n|---|---|---|---|")
settings = [("zstd", lv) for lv in (1, 2, 3, 5)] + [("lz4", 5)]
for cname, level in settings:
    for shuffle, sname in ((numcodecs.Blosc.SHUFFLE, "shuffle"),
                           (numcodecs.Blosc.BITSHUFFLE, "bitshuffle")):  # fmt: skip
        c = numcodecs.Blosc(cname=cname, clevel=level, shuffle=shuffle, blocksize=BLOSC_BLOCKSIZE)
        t_enc = t_dec = float("inf")
        for _ in range(REPEATS):  # the fastest pass: a shared machine only ever adds time
            t0 = time.thread_time()
            enc = [c.encode(x) for x in chunks]
            t_enc = min(t_enc, time.thread_time() - t0)
            t0 = time.thread_time()
            for e in enc:
                c.decode(e)
            t_dec = min(t_dec, time.thread_time() - t0)
        stored = sum(len(e) for e in enc)
        print(f"| blosc-{cname}{level} + {sname} | {stored / raw:.3f} | {raw / t_enc / 1e6:.0f} | "
              f"{raw / t_dec / 1e6:.0f} |")  # fmt: skip
