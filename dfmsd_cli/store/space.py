"""Before a local store is written: will it fit its disk?

A COCO-scale store takes days to write and terabytes to hold (docs/store.md, "COCO
projection"); running out of space half-way loses nothing (precompute resumes) but wastes the
days. :func:`check_space` projects the bytes still to be written with the same code as
``precompute --dry-run`` (:func:`store.projection.projected_size`: image sizes × the
encoding's measured stored/raw ratio) and, when they exceed the free space of the store's file
system, stops with one line naming the least lossy smaller encoding that fits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from dfmsd_cli.errors import UserError, free_bytes
from dfmsd_cli.store.probe import Candidate, probe_encodings
from dfmsd_cli.store.projection import PlannedStore, projected_size
from dfmsd_cli.utils.fmt import format_bytes

if TYPE_CHECKING:
    from dfmsd_cli.data.coco import CocoDetection


class Encoding(NamedTuple):
    """A store encoding offered when a store must be smaller, with its measured error."""

    flags: str
    dtype: str
    keepbits: int | None
    codec: str
    pca: int | None
    relative_rmse: float  # on real-image retina_r50 features (docs/store.md, "Smaller stores")


# Least feature error first (--pca: examples/measure_pca.py, random init; a trained teacher's
# own energy kept is in `cache info`).
SMALLER: list[Encoding] = [
    Encoding("--dtype bfloat16", "bfloat16", None, "blosc", None, 1.7e-3),
    Encoding("--dtype uint8", "uint8", None, "blosc", None, 2.5e-3),
    Encoding("--dtype float16 --keepbits 5", "float16", 5, "blosc", None, 6.7e-3),
    Encoding("--dtype bfloat16 --keepbits 3", "bfloat16", 3, "blosc", None, 2.7e-2),
    Encoding("--dtype uint8 --pca 64", "uint8", None, "blosc", 64, 8.7e-2),
    Encoding("--dtype uint8 --pca 32", "uint8", None, "blosc", 32, 0.11),
]


def encoding_label(o: PlannedStore) -> str:
    """``float16``, ``bfloat16 keepbits 3 pcodec``, ``uint8 pca 32``: what a store encodes."""
    parts = [o.dtype]
    if o.keepbits is not None:
        parts.append(f"keepbits {o.keepbits}")
    if o.codec != "blosc":
        parts.append(o.codec)
    if getattr(o, "pca", None):
        parts.append(f"pca {o.pca}")
    return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class StorePlan:
    """What a store will hold: the images of ``ds``, ``strides`` × ``views`` maps of ``channels``
    channels (``logit_channels`` float16 logits per position), encoded as ``o`` says."""

    ds: CocoDetection
    o: PlannedStore
    strides: list[int]
    channels: int
    views: list[str]
    logit_channels: int = 0

    def projected_bytes(self, todo: int, ratio: float | None = None, **encoding) -> float:
        """Projected bytes of ``todo`` of the images, in ``o``'s encoding with ``encoding``'s
        fields (dtype, keepbits, codec, pca) replaced; ``ratio``: a measured stored/raw."""
        o = dataclasses.replace(self.o, **encoding) if encoding else self.o
        size = projected_size(self.ds, o, self.strides, self.channels, self.views,
                              self.logit_channels, ratio)  # fmt: skip
        return size["projected_bytes"] * todo / max(1, len(self.ds.image_ids))


def candidates(plan: StorePlan) -> list[Encoding]:
    """The encodings of :data:`SMALLER` the plan's channels allow (``--pca K`` needs K < C)."""
    return [e for e in SMALLER if not (e.pca and e.pca >= plan.channels)]


def probe_plan(plan: StorePlan, model: Any, indices: Iterable[int], device: Any) -> dict[str, Any]:
    """``store.probe.probe_encodings`` on images ``indices`` over the plan's own encoding
    (first) and its :func:`candidates`: what ``--dry-run`` reports for this teacher."""
    o = plan.o
    own = Candidate(encoding_label(o), o.dtype, o.keepbits, o.codec, getattr(o, "pca", None))
    cands = [own] + [
        Candidate(e.flags, e.dtype, e.keepbits, e.codec, e.pca)
        for e in candidates(plan)
        if encoding_key(e) != encoding_key(o)
    ]
    return probe_encodings(model, plan.ds, list(indices), plan.strides, cands, device)


def measured_size(plan: StorePlan, probe: dict[str, Any] | None) -> dict[str, Any]:
    """The plan's projection with the stored/raw its probe measured, and the measured feature
    error ({} without a probe or a measurement: the r50 constants stand)."""
    rows = {encoding_key(r): r for r in (probe or {}).get("encodings", [])}
    mine = rows.get(encoding_key(plan.o))
    if _measured(mine) is None:
        return {}
    size = projected_size(plan.ds, plan.o, plan.strides, plan.channels, plan.views,
                          plan.logit_channels, mine["stored_raw"])  # fmt: skip
    return {**size, "relative_rmse": mine["relative_rmse"], "energy_kept": mine["energy_kept"]}


def on_teacher(
    plan: StorePlan, model: Any, device: Any, images: Iterable[int], todo: int
) -> dict[str, Any]:
    """``--dry-run``'s figures measured on the teacher's ``images`` (none: the constants):
    {probe, smaller, and the plan's projection with its measured stored/raw and error}."""
    images = list(images)
    probe = probe_plan(plan, model, images, device) if images else None
    return {"probe": probe, **measured_size(plan, probe), "smaller": smaller(plan, todo, probe)}


