"""``--weights torchvision``: torchvision's pretrained weights where they exist.

* COCO detection weights (torchvision v1 models, same module layout as ours) for
  ``retina_r50``, ``fcos_r50``, ``frcnn_r50``, ``mrcnn_r50``. They predict 91 classes indexed
  by COCO category id (0 = background). When the dataset's categories are COCO categories
  (same id and name), the class-specific rows are selected and reordered to labels 1..K;
  otherwise every class-agnostic layer is loaded (backbone, FPN, RPN, towers, box/mask heads)
  and the class-specific predictors keep their random initialisation.
* ImageNet classification weights of the trunk (``backbone.body``) for the other models whose
  backbone torchvision ships: r18, r34, r50, r101, x101 (ResNeXt-101 64x4d). FPN and head stay
  random. Requires BatchNorm-style norms (``norm="frozen_bn"`` or ``"bn"``).

Files come from ``torch.hub`` (cached in ``$TORCH_HOME/hub/checkpoints``); a failed download
(no network) is a UserError that says where to put the file.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import detection as tv_det
from torchvision.models import resnet as tv_resnet
from torchvision.models._meta import _COCO_CATEGORIES

from dfmsd_cli.errors import UserError
from dfmsd_cli.models.registry import annotate_model
from dfmsd_cli.models.state_dict import load_state_strict, unwrap

# model name -> torchvision detection weights (91 COCO classes, layout of our v1 models)
TORCHVISION_DETECTION: dict[str, Any] = {
    "retina_r50": tv_det.RetinaNet_ResNet50_FPN_Weights.COCO_V1,
    "fcos_r50": tv_det.FCOS_ResNet50_FPN_Weights.COCO_V1,
    "frcnn_r50": tv_det.FasterRCNN_ResNet50_FPN_Weights.COCO_V1,
    "mrcnn_r50": tv_det.MaskRCNN_ResNet50_FPN_Weights.COCO_V1,
}
# backbone name -> torchvision ImageNet weights of the trunk
TORCHVISION_BACKBONE: dict[str, Any] = {
    "r18": tv_resnet.ResNet18_Weights.IMAGENET1K_V1,
    "r34": tv_resnet.ResNet34_Weights.IMAGENET1K_V1,
    "r50": tv_resnet.ResNet50_Weights.IMAGENET1K_V1,
    "r101": tv_resnet.ResNet101_Weights.IMAGENET1K_V1,
    "x101": tv_resnet.ResNeXt101_64X4D_Weights.IMAGENET1K_V1,
}
# state-dict key -> (groups, per_class): the first dim is laid out (groups, 91, per_class)
CLASS_KEYS: dict[str, tuple[str, int]] = {
    "head.classification_head.cls_logits.weight": ("anchors", 1),
    "head.classification_head.cls_logits.bias": ("anchors", 1),
    "roi_heads.box_predictor.cls_score.weight": ("one", 1),
    "roi_heads.box_predictor.cls_score.bias": ("one", 1),
    "roi_heads.box_predictor.bbox_pred.weight": ("one", 4),
    "roi_heads.box_predictor.bbox_pred.bias": ("one", 4),
    "roi_heads.mask_predictor.mask_fcn_logits.weight": ("one", 1),
    "roi_heads.mask_predictor.mask_fcn_logits.bias": ("one", 1),
}
NUM_COCO = len(_COCO_CATEGORIES)  # 91 = background + 90 ids (10 of them unused, "N/A")

for _name, _weights in TORCHVISION_DETECTION.items():  # torchvision's published val2017 box AP
    annotate_model(
        _name,
        published_ap=_weights.meta["_metrics"]["COCO-val2017"]["box_map"],
        checkpoint=f"torchvision: {_weights.url.rsplit('/', 1)[-1]}",
    )


def torchvision_weights_kind(name: str, backbone: str) -> str | None:
    """What ``--weights torchvision`` loads into ``name``: COCO weights, an ImageNet trunk,
    or nothing (None)."""
    if name in TORCHVISION_DETECTION:
        return "COCO"
    if backbone in TORCHVISION_BACKBONE:
        return "ImageNet trunk"
    return None


def download_state_dict(weights: Any) -> dict[str, Tensor]:
    """Fetch (or read from the hub cache) a torchvision weights file, or a clear UserError."""
    try:
        return torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True)
    except Exception as exc:  # URLError, OSError, hash mismatch ...
        cache = f"{torch.hub.get_dir()}/checkpoints/"
        raise UserError(
            f"cannot download torchvision weights {weights.url} "
            f"({type(exc).__name__}: {exc}): no internet here? download that file on another "
            f"machine into {cache} or pass --weights PATH"
        ) from exc


def coco_label_index(categories: list[dict] | None) -> list[int] | None:
    """[0, id_1, ..., id_K] when every category is a COCO category (same id and name)."""
    if not categories:
        return None
    idx = [0]
    for cat in categories:
        cid = int(cat.get("id", -1))
        if not 0 < cid < NUM_COCO or _COCO_CATEGORIES[cid] != cat.get("name"):
            return None
        idx.append(cid)
    return idx


def remap_classes(t: Tensor, idx: list[int], groups: int, per_class: int) -> Tensor:
    """Select class rows ``idx`` from a first dim laid out as (groups, 91, per_class)."""
    rest = t.shape[1:]
    t = t.reshape(groups, NUM_COCO, per_class, *rest)[:, idx]
    return t.reshape(groups * len(idx) * per_class, *rest)


def load_torchvision_weights(
    model: nn.Module, categories: list[dict] | None = None
) -> dict[str, Any]:
    """Load torchvision's pretrained weights into ``model``; returns what was loaded."""
    m = unwrap(model)
    backbone = m.name.split("_", 1)[1] if "_" in m.name else ""
    if m.name in TORCHVISION_DETECTION:
        return _load_detection(m, TORCHVISION_DETECTION[m.name], categories)
    if backbone in TORCHVISION_BACKBONE and hasattr(m.backbone, "body"):
        return _load_backbone(m, TORCHVISION_BACKBONE[backbone])
    raise UserError(
        f"torchvision has no pretrained weights for {m.name}: COCO weights exist for "
        f"{', '.join(TORCHVISION_DETECTION)} and ImageNet trunks for backbones "
        f"{', '.join(TORCHVISION_BACKBONE)}; pass --weights PATH instead"
    )


