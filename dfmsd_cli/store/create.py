"""Creating (or opening) a teacher store: its spec, its arrays and codecs, atomically.

Creation pre-allocates every array at its final size N and writes the attributes once; writers
never resize or rewrite metadata, so several processes (``--shard I/N``, torchrun ranks) can
write disjoint block-aligned index ranges of one store concurrently. A local store is built in
a temporary folder and renamed into place, so two processes starting together agree on one
store (the loser opens the winner's and checks its fingerprints). Every array carries crc32c
last in its codec chain (``store/integrity.py``).
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.abc.codec import ArrayBytesCodec
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from dfmsd_cli.errors import UserError
from dfmsd_cli.store import schema
from dfmsd_cli.store.chunks import require_pcodec
from dfmsd_cli.store.guard import GuardedLocalStore, incomplete_store_error
from dfmsd_cli.store.remote import is_remote, open_zarr_store, remote_errors

ZSTD_LEVEL = 3
PCODEC_LEVEL = 8  # pcodec's own default (our choice: docs/store.md measures it)
CODECS = ("zstd", "blosc", "pcodec")
# Every chunk is written, zeros too: a chunk absent while its image is complete is then a
# fault the reader can name (zarr would return the fill value for it in silence).
WRITE_CONFIG = {"write_empty_chunks": True}


def storage_dtype(dtype: str) -> str:
    """The zarr dtype of a feature encoding (zarr has no bfloat16: its bits as uint16)."""
    return "uint16" if dtype == "bfloat16" else dtype


# Blosc block size of the feature chunks (our choice): 256 KiB blocks instead of Blosc's own
# choice for zstd (smaller) give 1.5-7 % smaller real-image r50 chunks at the same encode speed
# and faster decoding (docs/store.md, "Blosc block size"). Stores written before keep theirs.
BLOSC_BLOCKSIZE = 1 << 18


def feature_codec(name: str, dtype: str):
    """Compressor of the feature-like arrays (``feat``, ``att_s``).

    ``zstd``: ZstdCodec(level=3). ``blosc``: Blosc-zstd level 3 with a byte shuffle (floats;
    a bit shuffle for uint8), which groups the exponent bytes of neighbouring values, in
    ``BLOSC_BLOCKSIZE`` blocks — measured on real-image r50 features in docs/store.md.
    ``pcodec``: PCodec level 8 (pcodec, a codec for numerical sequences; zarr's numcodecs
    wrapper): an array-to-bytes codec that replaces zarr's ``bytes`` serializer, 8 % smaller
    than blosc on real-image bfloat16 features and as large on float16 (docs/store.md). It
    refuses 8-bit values (``--dtype uint8``) and needs the optional ``pcodec`` package.
    """
    if name == "zstd":
        return ZstdCodec(level=ZSTD_LEVEL)
    if name == "blosc":
        shuffle = "bitshuffle" if dtype == "uint8" else "shuffle"
        return BloscCodec(
            cname="zstd", clevel=ZSTD_LEVEL, shuffle=shuffle, blocksize=BLOSC_BLOCKSIZE
        )
    if name == "pcodec":
        if dtype == "uint8":
            raise UserError(
                "--codec pcodec does not take --dtype uint8 (PCodec refuses 8-bit values): "
                "use --codec blosc with uint8, or a float --dtype with pcodec"
            )
        return pcodec_codec(PCODEC_LEVEL)
    raise UserError(f"unknown --codec '{name}': use one of {', '.join(CODECS)}")


def pcodec_codec(level: int):
    """zarr's PCodec array-to-bytes codec (the ``pcodec`` package must be installed). zarr's
    "numcodecs codecs are not in the zarr v3 specification" warning is silenced once, in
    ``dfmsd_cli/store/__init__.py``."""
    require_pcodec("--codec pcodec")
    try:
        from zarr.codecs.numcodecs import PCodec  # zarr >= 3.1.3
    except ImportError:  # pragma: no cover - older zarr
        from numcodecs.zarr3 import PCodec
    return PCodec(level=level)


@dataclass
class StoreSpec:
    """Everything that defines a store; ``attrs()`` turns it into the group attribute."""

    teacher: str
    num_classes: int
    weights_sha256: str
    split: str
    ann_sha256: str
    image_ids: list[int]
    geometry: dict
    strides: list[int]
    channels: int
    dtype: str = "float16"
    views: list[str] = field(default_factory=lambda: ["orig"])
    block: int = 64
    topk: int = 100
    score_thr: float = 0.3
    enhance: dict | None = None
    adv: dict | None = None  # AdvConfig.to_dict() when the store has the 'adv' view
    codec: str = "blosc"
    weights_path: str | None = None
    categories: list[dict] | None = None
    keepbits: int | None = None
    logits: dict | None = None  # {dtype, anchors, classes, kind} with --store-logits
    pca: dict | None = None  # --pca: {components, fit_images, fit_views, levels: {s: energy}}
    pca_basis: dict[int, np.ndarray] | None = None  # {stride: (K+1, C) [μ; W]}, at creation

    def attrs(self) -> dict:
        from dfmsd_cli import __version__

        g = self.geometry
        long_max, short_max = g["img_scale"]
        div = g["pad_divisor"]
        canvas = [-(-long_max // div) * div, -(-short_max // div) * div]
        if self.dtype == "uint8":
            quant = {"kind": "uint8-affine", "per": "image,channel", "params": "qparams"}
        elif self.dtype == "bfloat16":
            quant = {"kind": "bfloat16", "note": "upper 16 bits of float32, stored as uint16"}
        elif self.dtype == "float32":
            quant = {"kind": "float32", "note": "the teacher's values (lossless)"}
        else:
            quant = {"kind": "float16", "note": "cast after a |x| <= 65504 and finiteness check"}
        if self.keepbits is not None:
            quant["keepbits"] = int(self.keepbits)  # numcodecs BitRound before compression
        return {
            "schema_version": schema.SCHEMA_VERSION,
            "teacher": self.teacher,
            "num_classes": int(self.num_classes),
            "categories": self.categories,
            "weights": {"path": self.weights_path, "sha256": self.weights_sha256},
            "dataset": {
                "split": self.split,
                "ann_sha256": self.ann_sha256,
                "image_ids_sha256": schema.image_ids_sha256(self.image_ids),
                "num_images": len(self.image_ids),
            },
            "geometry": g,
            "canvas": canvas,
            "strides": [int(s) for s in self.strides],
            "channels": int(self.channels),
            "level_shapes": {
                str(s): list(schema.level_shape((canvas[0], canvas[1]), s)) for s in self.strides
            },
            "dtype": self.dtype,
            "quantization": quant,
            "codec": {"name": self.codec, "level": ZSTD_LEVEL, "checksum": "crc32c"},
            "views": list(self.views),
            "block": int(self.block),
            "topk": int(self.topk),
            "score_thr": float(self.score_thr),
            "enhance": self.enhance,
            "adv": self.adv,
            "logits": self.logits,
            # per-level channel projection (store/pca.py); None: full channels
            "pca_components": int(self.pca["components"]) if self.pca else None,
            "pca": self.pca,
            "dfmsd_version": __version__,
            "torch": torch.__version__,
            "zarr": zarr.__version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }


def _is_remote(path: str) -> bool:
    return is_remote(path)


def store_exists(path: str | os.PathLike) -> bool:
    """Whether a store is at ``path``. On object storage a missing bucket, refused credentials
    or an unreachable endpoint are one-line errors (``store/remote.py``), not "no store"."""
    if _is_remote(str(path)):
        store = open_zarr_store(str(path), "r")
        with remote_errors(str(path)):
            try:
                zarr.open_group(store=store, mode="r")
                return True
            except (FileNotFoundError, zarr.errors.GroupNotFoundError):
                return False
    return (Path(path) / "zarr.json").is_file()


# The per-image arrays' chunk keys (zarr v3 "default" encoding with "." as separator): a new
# image's chunk is one file in the array's folder. Stores written before keep "/" and read as
# before (the encoding is each array's metadata).
FLAT_KEYS = {"name": "default", "separator": "."}


def _allocate(
    group: zarr.Group, a: dict, image_ids: list[int], pca_basis: dict | None = None
) -> None:
    """Create every array at its final size; write image_ids (and the ``--pca`` basis)."""
    n, c, b, k = len(image_ids), a["channels"], a["block"], a["topk"]
    kp = a.get("pca_components")
    if kp and (pca_basis is None or sorted(pca_basis) != sorted(a["strides"])):
        raise ValueError("a --pca store is created with its basis for every level")
    cf = int(kp) if kp else c  # stored feature channels: K components or the C channels
    zstd = ZstdCodec(level=ZSTD_LEVEL)
    big = feature_codec(a["codec"]["name"], a["dtype"])
    big32 = feature_codec(a["codec"]["name"], "float32")
    checked = int(a["schema_version"]) >= schema.CHECKSUMMED_SINCE

    def arr(name: str, shape: tuple, chunks: tuple, dtype: str, comp=zstd) -> zarr.Array:
        # crc32c last: zarr checks every chunk it decodes against it (store/integrity.py).
        # One image per chunk: keys "c.I.0.0.0", all in the array's folder, instead of the
        # nested "c/I/0/0/0" that costs three new folders per chunk (FLAT_KEYS, docs/store.md)
        flat = chunks[0] == 1 and len(shape) > 1
        if isinstance(comp, ArrayBytesCodec):  # pcodec: serializes the array itself
            codecs = {"serializer": comp, "compressors": [Crc32cCodec()] if checked else None}
        else:
            codecs = {"compressors": [comp, Crc32cCodec()] if checked else comp}
        return group.create_array(
            name,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            fill_value=0,
            config=WRITE_CONFIG,
            chunk_key_encoding=FLAT_KEYS if flat else None,
            **codecs,
        )

    ids = arr("image_ids", (n,), (max(1, min(n, 1 << 16)),), "int64")
    ids[:] = np.asarray(image_ids, dtype=np.int64)
    arr("done", (n,), (b,), "uint8")
    arr("pad_size", (n, 2), (b, 2), "int32")
    arr("size", (n, 2), (b, 2), "int32")
    arr("transposed", (n,), (b,), "bool")
    for s in a["strides"]:
        hc, wc = a["level_shapes"][str(s)]
        arr(f"valid/{s}", (n, 2), (b, 2), "int32")
        if kp:  # row 0 = μ, rows 1..K = W (store/pca.py), one crc-checked chunk
            arr(f"pca/{s}", (kp + 1, c), (kp + 1, c), "float32")[:] = pca_basis[s]
        for v in a["views"]:
            dt = storage_dtype(a["dtype"])
            arr(f"feat/{v}/{s}", (n, cf, hc, wc), (1, cf, hc, wc), dt, big)
            if a["dtype"] == "uint8":
                arr(f"qparams/{v}/{s}", (n, cf, 2), (b, cf, 2), "float32")
            if kp:  # mean |z_k|, then Σ‖x − x̂‖², Σ‖x‖² (store/pca.py)
                arr(f"pca_stat/{v}/{s}", (n, kp + 2), (b, kp + 2), "float32")
            arr(f"att_s/{v}/{s}", (n, hc, wc), (1, hc, wc), "float32", big32)
            arr(f"att_c/{v}/{s}", (n, c), (b, c), "float32")
            if a.get("logits"):  # one image per chunk, like feat; float16 (docs/store.md)
                ak = int(a["logits"]["anchors"]) * int(a["logits"]["classes"])
                lg = feature_codec(a["codec"]["name"], "float16")
                arr(f"logits/{v}/{s}", (n, ak, hc, wc), (1, ak, hc, wc), "float16", lg)
    for v in a["views"]:
        arr(f"det/{v}/boxes", (n, k, 4), (b, k, 4), "float32")
        arr(f"det/{v}/scores", (n, k), (b, k), "float32")
        arr(f"det/{v}/labels", (n, k), (b, k), "int32")
        arr(f"det/{v}/count", (n,), (b,), "int32")
        arr(f"area_ratio/{v}", (n,), (b,), "float32")
    if "me" in a["views"]:
        arr("enhance/params", (n, 7), (b, 7), "float64")
        arr("enhance/checksum", (n,), (b,), "uint64")
    if "adv" in a["views"]:  # δ of one image per chunk; ints in [-ε, ε] compress well
        hi, wi = schema.level_shape(tuple(a["canvas"]), 1)
        arr("adv/delta", (n, 3, hi, wi), (1, 3, hi, wi), "int8")
        arr("adv/checksum", (n,), (b,), "uint64")
    group.attrs[schema.ATTR_KEY] = a


def create_or_open(path: str | os.PathLike, spec: StoreSpec, fix: str) -> zarr.Group:
    """Open the store at ``path`` (checking its fingerprints against ``spec``) or create it.

    Creation of a local store is atomic (build in a temporary folder, then rename), so
    concurrent shard processes end with one store. ``fix`` completes the mismatch message.
    """
    path = str(path)
    wanted = spec.attrs()
    incomplete = incomplete_store_error(path)
    if incomplete is not None:  # never write into (or rename onto) a folder without metadata
        raise incomplete
    if not store_exists(path):
        if _is_remote(path):
            _create_remote(path, wanted, spec.image_ids, spec.pca_basis)
        else:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".{target.name}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                _allocate(
                    zarr.open_group(str(tmp), mode="w-"), wanted, spec.image_ids, spec.pca_basis
                )
                try:
                    os.rename(tmp, target)
                except OSError:  # another process created it first: use theirs
                    pass
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
    # a local store is written through the guard: a store deleted mid-run is never re-created
    if _is_remote(path):
        group, stored = _open_remote(path)
    else:
        group = zarr.open_group(GuardedLocalStore(path), mode="r+")
        stored = dict(group.attrs).get(schema.ATTR_KEY)
    if not isinstance(stored, dict):
        raise UserError(f"{path} is not a dfmsd teacher store: choose another --cache folder")
    schema.check_attrs(path, stored, wanted, fix)
    return group


_EXISTS = (
    FileExistsError,
    zarr.errors.ContainsGroupError,
    zarr.errors.ContainsArrayError,
    zarr.errors.ContainsArrayAndGroupError,
)
REMOTE_CREATE_WAIT = 120.0  # seconds a shard waits for another one's allocation to finish


def _create_remote(
    path: str, wanted: dict, image_ids: list[int], pca_basis: dict | None = None
) -> None:
    """Allocate a store on object storage. There is no atomic rename there: shards starting
    together may both allocate; every allocation writes the same metadata (the attributes,
    written last, differ only in ``created``), and one that finds an array already there
    leaves the rest to the process that made it (:func:`_open_remote` waits for it)."""
    with remote_errors(path):
        try:
            group = zarr.open_group(store=open_zarr_store(path, "w"), mode="w-")
            _allocate(group, wanted, image_ids, pca_basis)
        except _EXISTS:
            pass  # another shard is creating it


def _open_remote(path: str) -> tuple[zarr.Group, dict | None]:
    """Open an object-storage store for writing, waiting up to ``REMOTE_CREATE_WAIT`` s for
    its attributes while another process may still be allocating it."""
    deadline = time.monotonic() + REMOTE_CREATE_WAIT
    while True:
        with remote_errors(path):
            group = zarr.open_group(store=open_zarr_store(path, "w"), mode="r+")
        attrs = dict(group.attrs)
        stored = attrs.get(schema.ATTR_KEY)
        if attrs or time.monotonic() > deadline:  # no attributes at all: being allocated
            return group, stored
        time.sleep(0.5)
