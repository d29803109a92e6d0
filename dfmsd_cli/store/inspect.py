"""``dfmsd cache info`` / ``verify``: describe a teacher store and check it end to end.

``store_info`` reports teacher, split, views, levels, dtype, images done/total, bytes on disk,
bytes per image and the compression ratio (dense valid-region bytes of the complete images ÷
bytes on disk; the canvas zero padding is not counted as payload).

``verify_store`` returns a list of problems (empty = healthy):

* fingerprints against the dataset (annotation SHA-256, ordered image ids, geometry) and the
  teacher weights (state-dict SHA-256), when given;
* completion: images whose marker is missing (pending) — an interrupted precompute;
* every complete image is decoded: an undecodable chunk, NaN/inf, and a consistency check —
  the stored channel statistic mean_{h,w}|F| must match the decoded features within the
  dtype's tolerance, which catches a deleted or silently altered chunk too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfmsd_cli.store import schema
from dfmsd_cli.store.reader import TeacherStore


def _array_names(meta) -> list[str]:
    names = ["image_ids", "done", "pad_size", "size", "transposed"]
    for s in meta.strides:
        names.append(f"valid/{s}")
        for v in meta.views:
            names += [f"feat/{v}/{s}", f"att_s/{v}/{s}", f"att_c/{v}/{s}"]
            if meta.dtype == "uint8":
                names.append(f"qparams/{v}/{s}")
            if getattr(meta, "logits", None):
                names.append(f"logits/{v}/{s}")
            if getattr(meta, "pca", None):
                names.append(f"pca_stat/{v}/{s}")
        if getattr(meta, "pca", None):
            names.append(f"pca/{s}")
    for v in meta.views:
        names += [f"det/{v}/{k}" for k in ("boxes", "scores", "labels", "count")]
        names.append(f"area_ratio/{v}")
    if "me" in meta.views:
        names += ["enhance/params", "enhance/checksum"]
    if "adv" in meta.views:
        names += ["adv/delta", "adv/checksum"]
    return names


def store_info(path: str | Path) -> dict[str, Any]:
    """Summary of a store (see the module docstring); sizes via zarr, so URLs work too."""
    store = TeacherStore.open(path)
    m = store.meta
    done = store.done()
    complete = done == schema.DONE_OK
    n_done = int(complete.sum())
    stored = sum(store._array(a).nbytes_stored() for a in _array_names(m))
    item = schema.ITEM_BYTES[m.dtype]
    dense = 0
    sm = store.small()
    for s in m.strides:
        hw = sm[f"valid/{s}"][complete]
        cells = int((hw[:, 0].astype(np.int64) * hw[:, 1]).sum()) if n_done else 0
        dense += len(m.views) * cells * (m.channels * item + 4)
    return {
        "path": str(path),
        "teacher": m.teacher,
        "split": m.split,
        "views": list(m.views),
        "levels": list(m.strides),
        "channels": m.channels,
        "dtype": m.dtype,
        "keepbits": m.attrs.get("quantization", {}).get("keepbits"),
        "codec": m.attrs.get("codec", {}).get("name"),
        "images": m.num_images,
        "done": n_done,
        "pending": int((done == schema.DONE_PENDING).sum()),
        "unreadable": int((done == schema.DONE_UNREADABLE).sum()),
        "bytes_on_disk": int(stored),
        "bytes_per_image": stored / n_done if n_done else math.nan,
        "compression_ratio": dense / stored if stored and n_done else math.nan,
        "pca": pca_energy(store) if m.pca else None,
        "created": m.attrs.get("created"),
        "weights_sha256": m.fingerprints["weights_sha256"],
        "dfmsd_version": m.attrs.get("dfmsd_version"),
    }


def pca_energy(store: TeacherStore) -> dict[str, Any]:
    """``--pca`` stores: components and, per level, the energy kept (1 − ‖x − x̂‖² / ‖x‖²,
    pooled) on the fit images (attribute) and over every complete image and view (``pca_stat``)."""
    from dfmsd_cli.store.pca import pooled_energy

    m = store.meta
    ok = store.done() == schema.DONE_OK
    levels = {}
    for s in m.strides:
        rows = []
        for v in m.views:
            stat = store._read(f"pca_stat/{v}/{s}", slice(None), f"pca_stat of stride {s}")
            rows += list(stat[ok])
        fit = (m.pca.get("levels") or {}).get(str(s), {})
        levels[str(s)] = {
            "energy_kept_fit": fit.get("energy_kept"),
            "variance_kept_fit": fit.get("variance_kept"),
            "energy_kept_stored": pooled_energy(rows),
        }
    return {"components": int(m.attrs["pca_components"]), "fit_images": m.pca.get("fit_images"),
            "levels": levels}  # fmt: skip


def _check_image(store: TeacherStore, i: int) -> list[str]:
    """Decode everything of image i; return problems."""
    m = store.meta
    out = []
    for v in m.views:
        for s in m.strides:
            where = f"image index {i} (id {m.image_ids[i]}) view {v} stride {s}"
            try:
                t = store.get(i, v, strides=(s,))
            except Exception as exc:  # noqa: BLE001 - any decode failure is a finding
                out.append(f"unreadable chunk at {where}: {type(exc).__name__}: {exc}")
                continue
            f = t["features"][s]
            if not torch.isfinite(f).all():
                out.append(f"NaN/inf in the features at {where}")
                continue
            if not (
                torch.isfinite(t["att_spatial"][s]).all()
                and torch.isfinite(t["att_channel"][s]).all()
            ):
                out.append(f"NaN/inf in the attention statistics at {where}")
                continue
            if s in t["logits"] and not torch.isfinite(t["logits"][s]).all():
                out.append(f"NaN/inf in the teacher logits at {where}")
                continue
            got = f.abs().mean(dim=(1, 2)).double()
            want = t["att_channel"][s].double()
            if m.pca:  # check the stored components against their own statistics
                from dfmsd_cli.store.pca import project

                z = project(f, *store.pca_basis(s))
                got = z.abs().mean(dim=(1, 2)).double()
                stat = np.asarray(store._array(f"pca_stat/{v}/{s}")[i])[:-2]
                want = torch.as_tensor(stat, dtype=torch.float64)
            if m.dtype == "uint8":
                scale = torch.as_tensor(
                    np.asarray(store._array(f"qparams/{v}/{s}")[i])[:, 0], dtype=torch.float64
                )
                tol = scale / 2 + 1e-3 + 1e-2 * want.abs()
            else:  # float16 / bfloat16 / float32, possibly bit-rounded to k mantissa bits
                keep = m.attrs.get("quantization", {}).get("keepbits")
                rel = max(1e-2, 2.0 ** -(keep + 1)) if keep else 1e-2
                tol = 1e-3 + rel * want.abs()
            if bool(((got - want).abs() > tol).any()):
                out.append(
                    f"features disagree with their stored statistics at {where} (a chunk is "
                    "missing or altered): precompute this image again (reset its marker)"
                )
    return out


@dataclass
class VerifyReport:
    """``problems`` make ``cache verify`` exit 1; ``damaged`` are the indices of complete images
    with a bad or missing chunk (what ``repair_store`` recomputes)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    damaged: list[int] = field(default_factory=list)


