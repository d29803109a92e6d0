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
from typing import TYPE_CHECKING, Any, NamedTuple

from dfmsd_cli.errors import UserError, free_bytes
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

    def projected_bytes(self, todo: int, **encoding) -> float:
        """Projected bytes of ``todo`` of the images, in ``o``'s encoding with ``encoding``'s
        fields (dtype, keepbits, codec, pca) replaced."""
        o = dataclasses.replace(self.o, **encoding) if encoding else self.o
        size = projected_size(self.ds, o, self.strides, self.channels, self.views,
                              self.logit_channels)  # fmt: skip
        return size["projected_bytes"] * todo / max(1, len(self.ds.image_ids))


def smaller(plan: StorePlan, todo: int) -> list[dict[str, Any]]:
    """Every encoding of :data:`SMALLER` the plan's channels allow whose projection for ``todo``
    images is below the plan's own: {flags, bytes, relative_rmse}, least error first."""
    mine = plan.projected_bytes(todo)
    out = []
    for e in SMALLER:
        if e.pca and e.pca >= plan.channels:
            continue
        need = plan.projected_bytes(todo, dtype=e.dtype, keepbits=e.keepbits, codec=e.codec,
                                    pca=e.pca)  # fmt: skip
        if need < mine:  # the candidates are blosc stores: say so to a --codec zstd|pcodec user
            flags = e.flags if plan.o.codec == e.codec else f"{e.flags} --codec {e.codec}"
            out.append({"flags": flags, "bytes": need, "relative_rmse": e.relative_rmse})
    return out


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
