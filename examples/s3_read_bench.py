"""Read throughput of a store on S3 with a per-request latency (docs/object_storage.md).

Starts moto's S3 server on 127.0.0.1 (``tests/s3server.py``; needs ``pip install -e '.[test]'``),
precomputes a synthetic store into it, then reads every image through a proxy that holds each
request ``--latency`` seconds, in four ways: one request at a time (concurrency 1), all chunks
of a sample together (``TeacherStore.get``), all chunks of a batch together
(``TeacherStore.get_many``), and the batch read again from a ``cache_local`` folder (the second
epoch); then distill's ``DistillDataset`` (images decoded too) item by item and per batch
(``__getitems__``). Prints samples/s and a batch's read time ÷ the latency of one request.

    python examples/s3_read_bench.py --latency 0.02 --batch 8 --images 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _use(env: dict[str, str]) -> None:
    """Point this process's S3 clients at ``env`` (fsspec caches its filesystems)."""
    import s3fs

    from dfmsd_cli.store import remote

    os.environ.update(env)
    remote._checked.clear()
    s3fs.S3FileSystem.clear_instance_cache()


def _epoch(store, items: list, batch: int, many: bool) -> tuple[float, float]:
    """(seconds for all items, mean seconds per batch)."""
    t0 = time.perf_counter()
    per = []
    for k in range(0, len(items), batch):
        tb = time.perf_counter()
        chunk = items[k : k + batch]
        if many:
            store.get_many(chunk)
        else:
            for i, v in chunk:
                store.get(i, v)
        per.append(time.perf_counter() - tb)
    return time.perf_counter() - t0, sum(per) / len(per)


class _Latency:
    """A group whose store awaits ``delay`` s before every ``get`` (requests overlap)."""

    def __init__(self, group, delay: float):
        self._group, self.delay = group, delay
        inner = group.store

        class _Store:
            async def get(self_, key, prototype, byte_range=None):
                import asyncio

                await asyncio.sleep(delay)
                return await inner.get(key, prototype, byte_range)

        self.store = _Store()

    def __getattr__(self, name):
        return getattr(self._group, name)


def _dataset_epoch(ds, batch: int, many: bool) -> tuple[float, float]:
    """``_epoch`` through ``DistillDataset``: items one by one (``ds[k]``) or per batch
    (``ds.__getitems__``, what the DataLoader calls); includes decoding the images."""
    t0, per = time.perf_counter(), []
    for k in range(0, len(ds), batch):
        tb = time.perf_counter()
        ks = list(range(k, min(k + batch, len(ds))))
        if many:
            ds.__getitems__(ks)
        else:
            for i in ks:
                ds[i]
        per.append(time.perf_counter() - tb)
    return time.perf_counter() - t0, sum(per) / len(per)


