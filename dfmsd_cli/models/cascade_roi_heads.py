"""MMDetection's ``CascadeRoIHead`` (Cai & Vasconcelos, "Cascade R-CNN", CVPR 2018).

Training, stage ``s`` (IoU thresholds 0.5 / 0.6 / 0.7, loss weights 1 / 0.5 / 0.25):

1. the stage's proposals plus the ground-truth boxes are matched with ``MaxIoUAssigner``
   (positive iff IoU >= t_s, negative otherwise, no low-quality matches);
2. 512 RoIs per image are sampled, at most 25 % positive (``RandomSampler``);
3. the box head is trained with softmax CE + smooth-L1 (beta 1) on targets encoded with the
   stage's coder stds; the mask head on the positives;
4. the sampled RoIs that were not ground truth are regressed by this stage's (detached)
   deltas, clipped to the image, and become the next stage's proposals (``refine_bboxes``).

Inference: the proposals are refined through the stages; the class logits of the three stages
are averaged *before* the softmax (``CascadeRoIHead._refine_roi`` averages ``cls_score`` and
``BBoxHead.predict_by_feat`` applies the softmax); boxes come from the last stage; per-class
NMS (score > 0.05, IoU 0.5, 100 per image); the sigmoid masks of the three mask heads are
averaged for the kept boxes (``merge_aug_masks``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import box_iou, clip_boxes_to_image

from dfmsd_cli.models.cascade_heads import (
    FCNMaskHead,
    PyramidRoIAlign,
    Shared2FCBoxHead,
    box_stage_loss,
    boxes_to_rois,
    mask_loss,
    mask_targets,
)
from dfmsd_cli.models.detector import class_nms

# MMDetection target_stds per stage; torchvision BoxCoder weights are their inverses
CASCADE_STDS: tuple[tuple[float, float, float, float], ...] = (
    (0.1, 0.1, 0.2, 0.2),
    (0.05, 0.05, 0.1, 0.1),
    (0.033, 0.033, 0.067, 0.067),
)
CASCADE_IOUS: tuple[float, ...] = (0.5, 0.6, 0.7)
CASCADE_LOSS_WEIGHTS: tuple[float, ...] = (1.0, 0.5, 0.25)


class CascadeRoIHeads(nn.Module):
    """Three (or ``len(iou_thresholds)``) box stages, each with its own mask head.

    ``forward(feats, proposals, image_sizes, targets)`` -> ``(detections, losses)``;
    ``feats`` are the FPN maps at ``roi_strides`` (finest first).
    Parameters: ``box_heads.{s}`` (:class:`Shared2FCBoxHead`), ``mask_heads.{s}``
    (:class:`FCNMaskHead`).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        roi_strides: tuple[int, ...] = (4, 8, 16, 32),
        iou_thresholds: tuple[float, ...] = CASCADE_IOUS,
        stage_stds: tuple[tuple[float, float, float, float], ...] = CASCADE_STDS,
        stage_loss_weights: tuple[float, ...] = CASCADE_LOSS_WEIGHTS,
        fc_channels: int = 1024,
        with_mask: bool = True,
        mask_channels: int = 256,
        mask_convs: int = 4,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        mask_size: int = 28,
        box_loss_beta: float = 1.0,
    ) -> None:
        super().__init__()
        if not len(iou_thresholds) == len(stage_stds) == len(stage_loss_weights):
            raise ValueError("one IoU threshold, coder std and loss weight per cascade stage")
        self.num_classes = num_classes
        self.num_stages = len(iou_thresholds)
        self.iou_thresholds = tuple(iou_thresholds)
        self.stage_loss_weights = tuple(stage_loss_weights)
        self.box_coders = [det_utils.BoxCoder(tuple(1.0 / s for s in std)) for std in stage_stds]
        self.matchers = [
            det_utils.Matcher(t, t, allow_low_quality_matches=False) for t in iou_thresholds
        ]
        self.sampler = det_utils.BalancedPositiveNegativeSampler(
            batch_size_per_image, positive_fraction
        )
        self.box_roi_pool = PyramidRoIAlign(roi_strides, output_size=7)
        self.box_heads = nn.ModuleList(
            Shared2FCBoxHead(in_channels, 7, fc_channels, num_classes)
            for _ in range(self.num_stages)
        )
        self.with_mask = with_mask
        if with_mask:
            self.mask_roi_pool = PyramidRoIAlign(roi_strides, output_size=mask_size // 2)
            self.mask_heads = nn.ModuleList(
                FCNMaskHead(in_channels, mask_channels, mask_convs, num_classes)
                for _ in range(self.num_stages)
            )
        self.mask_size = mask_size
        # inference only: False skips the mask heads and the full-image pasting (100 maps of
        # h x w per image), e.g. when only boxes and features are needed (precompute)
        self.predict_masks = True
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.box_loss_beta = box_loss_beta

    # ----------------------------------------------------------------------------- training
    def _sample(
        self, stage: int, proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Assign and sample; returns per image (rois, labels, matched gt index, is_gt)."""
        rois_out, labels_out, matched_out, is_gt_out = [], [], [], []
        all_labels, all_matched = [], []
        props_with_gt = []
        for props, tgt in zip(proposals, targets, strict=True):
            gt = tgt["boxes"].to(props.dtype)
            props = torch.cat([props, gt])
            is_gt = torch.zeros(props.shape[0], dtype=torch.bool, device=props.device)
            is_gt[props.shape[0] - gt.shape[0] :] = True
            if gt.shape[0] == 0:
                matched = torch.zeros(props.shape[0], dtype=torch.long, device=props.device)
                labels = torch.zeros_like(matched)
            else:
                idx = self.matchers[stage](box_iou(gt, props))
                matched = idx.clamp(min=0)
                labels = tgt["labels"][matched].long()
                labels[idx < 0] = 0
            props_with_gt.append((props, is_gt))
            all_labels.append(labels)
            all_matched.append(matched)
        pos_masks, neg_masks = self.sampler(all_labels)
        for (props, is_gt), labels, matched, pos, neg in zip(
            props_with_gt, all_labels, all_matched, pos_masks, neg_masks, strict=True
        ):
            keep = torch.where(pos | neg)[0]
            rois_out.append(props[keep])
            labels_out.append(labels[keep])
            matched_out.append(matched[keep])
            is_gt_out.append(is_gt[keep])
        return rois_out, labels_out, matched_out, is_gt_out

    def _train(
        self,
        feats: list[Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        # like mrcnn_*: a batch without mask annotations trains the box branch only
        with_mask = self.with_mask and all("masks" in t for t in targets)
        for s in range(self.num_stages):
            w = self.stage_loss_weights[s]
            rois, labels, matched, is_gt = self._sample(s, proposals, targets)
            gt_boxes = []
            for tgt, m, r in zip(targets, matched, rois, strict=True):
                boxes = tgt["boxes"].to(r.dtype)
                gt_boxes.append(boxes[m] if boxes.shape[0] else r.new_zeros(r.shape))
            reg_targets = self.box_coders[s].encode(gt_boxes, rois)
            cls_logits, deltas = self.box_heads[s](self.box_roi_pool(feats, boxes_to_rois(rois)))
            loss_cls, loss_box = box_stage_loss(
                cls_logits, deltas, torch.cat(labels), torch.cat(reg_targets), self.box_loss_beta
            )
            losses[f"s{s}.loss_cls"] = w * loss_cls
            losses[f"s{s}.loss_bbox"] = w * loss_box
            if with_mask:
                losses[f"s{s}.loss_mask"] = w * self._mask_train(
                    s, feats, rois, labels, matched, targets
                )
            if s < self.num_stages - 1:
                with torch.no_grad():
                    refined = self._decode(s, deltas.detach(), rois, image_sizes)
                    proposals = [r[~g] for r, g in zip(refined, is_gt, strict=True)]
        return losses

    def _mask_train(
        self,
        s: int,
        feats: list[Tensor],
        rois: list[Tensor],
        labels: list[Tensor],
        matched: list[Tensor],
        targets: list[dict[str, Tensor]],
    ) -> Tensor:
        pos_rois, pos_labels, tgts = [], [], []
        for r, lab, m, tgt in zip(rois, labels, matched, targets, strict=True):
            pos = lab > 0
            pos_rois.append(r[pos])
            pos_labels.append(lab[pos])
            tgts.append(mask_targets(tgt["masks"], r[pos], m[pos], self.mask_size))
        logits = self.mask_heads[s](self.mask_roi_pool(feats, boxes_to_rois(pos_rois)))
        return mask_loss(logits, torch.cat(pos_labels), torch.cat(tgts))

    def _decode(
        self, s: int, deltas: Tensor, rois: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[Tensor]:
        """``regress_by_class`` with class-agnostic deltas, clipped to each image."""
        boxes = self.box_coders[s].decode(deltas[:, :4].contiguous(), rois).reshape(-1, 4)
        out = []
        for b, size in zip(boxes.split([len(r) for r in rois]), image_sizes, strict=True):
            out.append(clip_boxes_to_image(b, size))
        return out

    # ---------------------------------------------------------------------------- inference
    def _infer(
        self, feats: list[Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        rois = proposals
        logits_sum = None
        deltas = None
        for s in range(self.num_stages):
            cls_logits, deltas = self.box_heads[s](self.box_roi_pool(feats, boxes_to_rois(rois)))
            logits_sum = cls_logits if logits_sum is None else logits_sum + cls_logits
            if s < self.num_stages - 1:
                rois = self._decode(s, deltas, rois, image_sizes)
        assert logits_sum is not None and deltas is not None
        scores_all = torch.softmax(logits_sum / self.num_stages, dim=-1)
        boxes_all = self._decode(self.num_stages - 1, deltas, rois, image_sizes)
        detections = []
        counts = [len(r) for r in rois]
        for boxes, scores in zip(boxes_all, scores_all.split(counts), strict=True):
            detections.append(self._nms(boxes, scores[:, 1:]))
        if self.with_mask and self.predict_masks:
            self._infer_masks(feats, detections, image_sizes)
        return detections

    def _nms(self, boxes: Tensor, scores: Tensor) -> dict[str, Tensor]:
        """``multiclass_nms``: agnostic boxes repeated per class, score > thr, NMS per class."""
        k = scores.shape[1]
        boxes = boxes[:, None].expand(-1, k, 4).reshape(-1, 4)
        labels = torch.arange(1, k + 1, device=scores.device).repeat(scores.shape[0])
        scores = scores.reshape(-1)
        keep = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        return class_nms(boxes, scores, labels, self.nms_thresh, self.detections_per_img)

    def _infer_masks(
        self,
        feats: list[Tensor],
        detections: list[dict[str, Tensor]],
        image_sizes: list[tuple[int, int]],
    ) -> None:
        rois = boxes_to_rois([d["boxes"] for d in detections])
        pooled = self.mask_roi_pool(feats, rois)
        probs = sum(head(pooled).sigmoid() for head in self.mask_heads) / self.num_stages
        labels = torch.cat([d["labels"] for d in detections])
        probs = probs[torch.arange(labels.shape[0], device=labels.device), labels - 1][:, None]
        for det, p, size in zip(
            detections, probs.split([len(d["boxes"]) for d in detections]), image_sizes, strict=True
        ):
            det["masks"] = paste_masks_in_image(p, det["boxes"], size)

    def forward(
        self,
        feats: list[Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            return [], self._train(feats, proposals, image_sizes, targets)
        return self._infer(feats, proposals, image_sizes), {}
