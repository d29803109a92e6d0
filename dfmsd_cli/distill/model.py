"""The student and one stage's distillation losses as one module (what DDP wraps)."""

from __future__ import annotations

from torch import Tensor, nn

from dfmsd_cli.distill.methods import MethodConfig


class DistillModel(nn.Module):
    """The student plus one stage's loss modules; ``forward`` returns every weighted loss term.

    One module so DDP averages the gradients of the student and of the align/generation blocks
    together (``find_unused_parameters`` covers levels a batch does not reach).
    """

    def __init__(self, student: nn.Module, losses: nn.ModuleDict, cfg: MethodConfig) -> None:
        super().__init__()
        self.student = student
        self.losses = losses
        self.cfg = cfg
        self.kd_scale = 1.0  # --kd-warmup: the engine ramps this from ~0 to 1 (every KD term)

    def forward(
        self,
        images: Tensor,
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
        teacher: dict | None = None,
        me_images: Tensor | None = None,
        teacher_me: dict | None = None,
        part: str = "all",
        adv_images: Tensor | None = None,
        teacher_adv: dict | None = None,
    ) -> dict[str, Tensor]:
        """``part``: ``"all"``; or ``"main"`` (detection, stage loss, SFA), ``"me"`` (L_ME
        alone) and ``"adv"`` (L_adv alone) for a step that back-propagates them one after the
        other (the engine does, so the passes' activations are never held together)."""
        if part == "me":
            return self._me_loss(me_images, teacher_me)
        if part == "adv":
            return self.adv_loss(adv_images, teacher_adv)
        out = self.student(images, image_sizes, targets)
        losses = dict(out.losses)
        if teacher is None:
            return losses
        feats, cfg = out.features, self.cfg
        if "stage" in self.losses:
            term = self.losses["stage"](
                feats, teacher["features"], teacher["valid"], _stats(teacher), targets
            )
            losses["loss_kd"] = self.kd_scale * cfg.alpha * term
        if "sfa" in self.losses:
            term = self.losses["sfa"](feats, teacher["features"], teacher["valid"])
            losses["loss_sfa"] = self.kd_scale * cfg.gamma * term
        if part == "all":
            losses.update(self._me_loss(me_images, teacher_me))
            losses.update(self.adv_loss(adv_images, teacher_adv))
        return losses

    @property
    def has_me(self) -> bool:
        return "me" in self.losses

    def _me_loss(self, me_images: Tensor | None, teacher_me: dict | None) -> dict[str, Tensor]:
        """β·L_ME: the student's backbone+FPN on the enhanced images vs the stored me view."""
        if not self.has_me or me_images is None or teacher_me is None:
            return {}
        me_feats = self.student.extract_features(me_images)
        term = self.losses["me"](
            me_feats, teacher_me["features"], teacher_me["valid"], _stats(teacher_me)
        )
        return {"loss_me": self.kd_scale * self.cfg.beta * term}

    @property
    def has_adv(self) -> bool:
        return "adv" in self.losses

    def adv_loss(self, adv_images: Tensor | None, teacher_adv: dict | None) -> dict[str, Tensor]:
        """w_adv·L_adv: the student's backbone+FPN on the stored adversarial input vs the
        teacher's stored features on it (DFM, Eq. 8's mean reduction; docs/method.md)."""
        if not self.has_adv or adv_images is None or teacher_adv is None:
            return {}
        feats = self.student.extract_features(adv_images)
        term = self.losses["adv"](
            feats, teacher_adv["features"], teacher_adv["valid"], _stats(teacher_adv)
        )
        return {"loss_adv": self.kd_scale * self.cfg.adv_weight * term}


def _stats(t: dict) -> dict:
    return {"spatial": t["att_spatial"], "channel": t["att_channel"]}
