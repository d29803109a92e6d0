"""Data: COCO datasets with named views, MMDetection geometry, synthetic data, loaders."""

from dfmsd_cli.data.coco import CocoDetection, decode_masks, load_coco_json
from dfmsd_cli.data.geometry import (
    VIEWS,
    Geometry,
    apply_view_boxes,
    apply_view_image,
    normalize,
    pad_batch,
    parse_img_scale,
    resize_image,
)
from dfmsd_cli.data.images import ImageError, load_rgb, probe_image
from dfmsd_cli.data.loader import (
    GroupedBatchSampler,
    available_splits,
    collate,
    make_loader,
    resolve_data,
)
from dfmsd_cli.data.synthetic import make_synthetic

__all__ = [
    "VIEWS",
    "CocoDetection",
    "Geometry",
    "GroupedBatchSampler",
    "ImageError",
    "apply_view_boxes",
    "apply_view_image",
    "available_splits",
    "collate",
    "decode_masks",
    "load_coco_json",
    "load_rgb",
    "make_loader",
    "make_synthetic",
    "normalize",
    "pad_batch",
    "parse_img_scale",
    "probe_image",
    "resize_image",
    "resolve_data",
]
