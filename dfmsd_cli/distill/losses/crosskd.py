"""CrossKD (Wang et al., "CrossKD: Cross-Head Knowledge Distillation for Object Detection",
CVPR 2024; official code jbwang1997/CrossKD, ``mmdet/models/detectors/crosskd_gfl.py`` and
``mmdet/models/losses/kd_loss.py``, read, not copied).

The student's head tower features at crossing point ``i`` (after its first ``i`` conv+GN, before
that ReLU) are given the teacher's per-channel statistics (``align_scale``) and run through the
**teacher's** remaining head layers (frozen): the cross-head predictions ``ẑ`` are distilled
toward the teacher's own predictions ``z^T`` (its head on the stored FPN features). Gradients
reach the student through its first ``i`` tower convs, its FPN and backbone; the teacher head
stays frozen. Per head family (the official configs; ``w_p = σ(max_k z^T_pk)``, the teacher's
top score; ``KD-QFL(ẑ, z) = BCE(σ(ẑ), σ(z)) · |σ(ẑ) − σ(z)|^β``, β = 1):

* GFL (``crosskd_r50_gflv1_r101-2x-ms_fpn_1x_coco.py``), i = 3:
  ``L_cls = Σ_{p,k} KD-QFL(ẑ_pk, z^T_pk) / N_pos`` (``N_pos``: the ATSS positives, the
  detection QFL's normaliser), weight 1;
  ``L_reg = Σ_p w_p Σ_{side} KL(softmax(d^T_p/T) ‖ softmax(d̂_p/T)) T² / Σ_p w_p`` on the DFL
  bin distributions, T = 1 (the official weight 4 with ``avg_factor`` 4 cancels), weight 1;
* FCOS, MMDetection layout (``crosskd_r50_fcos_r101-2x-ms_caffe_fpn_gn-head_2x_ms_coco.py``),
  i = 2: ``L_cls = Σ_{p,k} KD-QFL / N_ctr``, weight 0.4;
  ``L_reg = Σ_p w_p · (−log IoU(b̂_p, b^T_p)) / N_ctr``, weight 0.75, with the boxes of the
  predicted distances at one point (``N_ctr``: the sum of the positives' centerness targets,
  the detection IoU loss's normaliser). Centerness is not distilled (as the official code).
* RetinaNet (``crosskd_r50_retinanet_r101_fpn_2x_coco.py``), i = 3, per anchor:
  ``L_cls = Σ_{a,k} KD-QFL / N_pos``, weight 1; ``L_reg = Σ_a w_a (1 − GIoU(b̂_a, b^T_a)) /
  N_pos``, weight 1, both boxes decoded from the anchor (``N_pos``: the matcher's positives).

Our choices (docs/method.md, CrossKD): every sum runs over the positions where the stored
teacher map exists (``valid``; the store holds zeros elsewhere), and ``align_scale``'s
statistics are taken over those positions only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder

from dfmsd_cli.models.gfl_losses import aligned_iou, giou_loss

_BOX_CODER = BoxCoder((1.0, 1.0, 1.0, 1.0))  # RetinaNet's (MMDetection: means 0, stds 1)


def align_scale(student: Tensor, teacher: Tensor, valid: Tensor, eps: float = 1e-6) -> Tensor:
    """CrossKD's ``align_scale``: ``(S − μ_S) / (σ_S + ε) · σ_T + μ_T`` per channel.

    ``student``/``teacher``: (B, C, h, w); μ, σ (unbiased std, as ``torch.std``) per channel
    over the batch's positions where ``valid`` (B, h, w) holds. The teacher's statistics carry
    no gradient; the student's do (as in the official code).
    """
    s = student.permute(1, 0, 2, 3)[:, valid]  # (C, n)
    t = teacher.detach().permute(1, 0, 2, 3)[:, valid]
    if s.shape[1] < 2:  # no (or one) valid position: nothing to standardise
        return student
    mu_s, sd_s = s.mean(1), s.std(1)
    mu_t, sd_t = t.mean(1), t.std(1)
    scale = (sd_t / (sd_s + eps))[None, :, None, None]
    return (student - mu_s[None, :, None, None]) * scale + mu_t[None, :, None, None]


def kd_quality_focal_loss(pred: Tensor, target: Tensor, beta: float = 1.0) -> Tensor:
    """Element-wise KD-QFL (CrossKD ``kd_quality_focal_loss``): with ``q = σ(target)``,
    ``BCE(σ(pred), q) · |σ(pred) − q|^β``; ``pred``, ``target``: logits of one shape."""
    q = target.detach().sigmoid()
    bce = F.binary_cross_entropy_with_logits(pred, q, reduction="none")
    return bce * (pred.sigmoid() - q).abs().pow(beta)


def kd_kl_div(pred: Tensor, target: Tensor, temperature: float = 1.0) -> Tensor:
    """Per row ``Σ_j KL(softmax(target/T) ‖ softmax(pred/T)) · T²`` (MMDetection's
    ``knowledge_distillation_kl_div_loss``, ``class_reduction='sum'``); (N, n) -> (N,)."""
    t = F.softmax(target.detach() / temperature, dim=1)
    kl = F.kl_div(F.log_softmax(pred / temperature, dim=1), t, reduction="none")
    return kl.sum(1) * temperature**2


class CrossKDLoss(nn.Module):
    """CrossKD for a student and a teacher head of family ``kind`` (``gfl`` or ``mmfcos``;
    see the module docstring).

    ``teacher_head``: a ``GFLHead`` / ``MMFCOSHead`` with the teacher's weights,
    frozen and kept out of this module's parameters and state dict (it is the teacher's, not
    trained, not checkpointed; ``.to()`` moves it). ``levels``: the strides distilled;
    ``level_index[s]``: the position of stride ``s`` in the teacher head (its ``Scale``).
    ``forward(student_head, S, T, valid, norm)`` returns ``(L_cls, L_reg)``, unweighted;
    ``norm``: ``N_pos`` (gfl) or ``N_ctr`` (mmfcos).
    """

    def __init__(
        self,
        teacher_head: nn.Module,
        levels: list[int],
        level_index: dict[int, int],
        index: int = 3,
        beta: float = 1.0,
        temperature: float = 1.0,
        kind: str = "gfl",
    ) -> None:
        super().__init__()
        if kind not in ("gfl", "mmfcos", "retina"):
            raise ValueError(f"CrossKD has no {kind!r} head family (gfl, mmfcos, retina)")
        self.kind = kind
        teacher_head.eval().requires_grad_(False)
        self._teacher = [teacher_head]  # a list: not a registered submodule
        self.levels = list(levels)
        self.level_index = {int(s): int(i) for s, i in level_index.items()}
        self.index, self.beta, self.temperature = int(index), float(beta), float(temperature)
        self.pending_reg: Tensor | None = None  # L_reg of the last forward (the second term)

    @property
    def teacher_head(self) -> nn.Module:
        return self._teacher[0]

    def _apply(self, fn, recurse: bool = True):
        self._teacher[0]._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        super().train(mode)
        self._teacher[0].eval()
        return self

    @torch.no_grad()
    def teacher_outputs(self, feats: dict[int, Tensor]) -> dict[int, tuple[Tensor, ...]]:
        """Per stride (cls hold, reg hold, cls logits, box regression, ...) of the teacher head
        run on the stored FPN maps, split at the crossing point."""
        head, out = self.teacher_head, {}
        for s in self.levels:
            x = feats[s].float()
            c, r = head.towers_until(x, self.index)
            out[s] = (c, r, *head.forward_from(c, r, self.level_index[s], self.index))
        return out

    def forward(
        self,
        student_head: nn.Module,
        student: dict[int, Tensor],
        teacher: dict[int, Tensor],
        valid: dict[int, Tensor],
        norm: float,
        anchors: dict[int, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        head = self.teacher_head
        tout = self.teacher_outputs(teacher)
        cls_sum = student[self.levels[0]].new_zeros((), dtype=torch.float32)
        reg_sum, w_sum = cls_sum.clone(), cls_sum.clone()
        for s in self.levels:
            m = valid[s]
            tc_hold, tr_hold, t_cls, t_reg = tout[s][:4]
            sc_hold, sr_hold = student_head.towers_until(student[s].float(), self.index)
            xc = align_scale(sc_hold, tc_hold, m)
            xr = align_scale(sr_hold, tr_hold, m)
            x_cls, x_reg = head.forward_from(xc, xr, self.level_index[s], self.index)[:2]
            pc = x_cls.float().permute(0, 2, 3, 1)[m]  # (n_valid, K) at the valid positions
            tc = t_cls.permute(0, 2, 3, 1)[m]
            cls_sum = cls_sum + kd_quality_focal_loss(pc, tc, self.beta).sum()
            pr = x_reg.permute(0, 2, 3, 1)[m]
            tr = t_reg.permute(0, 2, 3, 1)[m]
            if self.kind == "retina":  # per anchor: (n_valid · A, K) scores, (· , 4) deltas
                anc = anchors[s][None].expand(m.shape[0], -1, -1, -1, -1)[m].reshape(-1, 4)
                w = tc.reshape(anc.shape[0], -1).max(dim=1).values.sigmoid()
                boxes = _BOX_CODER.decode_single(pr.reshape(-1, 4).float(), anc)
                t_boxes = _BOX_CODER.decode_single(tr.reshape(-1, 4).float(), anc)
                reg_sum = reg_sum + (w * giou_loss(boxes, t_boxes)).sum()
                continue
            w = tc.max(dim=1).values.sigmoid()
            if self.kind == "gfl":  # (n_valid · 4, reg_max + 1) bin logits
                bins = pr.shape[1] // 4
                kl = kd_kl_div(pr.reshape(-1, bins), tr.reshape(-1, bins), self.temperature)
                reg_sum = reg_sum + (w * kl.reshape(-1, 4).sum(1)).sum()
            else:  # (n_valid, 4) distances l, t, r, b: boxes around one common point
                iou = aligned_iou(_ltrb_box(pr), _ltrb_box(tr))
                reg_sum = reg_sum + (w * -iou.clamp(min=1e-6).log()).sum()
            w_sum = w_sum + w.sum()
        loss_cls = cls_sum / max(float(norm), 1e-6 if self.kind == "mmfcos" else 1.0)
        if self.kind == "gfl":
            return loss_cls, reg_sum / w_sum.clamp(min=1e-6)
        return loss_cls, reg_sum / max(float(norm), 1e-6 if self.kind == "mmfcos" else 1.0)


def _ltrb_box(d: Tensor) -> Tensor:
    """(n, 4) distances (l, t, r, b) from a point at the origin -> xyxy boxes."""
    return torch.cat([-d[:, :2], d[:, 2:]], dim=1)