def smaller(
    plan: StorePlan, todo: int, probe: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Every encoding of :func:`candidates` whose projection for ``todo`` images is below the
    plan's own: {flags, bytes, relative_rmse, energy_kept, measured}, least error first.

    ``probe`` (``store.probe.probe_encodings`` over the plan's encoding, first, and these
    candidates) replaces the r50 constants with this teacher's own stored/raw and error, and
    drops a candidate the teacher's values cannot be stored in."""
    rows = {encoding_key(r): r for r in (probe or {}).get("encodings", [])}
    mine = plan.projected_bytes(todo, _measured(rows.get(encoding_key(plan.o))))
    out = []
    for e in candidates(plan):
        got = rows.get(encoding_key(e))
        if got is not None and got.get("error"):
            continue
        ratio = _measured(got)
        need = plan.projected_bytes(todo, ratio, dtype=e.dtype, keepbits=e.keepbits,
                                    codec=e.codec, pca=e.pca)  # fmt: skip
        if need < mine:  # the candidates are blosc stores: say so to a --codec zstd|pcodec user
            flags = e.flags if plan.o.codec == e.codec else f"{e.flags} --codec {e.codec}"
            out.append({
                "flags": flags, "bytes": need,
                "relative_rmse": got["relative_rmse"] if ratio is not None else e.relative_rmse,
                "energy_kept": got.get("energy_kept") if ratio is not None else None,
                "measured": ratio is not None,
            })  # fmt: skip
    if probe:  # least error first on this teacher (its order may differ from r50's)
        out.sort(key=lambda e: e["relative_rmse"])
    return out


def encoding_key(e: Any) -> tuple:
    """(dtype, keepbits, codec, pca) of options, an :class:`Encoding` or a probe row."""
    get = e.get if isinstance(e, dict) else lambda k: getattr(e, k, None)
    return (get("dtype"), get("keepbits"), get("codec"), get("pca"))


def _measured(row: dict[str, Any] | None) -> float | None:
    """The stored/raw a probe measured for one encoding, or None (not probed, or no image)."""
    return None if row is None else row.get("stored_raw")


def smaller_that_fits(plan: StorePlan, todo: int, free: float) -> tuple[str, float] | None:
    """The first of :func:`smaller` (least error first) that fits in ``free`` bytes:
    (flags, bytes), or None."""
    for e in smaller(plan, todo):
        if e["bytes"] <= free:
            return e["flags"], e["bytes"]
    return None


def check_space(
    plan: StorePlan, path: str, todo: int, unused_levels: bool = False
) -> dict[str, float | None]:
    """Raise a one-line :class:`UserError` when the ``todo`` images still to be written to the
    local store ``path`` project to more bytes than its file system has free; return the
    projection {needed_bytes, free_bytes} otherwise (object storage: free is None, no check).
    ``unused_levels``: the store would keep levels no single-stage student reads (the error
    then also names ``--for-student``)."""
    need = plan.projected_bytes(todo)
    free = None if "://" in str(path) else free_bytes(path)
    if free is None or need <= free:
        return {"needed_bytes": need, "free_bytes": free}
    fix = ["free space or choose another --cache"]
    alt = smaller_that_fits(plan, todo, free)
    if alt is not None:
        fix.append(f"store less: {alt[0]} projects to {format_bytes(alt[1])}")
    if unused_levels:
        fix.append("--for-student NAME skips the levels your student cannot read")
    raise UserError(
        f"store {path}: the {todo} images still to write project to {format_bytes(need)} "
        f"({encoding_label(plan.o)}; --dry-run shows the projection) but its disk has "
        f"{format_bytes(free)} free: {'; '.join(fix)}; or pass --no-space-check"
    )


@dataclasses.dataclass
class SpaceWatch:
    """The space check again, once, after the first ``o.block`` images a run writes: with the
    bytes their chunks took instead of the constants (a trained teacher may compress worse than
    the random-init r50 they were measured on: 21 % on the demo's teachers, docs/store.md), so
    a store that will not fit stops minutes in, not at a full disk days later. The completed
    images stay; re-running resumes. It projects this run's own images (shards sharing a disk
    each check their range; :func:`check_space` before the run counts the whole store's)."""

    path: str
    todo: int  # images this run writes
    o: PlannedStore  # the encoding (for the message) and ``block``: the images before the check
    checked: bool = False

    def check(self, images: int, nbytes: int) -> None:
        """``images`` written so far by this run, their chunks' ``nbytes``: raise a one-line
        :class:`UserError` when the rest projects beyond the free space."""
        if self.checked or images < min(self.o.block, self.todo) or "://" in self.path:
            return
        self.checked = True
        need = nbytes / max(1, images) * (self.todo - images)
        free = free_bytes(self.path)
        if need > free:
            raise UserError(
                f"store {self.path}: its first {images} images took "
                f"{format_bytes(nbytes / max(1, images))} each ({encoding_label(self.o)}), so the "
                f"{self.todo - images} left in this run need {format_bytes(need)} but the disk has "
                f"{format_bytes(free)} free: free space, choose a smaller encoding "
                "(--dry-run measures them on this teacher) or pass --no-space-check; re-running "
                "resumes"
            )
