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
    ) -> dict[str, Tensor]:
        """``part``: ``"all"``; or ``"main"`` (detection, stage loss, SFA) and ``"me"`` (L_ME
        alone) for a step that back-propagates them one after the other (the engine does, so
        the ME pass's activations are not held together with the main pass's)."""
        if part == "me":
            return self._me_loss(me_images, teacher_me)
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


def _stats(t: dict) -> dict:
    return {"spatial": t["att_spatial"], "channel": t["att_channel"]}
