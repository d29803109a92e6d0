"""Reading the teacher-feature store: ``TeacherStore`` and ``collate_teacher`` (the distill API).

::

    store = TeacherStore.open("cache/retina_r50/train2017.zarr")
    store.meta.teacher, store.meta.strides, store.meta.views, store.meta.image_ids, ...
    t = store.get(index, "orig")          # one image, one view
    t["features"][8]     -> float32 (C, h_8, w_8)   un-transposed, the image's own padded size
    t["valid"][8]        -> (h_8, w_8) = (ceil(H/8), ceil(W/8)), (H, W) = own padded size
    t["att_spatial"][8]  -> float32 (h_8, w_8)  mean_c |F|       (raw, no softmax/temperature)
    t["att_channel"][8]  -> float32 (C,)        mean_{h,w} |F|   over the valid positions
    t["boxes"] (k,4) xyxy, t["scores"] (k,), t["labels"] (k,) 1..K: top-K teacher detections
    t["logits"][8]       -> float32 (A·K, h_8, w_8) class logits ({} unless --store-logits)
    t["area_ratio"]      -> float, t["enhance"] -> dict for the "me" view, else None
    view = collate_teacher([t0, t1, ...], batch_hw=(H, W))    # the student's padded batch size
    view.features[8] -> (B, C, ceil(H/8), ceil(W/8)) zero-padded; view.valid[8] -> bool
    (a ``TeacherView``, dfmsd_cli.store.batch: the typed batch the losses read)

Exactness: each image's maps are the teacher's output at the image's own padded size (precompute
batches only images of equal padded shape). In a student batch padded to a larger (H, W) the
teacher maps are zero-padded and ``valid`` marks where teacher features exist; losses should
only count valid positions.

The store opens lazily: a ``TeacherStore`` pickles as its path, so DataLoader workers (fork,
spawn or forkserver) each open their own handle on first use; fsspec URLs work where the
backend (e.g. s3fs) is installed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr

from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.errors import UserError, suggest
from dfmsd_cli.store import schema
from dfmsd_cli.store.batch import TeacherBatch, TeacherView, collate_teacher
from dfmsd_cli.store.chunks import LocalChunkCache, RowCodec
from dfmsd_cli.store.gather import GatherMixin
from dfmsd_cli.store.integrity import ChunkGuard, corrupt, is_checksum_error
from dfmsd_cli.store.pca import reconstruct, split_basis
from dfmsd_cli.store.quantize import dequantize_uint8, from_bfloat16
from dfmsd_cli.store.remote import concurrency_default, is_remote, open_zarr_store, remote_errors

ENHANCE_KINDS = {0: "none", 1: "noise", 2: "crop"}
_DET = ("boxes", "scores", "labels")
_ENHANCE = ("params", "checksum")


def _enhance(got: dict[str, np.ndarray]) -> dict:
    """The stored ME choice from its gathered ``enhance/*`` rows (``dfmsd_cli.data.enhance``)."""
    from dfmsd_cli.data.enhance import EnhanceParams

    p = np.asarray(got["enhance/params"], dtype=np.float64)
    return EnhanceParams.from_array(p, int(got["enhance/checksum"])).to_dict()


@dataclass
class StoreMeta:
    """The store's attributes, typed. ``attrs`` is the raw attribute dict."""

    path: str
    teacher: str
    split: str
    num_images: int
    geometry: Geometry
    strides: tuple[int, ...]
    channels: int
    views: tuple[str, ...]
    dtype: str
    topk: int
    score_thr: float
    block: int
    enhance: dict | None
    num_classes: int
    fingerprints: dict[str, str]
    logits: dict | None  # {dtype, anchors, classes, kind}: stored class logits, else None
    pca: dict | None  # --pca: {components, fit_images, levels: {s: energy}}, else None
    image_ids: list[int] = field(repr=False)
    attrs: dict = field(repr=False)


def open_group(
    path: str | os.PathLike,
    mode: str = "r",
    guard: ChunkGuard | None = None,
    concurrency: int | None = None,
) -> zarr.Group:
    """Open a store group with a clear error when ``path`` holds none.

    With ``guard``, reads go through that :class:`ChunkGuard` (created around zarr's own store
    for ``path``), which records the chunks a read did not find. A URL is opened through
    ``store/remote.py`` (one-line errors for a missing backend, bucket, credentials or endpoint;
    ``concurrency`` bounds its requests in flight).
    """
    path = str(path)
    try:
        if is_remote(path):
            with remote_errors(path):
                group = zarr.open_group(store=open_zarr_store(path, mode, concurrency), mode=mode)
        else:
            group = zarr.open_group(path, mode=mode)
        if guard is not None:
            guard._store = group.store
            group = zarr.open_group(store=guard, mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        from dfmsd_cli.store.guard import incomplete_store_error

        incomplete = incomplete_store_error(path)
        if incomplete is not None:
            raise incomplete from exc
        raise UserError(
            f"no teacher store at {path}: run 'dfmsd precompute' for this teacher and split first"
        ) from exc
    if schema.ATTR_KEY not in dict(group.attrs):
        raise UserError(f"{path} is not a dfmsd teacher store (no '{schema.ATTR_KEY}' attribute)")
    return group


def local_copy_dir(cache_local: str | os.PathLike | bool | None, remote: bool) -> str | None:
    """The read-through copy folder of a store: ``cache_local``, else ``DFMSD_CACHE_LOCAL``;
    none for a local store, and none for ``False`` (``cache verify``/``--repair`` must read
    what the server holds, never a copy of it)."""
    if cache_local is False or not remote:
        return None
    chosen = cache_local or os.environ.get("DFMSD_CACHE_LOCAL")
    return str(chosen) if chosen else None


class TeacherStore(GatherMixin):
    """Read access to one teacher's store (one split). Pickles as its path (lazy reopen)."""

    def __init__(
        self,
        path: str | os.PathLike,
        mode: str = "r",
        concurrency: int | None = None,
        cache_local: str | os.PathLike | bool | None = None,
    ):
        self.path = str(path)
        self.mode = mode
        remote = is_remote(self.path)
        # object storage: requests in flight bounded, final chunks copied to a local folder
        self.concurrency = (concurrency or concurrency_default()) if remote else None
        self.cache_local = local_copy_dir(cache_local, remote)
        self._group: zarr.Group | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._small: dict[str, np.ndarray] | None = None
        self._guard: ChunkGuard | None = None
        self._codecs: dict[str, RowCodec | None] = {}
        self._local_cache: LocalChunkCache | None = None
        self._pca: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # --pca: stride -> (μ, W)
        self._pid = os.getpid()
        a = dict(self.group.attrs)[schema.ATTR_KEY]
        if a.get("schema_version") not in schema.READABLE_VERSIONS:
            raise UserError(
                f"store {self.path} has schema version {a.get('schema_version')}, this dfmsd "
                f"reads {list(schema.READABLE_VERSIONS)}: precompute it again with this version"
            )
        # v2+: crc32c on every chunk and every chunk written, so absence is corruption
        self.checksummed = int(a["schema_version"]) >= schema.CHECKSUMMED_SINCE
        self.meta = StoreMeta(
            path=self.path,
            teacher=a["teacher"],
            split=a["dataset"]["split"],
            num_images=int(a["dataset"]["num_images"]),
            geometry=Geometry.from_dict(a["geometry"]),
            strides=tuple(int(s) for s in a["strides"]),
            channels=int(a["channels"]),
            views=tuple(a["views"]),
            dtype=a["dtype"],
            topk=int(a["topk"]),
            score_thr=float(a["score_thr"]),
            block=int(a["block"]),
            enhance=a.get("enhance"),
            num_classes=int(a.get("num_classes", 0)),
            logits=a.get("logits"),  # stores before --store-logits have no such attribute
            pca=a.get("pca") if a.get("pca_components") else None,  # absent in older stores
            fingerprints={
                "weights_sha256": a["weights"]["sha256"],
                "ann_sha256": a["dataset"]["ann_sha256"],
                "image_ids_sha256": a["dataset"]["image_ids_sha256"],
            },
            image_ids=[int(x) for x in self._array("image_ids")[:]],
            attrs=a,
        )

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        mode: str = "r",
        concurrency: int | None = None,
        cache_local: str | os.PathLike | bool | None = None,
    ) -> TeacherStore:
        """Open the store at ``path``. On object storage ``concurrency`` bounds the requests in
        flight (default ``DFMSD_STORE_CONCURRENCY`` or 64) and ``cache_local`` (default
        ``DFMSD_CACHE_LOCAL``) is a folder keeping a read-through copy of the chunks read;
        ``False`` never keeps one (what ``cache verify`` and ``--repair`` use)."""
        return cls(path, mode, concurrency, cache_local)

    # -- lazy handles (re-created in each worker process after unpickling)
    @property
    def group(self) -> zarr.Group:
        if self._group is not None and self._pid != os.getpid():
            self._forked()
        if self._group is None:
            self._guard = ChunkGuard(None)
            self._group = open_group(self.path, self.mode, self._guard, self.concurrency)
            self._pid = os.getpid()
        return self._group

    def _forked(self) -> None:
        """In a forked child (a DataLoader worker under fork) an object-storage client of the
        parent is bound to the parent's event loop: drop the handles, reopen on next use."""
        if self._pid != os.getpid():
            self._group, self._guard, self._arrays, self._local_cache = None, None, {}, None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(
            _group=None, _guard=None, _arrays={}, _codecs={}, _small=None, _local_cache=None
        )
        return state

    def _read(self, name: str, sel: Any, where: str) -> np.ndarray:
        """``array[sel]`` as numpy; a checksum mismatch becomes a one-line StoreCorrupt."""
        try:
            return np.asarray(self._array(name)[sel])
        except ValueError as exc:
            if is_checksum_error(exc):
                raise corrupt(self.path, where, f"chunk of '{name}' fails its crc32c") from exc
            raise

    def _check_missing(self, where: str, blocks: np.ndarray | None = None) -> None:
        """Raise if a read since the last check met an absent chunk of a complete image.

        ``blocks`` (small-array reads of every image): only chunks of blocks that hold a
        complete image count; pending blocks were simply never written.
        """
        lost = self._guard.take() if self._guard is not None else []
        if not self.checksummed:
            return  # v1 stores skipped all-zero chunks: absence proves nothing there
        for array, coords in lost:
            if blocks is not None and not blocks[coords[0]]:
                continue
            raise corrupt(self.path, where, f"chunk {coords} of '{array}' is missing")

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            try:
                self._arrays[name] = self.group[name]
            except (KeyError, FileNotFoundError) as exc:
                raise self._gone(f"its array '{name}' is missing") from exc
        return self._arrays[name]

    def _gone(self, what: str) -> UserError:
        return UserError(
            f"teacher store {self.path} is incomplete or was deleted while in use ({what}): "
            "re-run 'dfmsd precompute' for it (it resumes, or rebuilds a deleted store), then "
            "run this command again (--resume continues a run)"
        )

    def _check_present(self) -> None:
        """A local store deleted or emptied while in use reads as fill values (zeros) from
        arrays already open; one stat per image catches that before any zero is returned."""
        if "://" not in self.path and not os.path.isfile(os.path.join(self.path, "zarr.json")):
            raise self._gone("its zarr.json metadata is gone")

    def __len__(self) -> int:
        return self.meta.num_images

    # -- small per-image arrays, loaded once per process
    def small(self) -> dict[str, np.ndarray]:
        if self._small is None:
            self._forked()
            names = ["done", "pad_size", "size", "transposed"] + [
                f"valid/{s}" for s in self.meta.strides
            ]
            if self._guard is not None:
                self._guard.take()
            small = {n: self._read(n, slice(None), "the per-image arrays") for n in names}
            b = self.meta.block
            ok = small["done"] == schema.DONE_OK
            blocks = np.zeros(-(-len(ok) // b) + 1, dtype=bool)
            blocks[np.flatnonzero(ok) // b] = True
            where = "the per-image arrays (a block with complete images)"
            self._check_missing(where, blocks)
            self._small = small
        return self._small

    def refresh(self) -> None:
        """Forget cached markers and sizes (another process may have written more images)."""
        self._small = None

    def done(self) -> np.ndarray:
        """(N,) uint8 completion markers: 0 pending, 1 complete, 2 unreadable image."""
        return self.small()["done"]

    def complete_indices(self) -> np.ndarray:
        return np.flatnonzero(self.done() == schema.DONE_OK)

    def check(self, **wanted: Any) -> None:
        """Raise a UserError naming every difference between the store and what a caller needs.

        Keys: ``image_ids``, ``ann_sha256``, ``geometry`` (Geometry or dict), ``weights_sha256``,
        ``strides`` (the store must hold all of them), ``views`` (likewise), ``split``, ``teacher``.
        """
        diffs: list[str] = []
        exp: dict = {}
        if "image_ids" in wanted:
            exp.setdefault("dataset", {})["image_ids_sha256"] = schema.image_ids_sha256(
                wanted["image_ids"]
            )
            exp["dataset"]["num_images"] = len(wanted["image_ids"])
        if "ann_sha256" in wanted:
            exp.setdefault("dataset", {})["ann_sha256"] = wanted["ann_sha256"]
        if "split" in wanted:
            exp.setdefault("dataset", {})["split"] = wanted["split"]
        if "geometry" in wanted:
            g = wanted["geometry"]
            exp["geometry"] = g.to_dict() if isinstance(g, Geometry) else dict(g)
        if "weights_sha256" in wanted:
            exp["weights"] = {"sha256": wanted["weights_sha256"]}
        if "teacher" in wanted:
            exp["teacher"] = wanted["teacher"]
        diffs += schema.diff_attrs(self.meta.attrs, exp)
        for key, have in (("strides", self.meta.strides), ("views", self.meta.views)):
            missing = [x for x in wanted.get(key, ()) if x not in have]
            if missing:
                diffs.append(f"{key} {missing} not in the store (it has {list(have)})")
        if diffs:
            raise UserError(
                f"teacher store {self.path} does not match ({'; '.join(diffs)}): precompute "
                "the teacher for this dataset/geometry/weights, or point --cache at the right store"
            )

    # -- one image, or many in one round trip
    def get(
        self, index: int, view: str = "orig", strides: tuple[int, ...] | None = None
    ) -> dict[str, Any]:
        """Everything the store holds for image ``index`` and ``view`` (see the module doc)."""
        return self.get_many([(index, view)], strides)[0]

    def get_many(
        self, items: list[tuple[int, str]], strides: tuple[int, ...] | None = None
    ) -> list[dict[str, Any]]:
        """``[get(i, view) for i, view in items]`` with every chunk of every item requested
        in ONE round trip (a batch on object storage costs one request latency, not B)."""
        if self.concurrency is not None:  # object storage: a forked worker reopens
            self._forked()
        self._check_present()
        plans = [self._plan(int(i), v, strides) for i, v in items]
        flat = [(name, sel, where) for reads, _ in plans for name, (sel, where) in reads.items()]
        got = self._gather_list(flat)
        out, k = [], 0
        for reads, ctx in plans:
            out.append(self._assemble(dict(zip(reads, got[k : k + len(reads)], strict=True)), ctx))
            k += len(reads)
        self._check_present()  # deleted during this read: some chunks read as zeros
        return out

    def _plan(self, index: int, view: str, strides: tuple[int, ...] | None) -> tuple[dict, dict]:
        """The reads of one (image, view): ``{name: (sel, where)}`` and what assembling needs."""
        m = self.meta
        if view not in m.views:
            raise UserError(
                f"view '{view}' is not in store {self.path} (views: {', '.join(m.views)})"
                f"{suggest(view, m.views)}: precompute it with --views"
            )
        sm = self.small()
        if sm["done"][index] != schema.DONE_OK:
            self.refresh()
            sm = self.small()
            if sm["done"][index] != schema.DONE_OK:
                raise UserError(
                    f"image {m.image_ids[index]} (index {index}) is not complete in store "
                    f"{self.path}: finish it with 'dfmsd precompute' (it resumes)"
                )
        transposed = bool(sm["transposed"][index])
        image = f"image {m.image_ids[index]} (index {index}) view {view}"
        # Every read of the sample first, then ONE event-loop round trip for all of them
        # (zarr's sync bridge costs ~1 ms per call; a sample needs ~40 arrays).
        reads: dict[str, tuple[Any, str]] = {}
        shapes = {}
        for s in strides or m.strides:
            where = f"{image} stride {s}"
            h, w = (int(x) for x in sm[f"valid/{s}"][index])
            sh, sw = (w, h) if transposed else (h, w)
            shapes[s] = (h, w)
            reads[f"feat/{view}/{s}"] = ((index, slice(None), slice(sh), slice(sw)), where)
            reads[f"att_s/{view}/{s}"] = ((index, slice(sh), slice(sw)), where)
            reads[f"att_c/{view}/{s}"] = (index, where)
            if m.dtype == "uint8":
                reads[f"qparams/{view}/{s}"] = (index, where)
            if m.logits:
                reads[f"logits/{view}/{s}"] = ((index, slice(None), slice(sh), slice(sw)), where)
        where = f"{image} (detections)"
        # whole rows (K entries): an empty slice would not even fetch a lost chunk
        for k in ("count", *_DET):
            reads[f"det/{view}/{k}"] = (index, where)
        reads[f"area_ratio/{view}"] = (index, where)
        if view == "me":
            for k in _ENHANCE:
                reads[f"enhance/{k}"] = (index, where)
        if view == "adv":  # the perturbation at the resized image size (stored like a map)
            h, w = (int(x) for x in sm["size"][index])
            sh, sw = (w, h) if transposed else (h, w)
            reads["adv/delta"] = ((index, slice(None), slice(sh), slice(sw)), f"{image} (δ)")
            reads["adv/checksum"] = (index, f"{image} (δ)")
        ctx = {"index": index, "view": view, "transposed": transposed, "shapes": shapes}
        return reads, ctx

    def _assemble(self, got: dict[str, np.ndarray], ctx: dict) -> dict[str, Any]:
        """The sample dict (module doc) from its gathered reads."""
        m, sm = self.meta, self.small()
        index, view, transposed = ctx["index"], ctx["view"], ctx["transposed"]
        feats, att_s, att_c, valid, logits = {}, {}, {}, {}, {}
        for s, (h, w) in ctx["shapes"].items():
            raw = got[f"feat/{view}/{s}"]
            if m.dtype == "uint8":
                f = dequantize_uint8(raw, got[f"qparams/{view}/{s}"])
            elif m.dtype == "bfloat16":
                f = from_bfloat16(raw)
            else:
                f = torch.from_numpy(raw.astype(np.float32, copy=False))
            if m.pca:  # K stored components -> the C channels every consumer expects
                f = reconstruct(f, *self.pca_basis(s))
            sp = torch.from_numpy(got[f"att_s/{view}/{s}"])
            if transposed:
                f, sp = f.transpose(-1, -2), sp.transpose(-1, -2)
            feats[s], att_s[s], valid[s] = f.contiguous(), sp.contiguous(), (h, w)
            att_c[s] = torch.from_numpy(got[f"att_c/{view}/{s}"])
            if m.logits:
                z = torch.from_numpy(got[f"logits/{view}/{s}"].astype(np.float32))
                logits[s] = (z.transpose(-1, -2) if transposed else z).contiguous()
        n = int(got[f"det/{view}/count"])
        det = {k: got[f"det/{view}/{k}"][:n] for k in _DET}
        enhance = _enhance(got) if view == "me" else None
        adversarial = None
        if view == "adv":
            delta = torch.from_numpy(got["adv/delta"])
            delta = delta.transpose(-1, -2) if transposed else delta
            adversarial = {"delta": delta.contiguous(), "checksum": int(got["adv/checksum"])}
        out: dict[str, Any] = {
            "index": int(index),
            "image_id": m.image_ids[index],
            "view": view,
            "size": tuple(int(x) for x in sm["size"][index]),
            "pad_size": tuple(int(x) for x in sm["pad_size"][index]),
            "features": feats,
            "valid": valid,
            "att_spatial": att_s,
            "att_channel": att_c,
            "boxes": torch.from_numpy(det["boxes"]),
            "scores": torch.from_numpy(det["scores"]),
            "labels": torch.from_numpy(det["labels"].astype(np.int64)),
            "area_ratio": float(got[f"area_ratio/{view}"]),
            "enhance": enhance,
            "adversarial": adversarial,
            "logits": logits,  # {} when the store has none
        }
        return out

    def pca_basis(self, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ (C,), W (K, C)) of a ``--pca`` store's level (store/pca.py), read once."""
        if stride not in self._pca:
            where = f"the channel projection of stride {stride}"
            self._pca[stride] = split_basis(self._read(f"pca/{stride}", slice(None), where))
        return self._pca[stride]

    def enhance_params(self, index: int) -> dict:
        """The stored ME choice of image ``index`` (see ``dfmsd_cli.data.enhance``)."""
        where = f"image {self.meta.image_ids[index]} (index {index}) view me"
        return _enhance(self._gather({f"enhance/{k}": (index, where) for k in _ENHANCE}))

    def area_ratios(self, view: str = "orig") -> np.ndarray:
        """(N,) candidate-box area ratios of every image (what ``--enhance-from`` reads)."""
        return np.asarray(self._array(f"area_ratio/{view}")[:], dtype=np.float32)


__all__ = [
    "StoreMeta",
    "TeacherBatch",
    "TeacherStore",
    "TeacherView",
    "collate_teacher",
    "open_group",
]
