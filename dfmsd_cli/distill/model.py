"""The student and one stage's distillation losses as one module (what DDP wraps)."""

from __future__ import annotations

from torch import Tensor, nn

from dfmsd_cli.distill.methods import LossTerm, MethodConfig
from dfmsd_cli.store.batch import MAIN, TeacherBatch


class DistillModel(nn.Module):
    """The student plus one stage's loss modules; ``forward`` returns every weighted loss term.

    The terms are those the method's spec declares (``MethodSpec.terms``) whose module the stage
    built (``losses[term.key]``): each is ``kd_scale · term.weight_of(cfg) · term.call(module,
    student maps, teacher view, targets)``. Terms on the ``main`` view use the student's
    training forward; terms on an extra view (``me``, ``adv``) run the student's backbone+FPN
    on that view's input. One module so DDP averages the gradients of the student and of the
    align/generation blocks together (``find_unused_parameters`` covers levels a batch does
    not reach).
    """

    def __init__(self, student: nn.Module, losses: nn.ModuleDict, cfg: MethodConfig) -> None:
        super().__init__()
        self.student = student
        self.losses = losses
        self.cfg = cfg
        self.kd_scale = 1.0  # --kd-warmup: the engine ramps this from ~0 to 1 (every KD term)
        self.terms: dict[str, list[LossTerm]] = {}  # view -> its built terms, in spec order
        for term in cfg.spec.terms:
            if term.key in losses:
                self.terms.setdefault(term.view, []).append(term)
        # whether a main-view term reads the student's class logits (fixed for the stage)
        self.main_logits = any(t.logits for t in self.terms.get(MAIN, []))

    @property
    def extra_views(self) -> list[str]:
        """The views besides ``main`` with terms in this stage (their own passes), in order."""
        return [v for v in self.terms if v != MAIN]

    def forward(
        self,
        images: Tensor,
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
        teacher: TeacherBatch | None = None,
        part: str = "all",
    ) -> dict[str, Tensor]:
        """``part``: ``"all"``; or ``"main"`` (detection and the main-view terms) and an extra
        view's name (its terms alone) for a step that back-propagates them one after the other
        (the engine does, so the passes' activations are never held together)."""
        if part not in ("all", MAIN):
            return self.view_losses(part, teacher, targets)
        logits = teacher is not None and self.main_logits
        if logits:
            out = self.student(images, image_sizes, targets, return_logits=True)
        else:
            out = self.student(images, image_sizes, targets)
        losses = dict(out.losses)
        if teacher is None:
            return losses
        kd = self._terms(MAIN, out.features, teacher, targets, out.logits if logits else None)
        if part == "all":
            for view in self.extra_views:
                kd.update(self.view_losses(view, teacher, targets))
        return _join(losses, kd)

    def view_losses(
        self, view: str, teacher: TeacherBatch | None, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """The terms on extra view ``view``: the student's backbone+FPN on its input vs the
        teacher's stored features of it (nothing when the batch lacks the view)."""
        if view not in self.terms or teacher is None or not teacher.has(view):
            return {}
        feats = self.student.extract_features(teacher.inputs[view])
        return self._terms(view, feats, teacher, targets)

    def _terms(
        self, view: str, feats, teacher: TeacherBatch, targets, logits: dict | None = None
    ) -> dict[str, Tensor]:
        t = teacher.views[view]
        out = {}
        for term in self.terms.get(view, []):
            extra = {"logits": logits, "peers": self.losses} if term.logits else {}
            if term.student:
                extra.update(student=self.student, peers=self.losses)
            loss = term.call(self.losses[term.key], feats, t, targets, **extra)
            out[term.metric] = self.kd_scale * term.weight_of(self.cfg) * loss
        return out


def _join(det: dict[str, Tensor], kd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The detector's losses and the KD terms in one dict. A term whose metric names one of
    the detector's losses (e.g. ``loss_cls``) would silently replace it: a method bug."""
    clash = det.keys() & kd.keys()
    if clash:
        raise RuntimeError(
            f"KD term(s) {sorted(clash)} have the name of a detector loss and would replace it: "
            "give the LossTerm another metric (e.g. loss_cls_kd)"
        )
    return {**det, **kd}
