"""G-DetKD's two feature losses (Yao et al., ICCV 2021, arXiv 2108.07482), on RoI features of the
regions :mod:`dfmsd_cli.distill.losses.regions` picks (GT + the teacher's stored detections).

**SGFI** (semantic-guided feature imitation), per region i with teacher RoI feature T_i (7×7,
the level the RoI rule assigns) and student RoI features S_i^l from *every* student level l::

    K_i^s,l = f_embed(f_adap(S_i^l)),   K_i^t = f_embed(T_i)
    α_i^l   = softmax_l(K_i^s,l · K_i^t / τ)          τ learnable, initialised to 1
    S_i^agg = Σ_l α_i^l f_adap(S_i^l)
    L_feat  = (1/N) Σ_i MSE(S_i^agg, T_i)              (MSE: mean over C×7×7)

f_adap: a 1×1 conv to the teacher's channels, shared by the levels; f_embed: two stride-2 3×3
convs (ReLU between; 7×7 → 4×4 → 2×2) flattened to a vector (the paper's "two stride-2 convs";
the ReLU, the sharing and τ = exp(log τ) to keep it positive are our choices).

**CKD** (contrastive knowledge distillation) on region representations r^s, r^t::

    g(r^s, r^t) = exp(cos(f_θ(r^s), f_θ(r^t)) / γ)
    L_ckd = (1/N) Σ_i −log[ g(r_i^s, r_i^t) / Σ_{j ∈ A(i)} g(r_i^s, r_j^t) ]

with A(i) = {i} ∪ the other regions of the batch that are not near-duplicates of i (same image,
IoU ≥ ``dup_iou``) ∪ a FIFO queue of earlier teacher embeddings f_θ(r^t) (detached, MoCo-style;
a buffer, so it is checkpointed with the stage's loss modules and a resumed run continues with
the same queue). r^t = T_i; r^s = the student's RoI feature on the level the same rule assigns
among the student's strides, through CKD's own 1×1 adapter (our choice: CKD stays independent of
SGFI's α, so ``--no-sgfi`` and ``--no-ckd`` ablate cleanly). f_θ (our choice): two stride-2 3×3
convs (ReLU between) and a linear layer to 128 dimensions, shared by both sides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfmsd_cli.distill.losses.common import zero_loss
from dfmsd_cli.distill.losses.regions import (
    batch_regions,
    duplicate_pairs,
    pool_assigned,
    pool_levels,
    teacher_strides,
)

REGION_RULE = {"max_pos": 16, "neg_ratio": 3, "pos_iou": 0.5}  # our choices but the 1:3


def two_stride2_convs(channels: int) -> nn.Sequential:
    """f_embed: 3×3 stride-2 conv, ReLU, 3×3 stride-2 conv (7×7 → 2×2), flattened."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(inplace=False),
        nn.Conv2d(channels, channels, 3, stride=2, padding=1),
        nn.Flatten(1),
    )


def level_weights(keys_s: Tensor, key_t: Tensor, tau: Tensor | float) -> Tensor:
    """α = softmax over levels of K^s·K^t / τ: ``keys_s`` (L, N, D), ``key_t`` (N, D) → (L, N)."""
    # float32: under CUDA autocast a dot product of long fp16 keys can overflow
    return torch.softmax((keys_s.float() * key_t.float()[None]).sum(-1) / tau, dim=0)


def info_nce(
    z_s: Tensor, z_t: Tensor, queue: Tensor, gamma: float, exclude: Tensor | None = None
) -> Tensor:
    """(1/N) Σ_i −log[exp(c_ii/γ) / Σ_j exp(c_ij/γ)], c = cosine similarity of the student's
    embedding i with the teacher's j over the batch then the ``queue`` (Q, D); ``exclude``
    (N, N) bool drops batch pairs from the denominator (near-duplicates; never the diagonal)."""
    z_s, z_t = F.normalize(z_s.float(), dim=1), F.normalize(z_t.float(), dim=1)
    logits = z_s @ z_t.t() / gamma
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    if queue.numel():
        logits = torch.cat([logits, z_s @ F.normalize(queue.float(), dim=1).t() / gamma], dim=1)
    target = torch.arange(z_s.shape[0], device=z_s.device)
    return F.cross_entropy(logits, target)


class _RegionLoss(nn.Module):
    """Shared by both terms: the batch's regions from GT (``targets``) and stored detections."""

    def __init__(self, region_rule: dict | None = None) -> None:
        super().__init__()
        self.region_rule = dict(REGION_RULE if region_rule is None else region_rule)

    def regions(self, student, targets, det_boxes, det_scores) -> tuple[Tensor, Tensor]:
        ref = next(iter(student.values()))
        gt = [t["boxes"] for t in targets]
        return batch_regions(gt, det_boxes, det_scores, ref.device, **self.region_rule)