def verify_store(
    path: str | Path,
    ann_file: str | Path | None = None,
    image_dir: str | Path | None = None,
    weights: str | None = None,
    scan: bool = True,
    progress: bool = False,
    concurrency: int | None = None,
) -> VerifyReport:
    """Check a store (see the module docstring); ``concurrency`` bounds the requests in flight
    on object storage (``TeacherStore.open``)."""
    from dfmsd_cli.errors import UserError

    report = VerifyReport()
    problems, notes = report.problems, report.notes
    # cache_local=False: check what the server holds, never a local copy of it
    store = TeacherStore.open(path, concurrency=concurrency, cache_local=False)
    m = store.meta
    if not store.checksummed:
        notes.append(
            f"store schema {m.attrs.get('schema_version')} (written before dfmsd stored chunk "
            "checksums): unchecksummed — a damaged chunk is caught only by the statistics check "
            "below; precompute it anew to get crc32c on every chunk"
        )
    if ann_file is not None:
        from dfmsd_cli.data.coco import CocoDetection
        from dfmsd_cli.utils.io import sha256_file

        if image_dir is None:
            raise UserError("verify against a dataset needs both the annotation file and images")
        ds = CocoDetection(ann_file, image_dir, geometry=m.geometry, train=False)
        try:
            store.check(image_ids=ds.image_ids, ann_sha256=sha256_file(ann_file))
        except UserError as exc:
            problems.append(f"dataset fingerprint: {exc}")
    if weights is not None:
        from dfmsd_cli.models.checkpoint import load_teacher

        model = load_teacher(m.teacher, m.num_classes, weights)
        sha = schema.state_dict_sha256(model.state_dict())
        if sha != m.fingerprints["weights_sha256"]:
            problems.append(
                f"teacher weights {weights} (SHA-256 {sha[:12]}…) are not the ones the store was "
                f"made with ({m.fingerprints['weights_sha256'][:12]}…)"
            )
    done = store.done()
    pending = np.flatnonzero(done == schema.DONE_PENDING)
    if len(pending):
        problems.append(
            f"{len(pending)} of {m.num_images} images have no completion marker (first: index "
            f"{pending[0]}, id {m.image_ids[pending[0]]}): run 'dfmsd precompute' again to finish"
        )
    unreadable = np.flatnonzero(done == schema.DONE_UNREADABLE)
    if len(unreadable):
        notes.append(
            f"{len(unreadable)} images were unreadable at precompute time and are skipped "
            f"(first id {m.image_ids[unreadable[0]]})"
        )
    if scan:
        complete = np.flatnonzero(done == schema.DONE_OK)
        from dfmsd_cli.utils.console import make_progress

        bar = make_progress(disable=not progress)
        with bar:
            task = bar.add_task("verify", total=len(complete), info="")
            for i in complete:
                found = _check_image(store, int(i))
                if found:
                    problems += found
                    report.damaged.append(int(i))
                bar.advance(task)
    return report
