"""``dfmsd cache verify --repair``: recompute exactly the damaged images of a store.

Repair resets the completion marker of each damaged image (a chunk failed its crc32c, is
missing, or disagrees with its statistics) and runs ``precompute`` with the options recorded
in the store's attributes (teacher, levels, views, dtype, codec, block, top-K, geometry,
enhancement). ``precompute`` resumes by markers, so it recomputes those images and nothing
else that is complete; its fingerprint check guarantees the same dataset and teacher weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dfmsd_cli.data.enhance import EnhanceConfig
from dfmsd_cli.data.geometry import Geometry
from dfmsd_cli.errors import UserError
from dfmsd_cli.store import schema
from dfmsd_cli.store.reader import TeacherStore


def options_of_store(store: TeacherStore, weights: str | None = None, **kw: Any):
    """The ``PrecomputeOptions`` that wrote ``store`` (``kw``: device, num_workers, progress)."""
    from dfmsd_cli.store.precompute import PrecomputeOptions

    a = store.meta.attrs
    cache = store.path.rstrip("/").rsplit("/", 2)[0]
    if schema.store_path(cache, a["teacher"], a["dataset"]["split"]) != store.path.rstrip("/"):
        raise UserError(
            f"{store.path} is not laid out as CACHE/{a['teacher']}/{a['dataset']['split']}.zarr: "
            "repair works on stores where precompute wrote them"
        )
    enhance = a.get("enhance")
    weights = weights or (a.get("weights") or {}).get("path")
    if weights and not Path(weights).is_file() and "://" not in weights:
        raise UserError(
            f"the store's teacher weights {weights} are not there: pass --weights with the "
            "file the store was made with"
        )
    return PrecomputeOptions(
        teacher=a["teacher"],
        split=a["dataset"]["split"],
        weights=weights,
        cache=cache,
        levels=[int(s) for s in a["strides"]],
        dtype=a["dtype"],
        # every encoding option the store records, so the repaired images match the others
        keepbits=(a.get("quantization") or {}).get("keepbits"),
        store_logits=bool(a.get("logits")),
        pca=a.get("pca_components"),
        views=list(a["views"]),
        enhance_from=(enhance or {}).get("source"),
        enhance=EnhanceConfig.from_dict(enhance) if enhance else EnhanceConfig(),
        geometry=Geometry.from_dict(a["geometry"]),
        block=int(a["block"]),
        topk=int(a["topk"]),
        score_thr=float(a["score_thr"]),
        codec=a["codec"]["name"],
        max_images=int(a["dataset"]["num_images"]),
        **kw,
    )


def reset_markers(store: TeacherStore, indices: list[int]) -> None:
    """Mark ``indices`` pending again (their data stays until precompute overwrites it)."""
    import zarr

    from dfmsd_cli.store.lock import store_lock
    from dfmsd_cli.store.writer import WRITE_CONFIG

    # no precompute may write this store meanwhile (the same lock precompute takes)
    with store_lock(store.path, 0, store.meta.num_images, "repair"):
        done = zarr.open_group(store.path, mode="r+")["done"].with_config(WRITE_CONFIG)
        for i in sorted(set(int(i) for i in indices)):
            done[i] = schema.DONE_PENDING
    store.refresh()


def repair_store(
    path: str | Path,
    ann_file: str | Path,
    image_dir: str | Path,
    damaged: list[int],
    weights: str | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """Recompute the images ``damaged`` of the store at ``path``; returns precompute's summary."""
    from dfmsd_cli.models.checkpoint import load_teacher
    from dfmsd_cli.store.precompute import precompute

    store = TeacherStore.open(path, cache_local=False)
    options = options_of_store(store, weights, **kw)
    teacher = load_teacher(options.teacher, store.meta.num_classes, options.weights, options.seed)
    sha = schema.state_dict_sha256(teacher.state_dict())
    if sha != store.meta.fingerprints["weights_sha256"]:  # before any marker is touched
        raise UserError(
            f"teacher weights {options.weights or '(random init)'} are not the ones {path} was "
            "made with: pass --weights with the store's teacher checkpoint"
        )
    del teacher
    if damaged:
        reset_markers(store, damaged)
    summary = precompute(ann_file, image_dir, options)
    summary["repaired"] = int(len(np.unique(damaged)))
    return summary