def _server(s3server):
    """moto in its own process (its request handling must not share this process's GIL):
    (Popen, S3Server)."""
    import subprocess

    code = (
        "import json, sys, time; sys.path.insert(0, sys.argv[1]); import s3server; "
        "_, s3 = s3server.start(); print(json.dumps(s3.__dict__), flush=True); time.sleep(1e6)"
    )
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    proc = subprocess.Popen([sys.executable, "-c", code, tests], stdout=subprocess.PIPE, text=True)
    return proc, s3server.S3Server(**json.loads(proc.stdout.readline()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=float, default=0.02, help="seconds added to each request")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--teacher", default="retina_tiny")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()

    import s3server

    from dfmsd_cli.cli import main as dfmsd
    from dfmsd_cli.data.synthetic import make_synthetic
    from dfmsd_cli.store.reader import TeacherStore

    server, s3 = _server(s3server)
    proxy = s3server.DelayProxy(int(s3.endpoint.rsplit(":", 1)[1]), a.latency)
    tmp = Path(tempfile.mkdtemp(prefix="s3bench-"))
    try:
        root = make_synthetic(tmp / "data", images=a.images, seed=0, min_size=96, max_size=160)
        cache = f"s3://{s3.bucket}/bench/cache"
        _use(s3.env())
        argv = ["precompute", "--teacher", a.teacher, "--data", str(root), "--cache", cache,
                "--img-scale", "160,128", "--batch-size", "4", "--num-workers", "0",
                "--device", "cpu", "--block", "8"]  # fmt: skip
        try:
            dfmsd(argv)
        except SystemExit as exc:
            if exc.code:
                raise
        url = f"{cache}/{a.teacher}/train2017.zarr"
        _use(s3.env(AWS_ENDPOINT_URL=proxy.endpoint))
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        lat = []
        for _ in range(10):  # one small GET through the proxy: the single-request latency
            t = time.perf_counter()
            fs.cat_file(f"{url[5:]}/zarr.json")
            lat.append(time.perf_counter() - t)
        one = sorted(lat)[len(lat) // 2]
        rows = []
        runs = [("sequential requests (concurrency 1)", 1, False, None),
                ("one round trip per sample (get)", None, False, None),
                ("one round trip per batch (get_many)", None, True, None),
                ("get_many, cache_local, 1st epoch", None, True, tmp / "local"),
                ("get_many, cache_local, 2nd epoch", None, True, tmp / "local")]  # fmt: skip
        for name, conc, many, local in runs:
            store = TeacherStore.open(url, concurrency=conc, cache_local=local)
            items = [(int(i), "orig") for i in store.complete_indices()]
            store.get(*items[0])  # open arrays and codecs once per process
            secs, per_batch = _epoch(store, items, a.batch, many)
            rows.append({"read": name, "samples_per_s": len(items) / secs,
                         "batch_s": per_batch, "batch_over_latency": per_batch / one})  # fmt: skip
        # distill's dataset (store + COCO images + replay): per sample vs one get_many per batch
        from dfmsd_cli.data.coco import CocoDetection
        from dfmsd_cli.data.geometry import Geometry
        from dfmsd_cli.distill.dataset import DistillDataset

        coco = CocoDetection(root / "annotations" / "instances_train2017.json",
                             root / "train2017", geometry=Geometry(img_scale=(160, 128)),
                             views=("orig",))  # fmt: skip

        def distill_dataset(store):
            rows_of = {i: r for r, i in enumerate(store.meta.image_ids)}
            ds = DistillDataset(coco, store, [rows_of[i] for i in coco.image_ids])
            ds[0]  # open arrays and codecs once per process
            return ds

        ds_runs = (("DistillDataset, item by item (before)", False),
                   ("DistillDataset.__getitems__ (one get_many per batch)", True))  # fmt: skip
        for name, many in ds_runs:
            ds = distill_dataset(TeacherStore.open(url))
            secs, per_batch = _dataset_epoch(ds, a.batch, many)
            rows.append({"read": name, "samples_per_s": len(ds) / secs,
                         "batch_s": per_batch, "batch_over_latency": per_batch / one})  # fmt: skip
        sample = TeacherStore.open(url)
        n_chunks = len(sample._plan(0, "orig", None)[0])
        print(f"request latency (median GET through the proxy): {one * 1000:.1f} ms; "
              f"{n_chunks} arrays per sample, batch {a.batch}, {len(items)} images")  # fmt: skip
        print("| read | samples/s | batch read (ms) | batch ÷ one request |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['read']} | {r['samples_per_s']:.1f} | {r['batch_s'] * 1000:.0f} | "
                  f"{r['batch_over_latency']:.2f} |")  # fmt: skip
        # the same reads from a local copy whose every request awaits --latency in-process:
        # the reader alone, without the server's CPU per request
        _use(s3.env())
        s3fs.S3FileSystem(skip_instance_cache=True).get(url[5:], str(tmp / "copy.zarr"),
                                                        recursive=True)  # fmt: skip
        mock = []
        for name, conc, many in (("sequential requests (concurrency 1)", 1, False),
                                 ("one round trip per sample (get)", None, False),
                                 ("one round trip per batch (get_many)", None, True)):  # fmt: skip
            store = TeacherStore.open(tmp / "copy.zarr")
            store.get(*items[0])
            store._group = _Latency(store.group, a.latency)
            store.concurrency = conc
            secs, per_batch = _epoch(store, items, a.batch, many)
            mock.append({"read": name, "samples_per_s": len(items) / secs, "batch_s": per_batch,
                         "batch_over_latency": per_batch / a.latency})  # fmt: skip
        for name, many in ds_runs:
            store = TeacherStore.open(tmp / "copy.zarr")
            ds = distill_dataset(store)
            store._group = _Latency(store.group, a.latency)
            secs, per_batch = _dataset_epoch(ds, a.batch, many)
            mock.append({"read": name, "samples_per_s": len(ds) / secs, "batch_s": per_batch,
                         "batch_over_latency": per_batch / a.latency})  # fmt: skip
        print(f"\nin-process store, every request awaits {a.latency * 1000:.0f} ms:")
        print("| read | samples/s | batch read (ms) | batch ÷ latency |")
        print("|---|---|---|---|")
        for r in mock:
            print(f"| {r['read']} | {r['samples_per_s']:.1f} | {r['batch_s'] * 1000:.0f} | "
                  f"{r['batch_over_latency']:.2f} |")  # fmt: skip
        if a.json:
            out = {"latency_s": one, "rows": rows, "in_process": mock}
            Path(a.json).write_text(json.dumps(out, indent=2))
    finally:
        proxy.close()
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
