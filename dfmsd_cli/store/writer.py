"""Writing the teacher store: per-image writes and a background writer (creation:
``store/create.py``, re-exported here).

Per image, ``StoreWriter.write`` stores every view and level, the attention statistics, the
top-K detections, the area ratio and (ME view) the enhancement parameters, and only then the
completion marker ``done[i] = 1``: a process killed at any moment leaves that image pending,
never half-complete (a chunk file is replaced through a temporary file and a rename; a new
one, of a still-pending image, is written in place: ``store/chunks.py``).

``BackgroundWriter`` runs the writes in threads fed by a bounded queue so the teacher's next
forward pass overlaps quantisation, compression and IO (the codecs and numpy release the GIL):
several threads write the per-image chunks (``StoreWriter.write_chunks``), one finisher thread
writes the block-chunked rows and the marker (``StoreWriter.finish``); the queue bound keeps
memory flat if the disk is slower than the teacher.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from dfmsd_cli.data.enhance import area_ratio
from dfmsd_cli.store import schema
from dfmsd_cli.store.chunks import RowCodec, put_chunks
from dfmsd_cli.store.create import (  # noqa: F401  re-exported: the store's write API
    CODECS,
    WRITE_CONFIG,
    StoreSpec,
    create_or_open,
    feature_codec,
    storage_dtype,
    store_exists,
)
from dfmsd_cli.store.pca import image_stat, project, split_basis
from dfmsd_cli.store.quantize import FLOAT_ENCODERS, quantize_uint8, to_float16
from dfmsd_cli.store.schema import place_on_canvas
from dfmsd_cli.store.statistics import raw_statistics

# ---------------------------------------------------------------------------------- per image


@dataclass
class ViewResult:
    """The teacher's output for one image and view, at the image's own padded size."""

    # {stride: (C, h_s, w_s)} float32, or float16 range-checked by the teacher pass (a float16
    # store without --pca: cast on the teacher's device, half the bytes to copy)
    features: dict[int, torch.Tensor]
    boxes: torch.Tensor  # (n, 4) xyxy in resized + view coordinates
    scores: torch.Tensor  # (n,)
    labels: torch.Tensor  # (n,) 1..K
    logits: dict[int, torch.Tensor] | None = None  # {stride: (A·K, h_s, w_s)} --store-logits
    # {stride: (spatial (h_s, w_s), channel (C,))} when the teacher pass computed them (on its
    # device, before features were cast); None: the writer computes them
    statistics: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class ImageResult:
    index: int
    size: tuple[int, int]  # resized (h, w)
    pad_size: tuple[int, int]  # own padded (H, W)
    views: dict[str, ViewResult]
    enhance: dict | None = None  # {"params": float64 (7,), "checksum": int}
    adv: dict | None = None  # {"delta": int8 (3, h, w), "checksum": int}


class StoreWriter:
    """Per-image writer for an open store group (one per process).

    Per-image chunks (``feat``, ``att_s``) are encoded here and written whole, all of an image's
    in one store round trip (``store/chunks.py``). The small block-chunked rows are buffered
    per block and each block's chunk is written ONCE when the block's last expected image is in
    (``expect``), at ``flush()``, or every ``flush_seconds`` — instead of a read-modify-write of
    the block's chunk for every image. The completion markers of a block are written last, after
    its rows, so a killed process leaves its buffered images pending (they are recomputed), never
    half-complete; rows of a block written by an earlier run are read once and kept.
    """

    def __init__(self, group: zarr.Group, flush_seconds: float = 60.0):
        self.group = group
        self.attrs = dict(group.attrs)[schema.ATTR_KEY]
        self.block = int(self.attrs["block"])
        self.n = int(self.attrs["dataset"]["num_images"])
        self.flush_seconds = flush_seconds
        self._arrays: dict[str, zarr.Array] = {}
        self._codecs: dict[str, RowCodec | None] = {}
        self._rows: dict[int, dict[str, dict[int, np.ndarray]]] = {}  # block -> name -> i -> row
        self._expected: dict[int, int] = {}
        self._finished: dict[int, int] = {}
        self._last_flush = time.monotonic()
        # per-image chunks written by this writer: images and compressed bytes (space.SpaceWatch)
        self.chunked_images = self.chunk_bytes = 0
        self._count_lock = threading.Lock()
        # --pca: {stride: (μ, W)} read from the store (the one basis of every image)
        self._pca = (
            {int(s): split_basis(group[f"pca/{s}"][:]) for s in self.attrs["strides"]}
            if self.attrs.get("pca_components")
            else None
        )

    def _a(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self.group[name].with_config(WRITE_CONFIG)
        return self._arrays[name]

    def _codec(self, name: str) -> RowCodec | None:
        if name not in self._codecs:
            self._codecs[name] = RowCodec.of(self._a(name))
        return self._codecs[name]

    def done(self) -> np.ndarray:
        return np.asarray(self._a("done")[:])

    def expect(self, indices) -> None:
        """The images this run will finish (or mark unreadable): a block is written as soon as
        its last expected image is in."""
        for i in indices:
            b = int(i) // self.block
            self._expected[b] = self._expected.get(b, 0) + 1

    def mark_unreadable(self, index: int) -> None:
        self._put(index, "done", np.uint8(schema.DONE_UNREADABLE))
        self._finished_one(index)

    def write_chunks(self, r: ImageResult) -> dict[str, np.ndarray]:
        """Phase 1 (any thread): quantise, encode and write the per-image chunks (``feat``,
        ``att_s``) in one round trip. They belong to image ``r.index`` alone, so several threads
        may run this phase for different images at once. Returns the small rows for ``finish``.
        """
        a, i = self.attrs, r.index
        hp, wp = r.pad_size
        transposed = hp > wp
        rows: dict[str, np.ndarray] = {}
        chunks: list[tuple[str, np.ndarray]] = []
        for s in a["strides"]:
            hc, wc = a["level_shapes"][str(s)]
            for v in a["views"]:
                f = r.views[v].features[s]
                rows[f"valid/{s}"] = np.asarray(f.shape[-2:], dtype=np.int32)
                what = f"image {i} view {v} stride {s}"
                keep = a["quantization"].get("keepbits")
                kept = f  # what is stored: the features, or their --pca components
                if self._pca is not None:
                    kept = project(f, *self._pca[s])
                    rows[f"pca_stat/{v}/{s}"] = image_stat(f, kept, *self._pca[s])
                if a["dtype"] in FLOAT_ENCODERS:
                    data = FLOAT_ENCODERS[a["dtype"]](kept, what, keep)
                else:
                    data, rows[f"qparams/{v}/{s}"] = quantize_uint8(kept, what)
                chunks.append((f"feat/{v}/{s}", place_on_canvas(data, hc, wc, transposed)))
                # attention statistics of the FULL features, projected or not
                got = r.views[v].statistics
                sp, ch = got[s] if got else (x[0] for x in raw_statistics(f[None]))
                chunks.append((f"att_s/{v}/{s}", place_on_canvas(sp.numpy(), hc, wc, transposed)))
                rows[f"att_c/{v}/{s}"] = ch.numpy()
                if a.get("logits"):
                    lg = r.views[v].logits
                    if lg is None:
                        raise ValueError(f"{what}: the store keeps logits but none were given")
                    z = to_float16(lg[s].float(), f"{what} (logits)")
                    chunks.append((f"logits/{v}/{s}", place_on_canvas(z, hc, wc, transposed)))
        if "adv" in a["views"]:
            if r.adv is None:
                raise ValueError(f"image {i}: the store has an 'adv' view but no perturbation")
            hi, wi = schema.level_shape(tuple(a["canvas"]), 1)
            delta = np.asarray(r.adv["delta"], dtype=np.int8)
            chunks.append(("adv/delta", place_on_canvas(delta, hi, wi, transposed)))
        fast = [(self._codec(n), i, x[None]) for n, x in chunks if self._codec(n) is not None]
        nbytes = 0
        if fast:  # image i is pending until finish(): a new chunk may be written in place
            nbytes = put_chunks(self.group.store, fast, pending_only=True)
        with self._count_lock:  # writer threads run this for several images at once
            self.chunked_images += 1
            self.chunk_bytes += nbytes
        for n, x in chunks:
            if self._codec(n) is None:
                self._a(n)[i] = x
        return rows

    def finish(self, r: ImageResult, rows: dict[str, np.ndarray]) -> None:
        """Phase 2 (ONE thread per process): buffer the small rows and the marker of the image;
        its block is written when complete (``expect``) or at ``flush``."""
        a, i = self.attrs, r.index
        put = self._put
        put(i, "pad_size", np.asarray(r.pad_size, dtype=np.int32))
        put(i, "size", np.asarray(r.size, dtype=np.int32))
        put(i, "transposed", np.bool_(r.pad_size[0] > r.pad_size[1]))
        for name, row in rows.items():
            put(i, name, row)
        k, thr = a["topk"], a["score_thr"]
        for v in a["views"]:
            vr = r.views[v]
            order = torch.argsort(vr.scores, descending=True, stable=True)[:k]
            n = int(order.numel())
            boxes = np.zeros((k, 4), np.float32)
            scores = np.zeros((k,), np.float32)
            labels = np.zeros((k,), np.int32)
            boxes[:n] = vr.boxes[order].float().numpy()
            scores[:n] = vr.scores[order].float().numpy()
            labels[:n] = vr.labels[order].numpy()
            put(i, f"det/{v}/boxes", boxes)
            put(i, f"det/{v}/scores", scores)
            put(i, f"det/{v}/labels", labels)
            put(i, f"det/{v}/count", np.int32(n))
            put(i, f"area_ratio/{v}", np.float32(area_ratio(vr.boxes, vr.scores, r.size, thr)))
        if "me" in a["views"]:
            if r.enhance is None:
                raise ValueError(f"image {i}: the store has an 'me' view but no enhancement params")
            put(i, "enhance/params", np.asarray(r.enhance["params"], dtype=np.float64))
            put(i, "enhance/checksum", np.uint64(r.enhance["checksum"]))
        if "adv" in a["views"]:
            put(i, "adv/checksum", np.uint64(r.adv["checksum"]))
        put(i, "done", np.uint8(schema.DONE_OK))  # written last, with its block
        self._finished_one(i)

    def write(self, r: ImageResult) -> None:
        """Write everything for one image, then its completion marker (synchronously)."""
        self.finish(r, self.write_chunks(r))
        self.flush()

    def _put(self, i: int, name: str, row: Any) -> None:
        self._rows.setdefault(i // self.block, {}).setdefault(name, {})[i] = np.asarray(row)

    def _finished_one(self, i: int) -> None:
        b = i // self.block
        self._finished[b] = self._finished.get(b, 0) + 1
        if self._finished[b] >= self._expected.get(b, self.block + 1):
            self._flush_block(b)
        if time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write every buffered block (partial ones merged with what the store holds)."""
        for b in sorted(self._rows):
            self._flush_block(b)
        self._last_flush = time.monotonic()

    def _flush_block(self, b: int) -> None:
        """Write block ``b``'s buffered rows, one chunk per array, the markers last."""
        buffered = self._rows.pop(b, None)
        if not buffered:
            return
        b0, b1 = b * self.block, min((b + 1) * self.block, self.n)
        names = sorted(buffered, key=lambda n: n == "done")  # the markers last
        fast: list[tuple[RowCodec, int, np.ndarray]] = []
        for name in names:
            arr, rows = self._a(name), buffered[name]
            if len(rows) == b1 - b0:  # every row of the block is new: no read needed
                block = np.zeros((b1 - b0, *arr.shape[1:]), dtype=arr.dtype)
            else:  # rows from an earlier run (or a partial flush) stay
                block = np.asarray(arr[b0:b1]).copy()
            for i, row in rows.items():
                block[i - b0] = row
            codec = self._codec(name)
            if codec is None or codec.chunk[0] != self.block:
                arr[b0:b1] = block
                continue
            if b1 - b0 < self.block:  # the last block: zarr stores edge chunks whole, padded
                pad = np.zeros((self.block - (b1 - b0), *arr.shape[1:]), dtype=arr.dtype)
                block = np.concatenate([block, pad])
            if name == "done":  # after every other chunk of the block is on disk
                put_chunks(self.group.store, fast)
                fast = []
            fast.append((codec, b0, block))
        if fast:
            put_chunks(self.group.store, fast)


