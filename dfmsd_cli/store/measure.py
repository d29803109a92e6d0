"""Store measurements (for ``dfmsd bench store`` and docs/store.md), not tests.

* ``flip_consistency``: cosine(teacher(flip x), flip(teacher(x))) per FPN level — is a flipped
  stored map a substitute for the teacher on the flipped image? (It is not: see the README.)
* ``quantization_report``: bytes/image of each codec/dtype on real teacher maps stored as the
  store stores them (one image per chunk, landscape canvas), the relative RMSE of float16 and
  uint8, and the relative change of a feature-distillation loss sum (S - T)^2 over the valid
  positions (MGD/DFMSD form) when T comes from the store instead of float32.
* ``precompute_overhead``: precompute wall time ÷ teacher-only wall time on the same images,
  same batches and DataLoader (the teacher-only loop does everything except the store).
* ``read_throughput``: images/s reading a store shuffled through a DataLoader with workers.

All functions take an already-built model and dataset; ``bench_store`` wires them together.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import torch
from torch.utils.data import DataLoader

from dfmsd_cli.data.coco import CocoDetection
from dfmsd_cli.data.geometry import Geometry, pad_batch
from dfmsd_cli.models.checkpoint import load_teacher
from dfmsd_cli.store.chunks import RowCodec, pcodec_available
from dfmsd_cli.store.create import BLOSC_BLOCKSIZE
from dfmsd_cli.store.dataset import StoreDataset
from dfmsd_cli.store.precompute import PrecomputeOptions, precompute
from dfmsd_cli.store.probe import own_input
from dfmsd_cli.store.quantize import dequantize_uint8, quantize_uint8, relative_rmse
from dfmsd_cli.store.schema import level_shape, place_on_canvas
from dfmsd_cli.store.teacher_pass import BatchLoad, batch_plan, identity_collate


@torch.inference_mode()
def flip_consistency(model, ds: CocoDetection, indices: list[int]) -> dict[str, Any]:
    """Mean/min over images of cosine(teacher(pad(flip x)), flip_w(teacher(pad(x)))) per level.

    Both maps have the image's own padded size; flipping a stored map is what a distiller
    without an hflip view would do. Cosine over all C*h*w values of one image and level.
    """
    per: dict[int, list[float]] = {s: [] for s in model.strides}
    for i in indices:
        x, size = own_input(ds, i, "orig")
        xf, _ = own_input(ds, i, "hflip")
        fa = model(x, [size]).features
        fb = model(xf, [size]).features
        for s in model.strides:
            a = fb[s][0].flatten().double()
            b = fa[s][0].flip(-1).flatten().double()
            per[s].append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
    return {str(s): {"mean": float(np.mean(v)), "min": float(np.min(v))} for s, v in per.items()}


def _codecs() -> dict[str, Any]:
    out = {f"zstd-{lv}": numcodecs.Zstd(level=lv) for lv in (1, 3, 9)}
    for shuffle, sname in ((numcodecs.Blosc.SHUFFLE, "shuffle"), (numcodecs.Blosc.BITSHUFFLE,
                                                                  "bitshuffle")):  # fmt: skip
        # the store's blocks (BLOSC_BLOCKSIZE), and Blosc's own choice: stores before it
        for suffix, bs in (("", BLOSC_BLOCKSIZE), ("-autoblock", 0)):
            out[f"blosc-zstd3-{sname}{suffix}"] = numcodecs.Blosc(
                cname="zstd", clevel=3, shuffle=shuffle, blocksize=bs
            )
    if pcodec_available():  # PCodec (a numerical-sequence codec): optional
        out["pcodec-8"] = numcodecs.get_codec({"id": "pcodec", "level": 8})
    return out


# name -> (encode (C,h,w) float32 -> (stored array, side bytes), decode stored -> float32)
def _encodings() -> dict[str, tuple[Any, Any]]:
    from dfmsd_cli.store.quantize import from_bfloat16, to_bfloat16, to_float16, to_float32

    def uint8(f):
        q, p = quantize_uint8(f)
        return q, p

    out: dict[str, tuple[Any, Any]] = {
        "float16": (lambda f: (to_float16(f), None), lambda x, p: torch.from_numpy(x).float()),
        "bfloat16": (lambda f: (to_bfloat16(f), None), lambda x, p: from_bfloat16(x)),
        "uint8": (uint8, lambda x, p: dequantize_uint8(x, p)),
        "float32": (lambda f: (to_float32(f), None), lambda x, p: torch.from_numpy(x)),
    }
    for k in (7, 5, 3):
        out[f"float16+keep{k}"] = (
            lambda f, k=k: (to_float16(f, keepbits=k), None),
            lambda x, p: torch.from_numpy(x).float(),
        )
    for k in (5, 3):
        out[f"bfloat16+keep{k}"] = (
            lambda f, k=k: (to_bfloat16(f, keepbits=k), None),
            lambda x, p: from_bfloat16(x),
        )
    for d in (2, 1):  # numcodecs Quantize: round to an ABSOLUTE step 2^-ceil(d·log2 10), float16
        q = numcodecs.Quantize(digits=d, dtype="<f4", astype="<f2")
        out[f"float16+quantize{d}"] = (
            lambda f, q=q: (np.asarray(q.encode(f.numpy().astype(np.float32))), None),
            lambda x, p: torch.from_numpy(x.astype(np.float32)),
        )
    return out


@torch.inference_mode()
def quantization_report(
    model, ds: CocoDetection, indices: list[int], student=None
) -> dict[str, Any]:
    """Per encoding (dtype, keepbits): bytes/image under each codec, encode/decode MB/s of the
    default codec (blosc-zstd3-shuffle; bitshuffle for uint8), the relative RMSE against
    float32 and the relative change of a feature-distillation loss sum (S - T)^2."""
    canvas = ds.geometry.canvas()
    codecs = _codecs()
    encodings = _encodings()
    nbytes: dict[str, float] = {}
    raw_f32 = 0
    enc_time: dict[str, float] = {}
    dec_time: dict[str, float] = {}
    err: dict[str, list[float]] = {e: [] for e in encodings}
    loss_change: dict[str, list[float]] = {e: [] for e in encodings}
    for i in indices:
        x, size = own_input(ds, i)
        feats = model(x, [size]).features
        sfeats = student(x, [size]).features if student is not None else None
        hp, wp = x.shape[-2:]
        transposed = hp > wp
        # the reference sum has its own key: "float32" is also an encoding (stored exactly)
        ref = 0.0
        loss = dict.fromkeys(encodings, 0.0)
        for s in model.strides:
            f = feats[s][0].float()
            raw_f32 += f.numel() * 4
            hc, wc = level_shape(canvas, s)
            st = None
            if sfeats is not None and sfeats[s].shape == feats[s].shape:
                st = sfeats[s][0].float()
                ref += float((st - f).pow(2).sum())
            for e, (encode, decode) in encodings.items():
                stored, side = encode(f)
                chunk = np.ascontiguousarray(place_on_canvas(stored, hc, wc, transposed))
                for cname, codec in codecs.items():
                    key = f"{e}/{cname}"
                    t0 = time.perf_counter()
                    try:
                        blob = codec.encode(chunk)
                    except Exception:  # noqa: BLE001 - e.g. PCodec refuses 8-bit types
                        nbytes[key] = math.nan
                        continue
                    t1 = time.perf_counter()
                    codec.decode(blob)
                    t2 = time.perf_counter()
                    enc_time[key] = enc_time.get(key, 0.0) + t1 - t0
                    dec_time[key] = dec_time.get(key, 0.0) + t2 - t1
                    nbytes[key] = (
                        nbytes.get(key, 0) + len(blob) + (side.nbytes if side is not None else 0)
                    )
                back = decode(stored, side)
                err[e].append(relative_rmse(back, f))
                if st is not None:
                    loss[e] += float((st - back).pow(2).sum())
        if sfeats is not None and ref > 0:
            for e in encodings:
                loss_change[e].append(abs(loss[e] - ref) / ref)
    n = len(indices)
    out: dict[str, Any] = {"images": n, "raw_float32_bytes_per_image": raw_f32 / n, "encodings": {}}
    mb = raw_f32 / 2 / 1e6  # the raw float16 size, the unit of every MB/s figure
    for e in encodings:
        default = "blosc-zstd3-bitshuffle" if e == "uint8" else "blosc-zstd3-shuffle"
        out["encodings"][e] = {
            "bytes_per_image": nbytes[f"{e}/{default}"] / n,
            "vs_float32": nbytes[f"{e}/{default}"] / raw_f32,
            "relative_rmse_mean": float(np.mean(err[e])),
            "relative_rmse_max": float(np.max(err[e])),
            "loss_relative_change_mean": float(np.mean(loss_change[e])) if loss_change[e] else None,
            "encode_MBps": mb / max(enc_time[f"{e}/{default}"], 1e-9),
            "decode_MBps": mb / max(dec_time[f"{e}/{default}"], 1e-9),
            "codecs": {c: nbytes[f"{e}/{c}"] / n for c in codecs},
            "codec_MBps": {  # encode, decode MB/s of the raw float16 size, every codec
                c: [mb / max(enc_time[k], 1e-9), mb / max(dec_time[k], 1e-9)]
                for c in codecs
                if (k := f"{e}/{c}") in enc_time
            },
        }
    return out


# What ``precompute_overhead`` times: medians over ``bench precompute --repeats`` rounds.
_TIMINGS = ("teacher_only_s", "teacher_only_cpu_s", "precompute_cpu_s", "precompute_loop_cpu_s",
            "ratio_cpu", "ratio_cpu_total", "precompute_s", "precompute_loop_s", "ratio_total",
            "ratio", "writer_cpu_s")  # fmt: skip


def _precompute_encodings() -> dict[str, tuple[str, str]]:
    """Whole stores measured by ``bench precompute``: name -> (dtype, codec); the PCodec row
    when pcodec is installed."""
    out = {"float16": ("float16", "blosc"), "uint8": ("uint8", "blosc")}
    if pcodec_available():
        out["float16-pcodec"] = ("float16", "pcodec")
    return out


@torch.inference_mode()
def teacher_only(
    model, ds: CocoDetection, batches: list[list[int]], num_workers: int
) -> tuple[float, float]:
    """(wall, CPU) seconds of the same decode + forward loop precompute runs, without a store.

    CPU time is this process's (all threads; decoding workers are separate processes in both
    loops): on a shared machine it is far less sensitive to other users' load than wall time.
    """
    loader = DataLoader(
        BatchLoad(ds, batches),
        batch_size=None,
        num_workers=num_workers,
        collate_fn=identity_collate,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    for items in loader:
        imgs = [s["image"] for _, s in items if s is not None]
        sizes = [tuple(s["size"]) for _, s in items if s is not None]
        with torch.inference_mode():  # as precompute runs the teacher
            model(pad_batch(imgs, ds.geometry.pad_divisor), sizes)
    return time.perf_counter() - t0, time.process_time() - c0


def precompute_overhead(
    ann_file, image_dir, opts: PrecomputeOptions, model, ds: CocoDetection
) -> dict[str, Any]:
    """precompute wall (store created fresh) ÷ teacher-only wall over the same batch plan.

    The teacher-only loop runs before and after precompute and the mean is used, so a load
    change on a shared machine biases the ratio less. ``ratio`` / ``ratio_cpu`` use precompute's
    loop (setup — teacher build, store creation — excluded: it is amortised over a real split),
    ``ratio_total`` / ``ratio_cpu_total`` its whole call.
    """
    sizes = []
    for i in range(len(ds.image_ids)):
        info = ds.image_info(i)
        w, h = ds.geometry.padded_size(info["width"], info["height"])
        sizes.append((h, w))
    plan = batch_plan(sizes, 0, len(sizes), opts.block, opts.batch_size)
    (t_before, c_before) = teacher_only(model, ds, plan, opts.num_workers)
    t0, c0 = time.perf_counter(), time.process_time()
    summary = precompute(ann_file, image_dir, opts)
    t_pre, c_pre = time.perf_counter() - t0, time.process_time() - c0
    (t_after, c_after) = teacher_only(model, ds, plan, opts.num_workers)
    t_teacher = (t_before + t_after) / 2
    c_teacher = (c_before + c_after) / 2
    return {
        "images": len(sizes),
        "teacher_only_s": t_teacher,
        "teacher_only_runs_s": [t_before, t_after],
        "teacher_only_cpu_s": c_teacher,
        "precompute_cpu_s": c_pre,
        "precompute_loop_cpu_s": summary["loop_cpu_s"],
        # the writer threads' CPU (compression, files, rows): one thread keeps up with a teacher
        # of up to len(sizes) / writer_cpu_s images per second
        "writer_cpu_s": summary["writer_cpu_s"],
        "ratio_cpu": summary["loop_cpu_s"] / c_teacher,  # setup excluded, as in ``ratio``
        "ratio_cpu_total": c_pre / c_teacher,
        "precompute_s": t_pre,
        "precompute_loop_s": summary["loop_s"],
        "ratio_total": t_pre / t_teacher,
        "ratio": summary["loop_s"] / t_teacher,
        "store": summary["path"],
    }


def read_throughput(
    path: str,
    views: tuple[str, ...] = ("orig",),
    num_workers: int = 2,
    batch_size: int = 2,
    epochs: int = 1,
) -> dict[str, Any]:
    """Images/s of shuffled ``TeacherStore.get`` through a DataLoader (list-collated)."""
    ds = StoreDataset(path, views=views)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        collate_fn=identity_collate,
        generator=torch.Generator().manual_seed(0),
    )
    n = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            n += len(batch)
    dt = time.perf_counter() - t0
    return {"images": n, "seconds": dt, "images_per_s": n / dt, "num_workers": num_workers}


def _decode_direct(store, index: int, view: str) -> dict[str, np.ndarray]:
    """Decode the chunks ``store.get(index, view)`` needs straight from the files with numcodecs
    (no zarr): the floor a reader can approach. Local stores only."""
    m, root = store.meta, Path(store.path)
    out = {}
    names = [f"{k}/{view}/{st}" for st in m.strides for k in ("feat", "att_s", "att_c")]
    names += [f"det/{view}/{k}" for k in ("count", "boxes", "scores", "labels")]
    names.append(f"area_ratio/{view}")
    for name in names:
        a = store._array(name)
        block = a.chunks[0]
        codec = RowCodec.of(a)  # the chunk's key and codec chain (blosc/zstd/pcodec [+crc32c])
        data = (root / codec.key(index)).read_bytes()
        data = data[:-4] if codec.crc else data  # unchecked: the floor is decoding alone
        x = np.empty(a.chunks, dtype=codec.dtype)
        codec.compressor.decode(data, out=x)
        out[name] = x[index % block]
        if name.startswith("feat/"):
            out[name] = out[name].astype(np.float32)
    return out


def read_overhead(path: str, view: str = "orig", repeats: int = 3) -> dict[str, Any]:
    """CPU ms per sample of ``TeacherStore.get`` vs decoding the same chunks directly
    (``_decode_direct``), alternating the two over ``repeats`` passes over every image."""
    from dfmsd_cli.store.reader import TeacherStore

    store = TeacherStore.open(path)
    idx = [int(i) for i in store.complete_indices()]
    store.get(idx[0], view)  # warm-up: opens every array
    _decode_direct(store, idx[0], view)
    cpu = {"get": 0.0, "direct": 0.0}
    for r in range(repeats):
        order = ("get", "direct") if r % 2 == 0 else ("direct", "get")
        for kind in order:
            t0 = time.process_time()
            for i in idx:
                store.get(i, view) if kind == "get" else _decode_direct(store, i, view)
            cpu[kind] += time.process_time() - t0
    n = repeats * len(idx)
    return {
        "images": len(idx),
        "repeats": repeats,
        "get_ms": 1e3 * cpu["get"] / n,
        "direct_decode_ms": 1e3 * cpu["direct"] / n,
        "ratio": cpu["get"] / cpu["direct"],
    }


def student_step_rate(student, ds: CocoDetection, indices: list[int], batch_size: int) -> float:
    """Images/s of a plain student train step (forward + backward) — what distill consumes.

    One untimed warm-up step first (allocator and kernel start-up), then every batch timed.
    """
    student.train()
    samples = [ds.get(i, "orig") for i in indices]
    opt = torch.optim.SGD(student.parameters(), lr=1e-4)

    def step(b: list[dict]) -> None:
        x = pad_batch([s["image"] for s in b], ds.geometry.pad_divisor)
        targets = [{"boxes": s["boxes"], "labels": s["labels"]} for s in b]
        out = student(x, [tuple(s["size"]) for s in b], targets)
        loss = sum(out.losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(samples[:batch_size])  # warm-up, not timed
    t0 = time.perf_counter()
    n = 0
    for k in range(0, len(samples), batch_size):
        step(samples[k : k + batch_size])
        n += len(samples[k : k + batch_size])
    student.eval()
    return n / (time.perf_counter() - t0)


def bench_store(
    ann_file: str | Path,
    image_dir: str | Path,
    teacher: str = "retina_r50",
    student: str = "retina_r18",
    images: int = 16,
    geometry: Geometry | None = None,
    work_dir: str | Path | None = None,
    num_workers: int = 2,
    batch_size: int = 2,
    seed: int = 0,
    parts: tuple[str, ...] = ("flip", "quant", "precompute", "read"),
    log=print,
    repeats: int = 1,
) -> dict[str, Any]:
    """Run the store measurements on the first ``images`` images; returns a JSON-able dict.

    ``repeats`` > 1 measures every precompute encoding that many times, in rounds (each round
    every encoding once, so a load change on a shared machine hits them alike); its ratios are
    then the medians, and ``ratio_runs`` / ``ratio_cpu_runs`` list every round's."""
    geometry = geometry or Geometry()
    ds = CocoDetection(ann_file, image_dir, geometry=geometry, train=False, max_images=images)
    idx = list(range(len(ds.image_ids)))
    model = load_teacher(teacher, ds.num_classes, None, seed)
    torch.manual_seed(seed + 1)
    stu = load_teacher(student, ds.num_classes, None, seed + 1)
    res: dict[str, Any] = {
        "teacher": teacher,
        "student": student,
        "weights": "random init (no pretrained weights available offline)",
        "images": len(idx),
        "img_scale": list(geometry.img_scale),
        "torch_threads": torch.get_num_threads(),
    }
    if "flip" in parts:
        res["flip_cosine"] = flip_consistency(model, ds, idx)
        log(f"flip cosine: {res['flip_cosine']}")
    if "quant" in parts:
        res["quantization"] = quantization_report(model, ds, idx, stu)
        log("quantization done")
    work = Path(work_dir or tempfile.mkdtemp(prefix="dfmsd-bench-"))
    stores = {}
    if "precompute" in parts or "read" in parts:
        res["precompute"] = {}
        rounds = [(k, e) for k in range(max(1, repeats)) for e in _precompute_encodings().items()]
        for k, (name, (dtype, codec)) in rounds:
            opts = PrecomputeOptions(
                teacher=teacher,
                split=f"bench-{name}" + (f"-{k}" if k else ""),  # a fresh store every round
                cache=str(work / "cache"),
                dtype=dtype,
                codec=codec,
                geometry=geometry,
                batch_size=batch_size,
                num_workers=num_workers,
                max_images=images,
                seed=seed,
                device="cpu",
                progress=False,
            )
            r = precompute_overhead(ann_file, image_dir, opts, model, ds)
            from dfmsd_cli.store.inspect import store_info

            log(f"precompute {name}: {r}")
            if k == 0:  # sizes once: every round writes the same bytes
                info = store_info(r["store"])
                r["bytes_per_image"] = info["bytes_per_image"]
                r["compression_ratio"] = info["compression_ratio"]
                res["precompute"][name] = r
                stores[name] = r["store"]
                continue
            first = res["precompute"][name]  # every timing becomes the median of the rounds
            for key in _TIMINGS:
                first.setdefault(f"{key}_runs", [first[key]]).append(r[key])
                first[key] = float(np.median(first[f"{key}_runs"]))
    if "read" in parts:
        res["read"] = {
            dt: read_throughput(p, num_workers=num_workers, batch_size=batch_size, epochs=3)
            for dt, p in stores.items()
        }
        res["read_one_sample"] = read_overhead(stores["float16"])
        if "float16-pcodec" in stores:
            res["read_one_sample_pcodec"] = read_overhead(stores["float16-pcodec"])
        log(f"one sample: {res['read_one_sample']}")
        rate = student_step_rate(stu, ds, idx[: 2 * batch_size], batch_size)
        res["student_train_images_per_s"] = rate
        res["read_vs_student"] = {dt: r["images_per_s"] / rate for dt, r in res["read"].items()}
        log(f"read: {res['read']} student {rate:.3f} img/s")
    res["hours_per_118k_images"] = (
        res["precompute"]["float16"]["precompute_s"] / len(idx) * 118287 / 3600
        if "precompute" in res
        else math.nan
    )
    return res
