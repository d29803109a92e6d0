"""SAMKD's SLD: masking logit distillation weighted by the region-wise feature difference.

Source: SAMKD (arXiv 2501.07101): "a masking logit distillation scheme in which region-specific
feature difference between teacher and student networks is utilized to adaptively guide the
distillation process". The formulation is ours (docs/method.md, SAMKD):

* weight map per level (detached), with S' the student feature after SFD's align conv and T:
  ``d = mean_c (S' − T)²`` per cell; ``D_w`` = mean of d over window w's valid cells (grid g,
  :mod:`.windows`; ``grid=None``: per cell); ``W = D_{w(cell)} / mean_{V} D`` — mean 1 over
  each image's valid cells, 0 on padding, 1 everywhere when S' = T on the whole image;
* per-position logit term on classification logits (B, A·K, H, W), A anchors × K classes:
  - ``softmax``: ``τ² · KL(softmax(z_T/τ) ‖ softmax(z_S/τ))`` over K (Hinton et al. 2015);
  - ``sigmoid`` (RetinaNet, FCOS, GFL): ``τ² · Σ_k KL(Bern(σ(z_T/τ)) ‖ Bern(σ(z_S/τ)))`` =
    BCE(z_S, p_T) − H(p_T), i.e. BCE with the teacher's entropy subtracted, so it is 0 at
    z_S = z_T; summed over the A anchors of the position;
* ``L_SLD = Σ_levels Σ_{(b,h,w) ∈ V} W · kd / Σ_levels |V|`` — a mean over every valid position
  of the pyramid (one P7 cell weighs what one P3 cell weighs, as in the dense heads' losses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfmsd_cli.distill.losses.windows import window_masks

LOGIT_KINDS: tuple[str, ...] = ("sigmoid", "softmax")


def feature_difference_weights(
    student: Tensor, teacher: Tensor, valid: Tensor, grid: int | None = 4
) -> Tensor:
    """W (B, H, W), detached: the normalised window-mean squared feature difference (above).

    ``student`` must already be aligned to the teacher's channels and size.
    """
    d = ((student.detach().float() - teacher.detach().float()) ** 2).mean(dim=1)
    v = valid.to(d.dtype)
    d = d * v
    if grid is not None:
        wv = window_masks(valid, grid).to(d.dtype)  # (B, G, H, W)
        count = wv.sum(dim=(2, 3)).clamp_min(1.0)
        per_window = (wv * d[:, None]).sum(dim=(2, 3)) / count
        d = (wv * per_window[:, :, None, None]).sum(dim=1)
    n = v.sum(dim=(1, 2)).clamp_min(1.0)
    mean = (d.sum(dim=(1, 2)) / n)[:, None, None]
    w = torch.where(mean > 0, d / mean.clamp_min(torch.finfo(d.dtype).tiny), torch.ones_like(d))
    return w * v


def logit_kd_map(
    student_logits: Tensor,
    teacher_logits: Tensor,
    anchors: int = 1,
    kind: str = "sigmoid",
    tau: float = 1.0,
) -> Tensor:
    """Per-position logit distillation term (B, H, W), summed over anchors (and classes).

    Logits are (B, A·K, H, W), anchor-major (torchvision and MMDetection dense heads);
    the teacher side is detached. Formulas in the module docstring.
    """
    if kind not in LOGIT_KINDS:
        raise ValueError(f"unknown logit kind {kind!r}: use one of {', '.join(LOGIT_KINDS)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: SLD needs matching heads"
        )
    b, ak, h, w = student_logits.shape
    if ak % anchors:
        raise ValueError(f"{ak} logit channels are not {anchors} anchors × K classes")
    zs = student_logits.float().reshape(b, anchors, ak // anchors, h, w) / tau
    zt = teacher_logits.detach().float().reshape(b, anchors, ak // anchors, h, w) / tau
    if kind == "softmax":
        log_pt = F.log_softmax(zt, dim=2)
        kl = (log_pt.exp() * (log_pt - F.log_softmax(zs, dim=2))).sum(dim=2)
    else:
        pt = torch.sigmoid(zt)
        kl = pt * (F.logsigmoid(zt) - F.logsigmoid(zs)) + (1 - pt) * (
            F.logsigmoid(-zt) - F.logsigmoid(-zs)
        )
        kl = kl.sum(dim=2)
    return kl.sum(dim=1) * tau**2


class SLDLoss(nn.Module):
    """SAMKD's L_SLD over the matched levels (no parameters: the weight map is detached).

    ``forward(student_logits, teacher_logits, student_feats, teacher_feats, valid)`` with dicts
    per stride; ``student_feats`` aligned to the teacher (:meth:`.SFDLoss.aligned`).
    """

    def __init__(
        self,
        levels,
        anchors: int = 1,
        kind: str = "sigmoid",
        tau: float = 1.0,
        grid: int | None = 4,
    ) -> None:
        super().__init__()
        self.levels = [int(s) for s in levels]
        if not self.levels:
            raise ValueError("no FPN level is shared by student and teacher")
        if kind not in LOGIT_KINDS:
            raise ValueError(f"unknown logit kind {kind!r}: use one of {', '.join(LOGIT_KINDS)}")
        self.anchors, self.kind, self.tau, self.grid = int(anchors), kind, float(tau), grid

    def forward(
        self,
        student_logits: dict[int, Tensor],
        teacher_logits: dict[int, Tensor],
        student_feats: dict[int, Tensor],
        teacher_feats: dict[int, Tensor],
        valid: dict[int, Tensor],
    ) -> Tensor:
        ref = next(iter(student_logits.values()))
        total = ref.new_zeros((), dtype=torch.float32) + 0.0 * ref.float().sum()
        count = ref.new_zeros((), dtype=torch.float32)
        for s in self.levels:
            if s not in student_logits or s not in teacher_logits or s not in teacher_feats:
                continue
            fs, ft, v = student_feats[s], teacher_feats[s], valid[s]
            if fs.shape != ft.shape:
                raise ValueError(
                    f"stride {s}: student feature {tuple(fs.shape)} is not aligned to the "
                    f"teacher's {tuple(ft.shape)}; pass SFDLoss.aligned(...)"
                )
            weight = feature_difference_weights(fs, ft, v, self.grid)
            kd = logit_kd_map(
                student_logits[s], teacher_logits[s], self.anchors, self.kind, self.tau
            )
            if kd.shape != v.shape:
                raise ValueError(f"stride {s}: logits {tuple(kd.shape)} vs valid {tuple(v.shape)}")
            total = total + (weight * kd).sum()
            count = count + v.sum()
        return total / count.clamp_min(1.0)