class BackgroundWriter:
    """Background writing: ``threads`` chunk writers feed one finisher thread.

    Chunk writers quantise/compress/write each image's own chunks in parallel (Zstd/Blosc and
    numpy release the GIL); the finisher writes the small rows and the completion marker in
    one thread. ``submit`` blocks only when ``maxsize`` results wait; an exception in any
    thread is re-raised in the caller at the next ``submit`` or at ``close``.
    """

    def __init__(
        self, writer: StoreWriter, maxsize: int = 8, on_written: Any = None, threads: int = 2
    ):
        self.writer = writer
        self.on_written = on_written
        self._q: queue.Queue = queue.Queue(maxsize=maxsize)
        self._fin: queue.Queue = queue.Queue(maxsize=maxsize)
        self._error: BaseException | None = None
        self._raised = False
        self.wait_s = 0.0  # caller's seconds blocked: a full queue in submit, the drain in close
        self.cpu_s = 0.0  # CPU seconds of the writer threads' work (``time.thread_time``)
        self._cpu_lock = threading.Lock()
        self._workers = [
            threading.Thread(target=self._chunks, name=f"dfmsd-store-chunks-{k}", daemon=True)
            for k in range(max(1, threads))
        ]
        self._finisher = threading.Thread(target=self._finish, name="dfmsd-store-fin", daemon=True)
        for t in self._workers + [self._finisher]:
            t.start()

    def _chunks(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            rows = None
            c0 = time.thread_time()
            try:
                if self._error is None and not isinstance(item, int):
                    rows = self.writer.write_chunks(item)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self._error = exc
            self._count_cpu(time.thread_time() - c0)
            self._fin.put((item, rows))

    def _count_cpu(self, seconds: float) -> None:
        with self._cpu_lock:
            self.cpu_s += seconds

    def _finish(self) -> None:
        while True:
            got = self._fin.get()
            if got is None:
                return
            item, rows = got
            c0 = time.thread_time()
            try:
                if self._error is None:
                    if isinstance(item, int):
                        self.writer.mark_unreadable(item)
                    else:
                        self.writer.finish(item, rows)
                    if self.on_written is not None:
                        self.on_written(item)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self._error = exc
            self._count_cpu(time.thread_time() - c0)

    def _raise(self) -> None:
        if self._error is not None and not self._raised:
            self._raised = True
            raise self._error

    def submit(self, item: ImageResult | int) -> None:
        """Queue an ImageResult, or an int index to mark as an unreadable image."""
        self._raise()
        t0 = time.perf_counter()
        self._q.put(item)
        self.wait_s += time.perf_counter() - t0

    def close(self) -> None:
        """Wait for every queued write, stop the threads, re-raise a writer error."""
        t0 = time.perf_counter()
        for _ in self._workers:
            self._q.put(None)
        for t in self._workers:
            t.join()
        self._fin.put(None)
        self._finisher.join()
        try:  # the buffered blocks of every image that finished (also after an error)
            self.writer.flush()
        except BaseException as exc:  # noqa: BLE001 - the first error is the one to report
            if self._error is None:
                self._error = exc
        self.wait_s += time.perf_counter() - t0
        self._raise()
