"""MMDetection -> dfmsd parity of the *training losses* (``tools/mmdet_parity.py --losses``).

Same weights, image and boxes through MMDetection's ``model.loss`` and dfmsd's
``model(images, sizes, targets).losses``; a developer tool that needs MMDetection (see
``docs/mmdet_parity.md``), split from ``mmdet_parity.py`` (the inference parity) which it reuses.
"""

from __future__ import annotations

import numpy as np
import torch
from mmdet_parity import (
    build_mmdet,
    calibrate_heads,
    dfmsd_twin,
    load_image,
    stub_mmcv_ext,
)

LOSS_BOXES = ((0.10, 0.15, 0.45, 0.70), (0.50, 0.40, 0.95, 0.95), (0.30, 0.05, 0.40, 0.20))
LOSS_LABELS = (0, 17, 56)


def loss_parity(config: str, model_name: str, size, image, seed: int) -> dict:
    """Training losses of both models (train mode, same weights, image and boxes).

    MMDetection's ``model.loss`` against dfmsd's ``model(images, sizes, targets).losses`` on
    :data:`LOSS_BOXES`; returns both dicts and the largest relative difference of a term.
    """
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    stub_mmcv_ext()
    mm, cfg = build_mmdet(config, None, seed)
    h, w = size
    rgb = load_image(image, size)
    calibrate_heads(mm, np.ascontiguousarray(rgb[..., ::-1]))
    dm, _ = dfmsd_twin(mm, cfg, config, model_name)
    boxes = torch.tensor(LOSS_BOXES) * torch.tensor([w, h, w, h], dtype=torch.float32)
    labels = torch.tensor(LOSS_LABELS)
    sample = DetDataSample(
        metainfo={"img_shape": (h, w), "ori_shape": (h, w), "scale_factor": (1.0, 1.0)}
    )
    sample.gt_instances = InstanceData(bboxes=boxes, labels=labels)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    data = {"inputs": [torch.from_numpy(bgr.copy()).permute(2, 0, 1)], "data_samples": [sample]}
    mm.train()
    data = mm.data_preprocessor(data, True)
    with torch.no_grad():
        ref = mm.loss(data["inputs"], data["data_samples"])
    ref = {k: float(sum(v) if isinstance(v, list) else v) for k, v in ref.items()}
    from dfmsd_cli.data.geometry import IMAGENET_MEAN, IMAGENET_STD

    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float()[None]
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    x = torch.nn.functional.pad(x, (0, -(-w // 32) * 32 - w, 0, -(-h // 32) * 32 - h))
    dm.train()
    with torch.no_grad():
        got = dm(x, [(h, w)], [{"boxes": boxes, "labels": labels + 1}]).losses
    got = {k: float(v) for k, v in got.items()}
    rel = max(abs(ref[k] - got[k]) / max(abs(ref[k]), 1e-12) for k in ref)
    return {"config": config, "model": model_name, "size": list(size), "mmdet": ref,
            "dfmsd": got, "max_rel": rel}  # fmt: skip