class SGFILoss(_RegionLoss):
    """L_feat of G-DetKD (module docstring): learnable f_adap, f_embed and τ."""

    def __init__(
        self, student_channels: int, teacher_channels: int, region_rule: dict | None = None
    ) -> None:
        super().__init__(region_rule)
        self.adapt = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        self.embed = two_stride2_convs(teacher_channels)
        self.log_tau = nn.Parameter(torch.zeros(()))  # τ = 1 at the start (the paper)

    def pooled_loss(self, student_rois: Tensor, teacher_rois: Tensor) -> tuple[Tensor, Tensor]:
        """(L_feat, α) from pooled student (L, N, C_s, 7, 7) and teacher (N, C_t, 7, 7)."""
        n_lv, n = student_rois.shape[:2]
        adapted = self.adapt(student_rois.flatten(0, 1))  # (L·N, C_t, 7, 7)
        keys_s = self.embed(adapted).reshape(n_lv, n, -1)
        key_t = self.embed(teacher_rois)
        alpha = level_weights(keys_s, key_t, self.log_tau.exp())
        agg = (alpha[..., None, None, None] * adapted.reshape(n_lv, n, *adapted.shape[1:])).sum(0)
        return F.mse_loss(agg, teacher_rois), alpha

    def forward(self, student, teacher, det_boxes, det_scores, targets) -> Tensor:
        rois, _ = self.regions(student, targets, det_boxes, det_scores)
        if rois.shape[0] == 0:
            return zero_loss(student)
        t_rois = pool_assigned(teacher, rois, teacher_strides(teacher))
        s_rois = pool_levels(student, rois, sorted(student))
        return self.pooled_loss(s_rois, t_rois)[0]


class CKDLoss(_RegionLoss):
    """L_ckd of G-DetKD (module docstring) with a queue of ``queue_size`` teacher embeddings."""

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        gamma: float = 0.07,
        queue_size: int = 4096,
        dup_iou: float = 0.5,
        dim: int = 128,
        region_rule: dict | None = None,
    ) -> None:
        super().__init__(region_rule)
        self.gamma, self.dup_iou = float(gamma), float(dup_iou)
        self.adapt = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        self.project = nn.Sequential(
            two_stride2_convs(teacher_channels), nn.Linear(4 * teacher_channels, dim)
        )
        # the queue is state (checkpointed with the stage): entries, write position, fill
        self.register_buffer("queue", torch.zeros(int(queue_size), dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_len", torch.zeros((), dtype=torch.long))

    def queued(self) -> Tensor:
        """The filled part of the queue (oldest entries are overwritten first)."""
        return self.queue[: int(self.queue_len)]

    @torch.no_grad()
    def enqueue(self, z_t: Tensor) -> None:
        """Write ``z_t`` (n, D) into the ring buffer (only the last Q rows if n > Q)."""
        q = self.queue.shape[0]
        if q == 0 or z_t.shape[0] == 0:
            return
        z_t = z_t[-q:].to(self.queue.dtype)
        idx = (int(self.queue_ptr) + torch.arange(z_t.shape[0], device=z_t.device)) % q
        self.queue[idx.to(self.queue.device)] = z_t.to(self.queue.device)
        self.queue_ptr.fill_((int(self.queue_ptr) + z_t.shape[0]) % q)
        self.queue_len.fill_(min(q, int(self.queue_len) + z_t.shape[0]))

    def pooled_loss(self, student_rois: Tensor, teacher_rois: Tensor, rois: Tensor) -> Tensor:
        """L_ckd from the student's (N, C_s, 7, 7) and teacher's (N, C_t, 7, 7) RoI features;
        enqueues the teacher embeddings afterwards when training."""
        z_s = self.project(self.adapt(student_rois))
        z_t = self.project(teacher_rois)
        exclude = duplicate_pairs(rois, self.dup_iou)
        loss = info_nce(z_s, z_t, self.queued().detach(), self.gamma, exclude)
        if self.training:
            self.enqueue(F.normalize(z_t.detach().float(), dim=1))
        return loss

    def forward(self, student, teacher, det_boxes, det_scores, targets) -> Tensor:
        rois, _ = self.regions(student, targets, det_boxes, det_scores)
        if rois.shape[0] == 0:
            return zero_loss(student)
        t_rois = pool_assigned(teacher, rois, teacher_strides(teacher))
        s_rois = pool_assigned(student, rois, sorted(student))
        return self.pooled_loss(s_rois, t_rois, rois)
