"""What the store's crc32c checksums cost on reads, measured in one run.

Writes the same teacher features twice — a schema-2 store (crc32c on every chunk) and a
schema-1 store (no checksum) — then reads every image of both, alternating the order over
several repeats, and reports the CPU time per sample of each and their ratio.

    python examples/bench_checksum.py [--data ROOT] [--teacher retina_r50] [--num-images 16]
        [--img-scale 640,512] [--repeats 5]

Without --data it uses ../shared/data/coco2017-subset when present, else generated images.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.store import schema
from dfmsd_cli.store.precompute import PrecomputeOptions, precompute
from dfmsd_cli.store.reader import TeacherStore


def _data(arg: str | None, tmp: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), "val2017"
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco2017-subset"
    if (shared / "annotations").is_dir():
        return shared, "val2017"
    from dfmsd_cli.data.synthetic import make_synthetic

    return make_synthetic(tmp / "syn", images=16, seed=5), "train2017"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data")
    ap.add_argument("--teacher", default="retina_r50")
    ap.add_argument("--num-images", type=int, default=16)
    ap.add_argument("--img-scale", default="640,512")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="dfmsd-crc-"))
    root, split = _data(args.data, tmp)
    ann = root / "annotations" / f"instances_{split}.json"
    scale = tuple(int(x) for x in args.img_scale.split(","))
    stores = {}
    for version in (2, 1):
        schema.SCHEMA_VERSION = version  # 1: the layout before checksums
        o = PrecomputeOptions(
            teacher=args.teacher,
            split=split,
            cache=str(tmp / f"v{version}"),
            device="cpu",
            geometry=Geometry(img_scale=scale),
            num_workers=0,
            max_images=args.num_images,
            progress=False,
        )
        stores[version] = precompute(ann, root / split, o)["path"]
    schema.SCHEMA_VERSION = 2
    cpu = {1: 0.0, 2: 0.0}
    n = 0
    for r in range(args.repeats):
        for version in (2, 1) if r % 2 == 0 else (1, 2):
            store = TeacherStore.open(stores[version])
            idx = store.complete_indices()
            t0 = time.process_time()
            for i in idx:
                store.get(int(i), "orig")
            cpu[version] += time.process_time() - t0
        n += len(idx)
    res = {
        "teacher": args.teacher,
        "images": int(len(idx)),
        "img_scale": list(scale),
        "repeats": args.repeats,
        "ms_per_sample_crc32c": 1e3 * cpu[2] / n,
        "ms_per_sample_unchecksummed": 1e3 * cpu[1] / n,
        "ratio": cpu[2] / cpu[1],
    }
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