def _load_detection(m: nn.Module, weights: Any, categories: list[dict] | None) -> dict[str, Any]:
    source = f"torchvision {m.name} weights ({weights.url.rsplit('/', 1)[-1]})"
    state = download_state_dict(weights)
    own = m.state_dict()
    idx = coco_label_index(categories)
    if idx is None and m.num_classes == NUM_COCO - 1:
        idx = list(range(NUM_COCO))  # the model predicts all 90 COCO ids as labels 1..90
    anchors = _anchors_per_location(m)
    classes = "coco"
    for key, (group_kind, per_class) in CLASS_KEYS.items():
        if key not in state:
            continue
        if idx is None:
            state[key] = own[key]  # class-specific layer: keep the random initialisation
            classes = "random"
        else:
            groups = anchors if group_kind == "anchors" else 1
            state[key] = remap_classes(state[key], idx, groups, per_class)
    load_state_strict(m, state, source)
    return {"source": source, "classes": classes}


def _anchors_per_location(m: nn.Module) -> int:
    gen = getattr(m, "anchor_generator", None)
    return gen.num_anchors_per_location()[0] if gen is not None else 1


def _load_backbone(m: nn.Module, weights: Any) -> dict[str, Any]:
    source = f"torchvision ImageNet weights ({weights.url.rsplit('/', 1)[-1]})"
    trunk = {
        k: v
        for k, v in download_state_dict(weights).items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    body = m.backbone.body
    own = body.state_dict()
    trunk.update({k: v for k, v in own.items() if k.endswith("num_batches_tracked")})
    hint = "ImageNet weights need BatchNorm: build with norm=frozen_bn or norm=bn"
    load_state_strict(body, trunk, source, target=f"the {m.name} trunk", hint=hint)
    return {"source": source, "classes": "random", "loaded": "backbone.body"}
