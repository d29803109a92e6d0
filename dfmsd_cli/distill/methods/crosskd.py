"""``crosskd``: L_det + α·L_cls^KD + β·L_reg^KD on cross-head predictions, one stage with the
last teacher (CrossKD, Wang et al., CVPR 2024; ``distill/losses/crosskd.py`` has the math).

Store-only: the teacher's *head* is the only teacher part loaded at training time. Its weights
come from the checkpoint the store records (attribute ``weights.path``, or
``--crosskd-teacher-weights``), read with ``weights_only=True`` and memory-mapped so only the
head's tensors are paged in; the file is checked against the store's weight fingerprint. The
teacher's own predictions are its head run on the stored FPN maps.

Pairs: student and teacher of one head family with CrossKD hooks — ``gfl`` (the official
``crosskd_*_gflv1_*`` recipe), ``mmfcos`` (``crosskd_*_fcos_*``) or ``retina``
(``crosskd_*_retinanet_*``) — same classes, same FPN/tower width, same strides; any other pair
is a one-line error. Defaults (the official configs): GFL crossing point i = 3
(``--crosskd-index``), α = 1 (KD-QFL, β_QFL = 1), β = 1 (the KL on the DFL distributions,
T = 1; its official weight 4 and ``avg_factor`` 4 cancel); FCOS i = 2, α = 0.4, β = 0.75 (the
IoU loss); RetinaNet i = 3, α = 1, β = 1 (GIoU on the decoded boxes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from dfmsd_cli.distill.methods.registry import (
    LossTerm,
    MethodConfig,
    MethodOption,
    MethodSpec,
    StoreNeeds,
    register_method,
)
from dfmsd_cli.errors import UserError

FAMILIES = ("gfl", "mmfcos", "retina")  # heads with CrossKD hooks (gfl.py, mmfcos.py, dense.py)
DEFAULT_INDEX = {"gfl": 3, "mmfcos": 2, "retina": 3}  # official reused_teacher_head_idx


def _check_index(v: Any) -> str | None:
    if int(v) < 0:
        return f"must be a tower conv index >= 0 (0: cross at the FPN maps), got {v}"
    return None


def _head_of(model_name: str) -> str:
    from dfmsd_cli.models.registry import get_spec

    return get_spec(model_name).head


def streamed_sha256(state: dict, float_dtype=None) -> str:
    """:func:`dfmsd_cli.store.schema.state_dict_sha256` of the state dict as a float32 model
    holds it after loading ``state``, one tensor at a time (a memory-mapped file is never
    materialised whole): floating tensors are hashed as float32, others as stored."""
    import torch

    float_dtype = float_dtype or torch.float32
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not hasattr(t, "detach"):
            continue
        a = t.detach().cpu()
        if a.is_floating_point():
            a = a.to(float_dtype)
        a = a.contiguous()
        h.update(f"{name}|{a.dtype}|{tuple(a.shape)}|".encode())
        if a.numel():
            h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes())
        del a
    return h.hexdigest()


def load_teacher_head(
    path: str, teacher: str, channels: int, num_classes: int, num_levels: int,
    fingerprint: str | None = None,
):  # fmt: skip
    """The teacher's head (GFL or MMDetection FCOS, by ``teacher``'s registered head) with its
    weights from ``path`` (memory-mapped, ``weights_only``),
    frozen; ``fingerprint`` (the store's ``weights.sha256``) is checked on the whole file's
    state dict, streamed tensor by tensor."""
    from dfmsd_cli.models.checkpoint import _state_dict_of, is_dfmsd_checkpoint
    from dfmsd_cli.models.gfl import GFLHead
    from dfmsd_cli.models.mmfcos import MMFCOSHead
    from dfmsd_cli.models.state_dict import load_state_strict
    from dfmsd_cli.utils.safe_load import load_pth

    obj = load_pth(path, what="teacher weights file", mmap=True)
    state = _state_dict_of(obj, path)
    if fingerprint and streamed_sha256(state) != fingerprint:
        raise UserError(
            f"teacher weights {path} are not the ones the store was precomputed with (their "
            "fingerprint differs): pass --crosskd-teacher-weights with the file precompute used"
        )
    options = obj.get("model_options", {}) if is_dfmsd_checkpoint(obj) else {}
    if _head_of(teacher) == "mmfcos":
        head = MMFCOSHead(channels, num_classes, num_levels)
    elif _head_of(teacher) == "retina":
        from torchvision.models.detection.retinanet import RetinaNetHead

        from dfmsd_cli.models.dense import RetinaHeadSplit, _group_norm

        gn = "head.classification_head.conv.0.1.weight" in state  # a GN head (head_norm=gn)
        anchors = state["head.classification_head.cls_logits.bias"].numel() // (num_classes + 1)
        tv = RetinaNetHead(
            channels, anchors, num_classes + 1, norm_layer=_group_norm if gn else None
        )
        split = RetinaHeadSplit(tv)  # its keys are the detector's: head.*
        own = {k: v for k, v in state.items() if k.startswith("head.")}
        load_state_strict(split, own, path, target=f"the {teacher} head")
        del obj, state, own
        return split.eval().requires_grad_(False)
    else:
        head = GFLHead(channels, num_classes, num_levels, int(options.get("reg_max", 16)))
    own = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
    load_state_strict(head, own, path, target=f"the {teacher} head")
    del obj, state, own
    return head.eval().requires_grad_(False)


def stored_logits_gap(store, head, rows: range | list[int] = range(1)) -> float:
    """max |z − z_stored| of the class logits of the teacher ``head`` run on the stored FPN maps
    vs the logits the store holds (``precompute --store-logits``) over ``rows`` (orig view):
    the head alone reproduces the teacher (float16 storage: a few 1e-3, docs/method.md)."""
    import torch

    meta, gap = store.meta, 0.0
    for i in rows:
        got = store.get(int(i), "orig")
        for level, s in enumerate(meta.strides):
            with torch.no_grad():
                z, _ = head.forward_from(*head.towers_until(got["features"][s].float()[None], 0),
                                         level, 0)  # fmt: skip
            gap = max(gap, float((z[0] - got["logits"][s].float()).abs().max()))
    return gap


def pair_problem(student, meta, channels: int, index: int) -> str | None:
    """Why CrossKD cannot cross ``student`` with the store's teacher (None: it can)."""
    s_head, t_head = _head_of(student.name), _head_of(meta.teacher)
    if s_head not in FAMILIES or t_head != s_head:
        return (
            f"crosskd needs a student and a teacher of the same head family with CrossKD hooks "
            f"({', '.join(FAMILIES)}); got student {student.name} ({s_head}) and teacher "
            f"{meta.teacher} ({t_head}): use e.g. --student gfl_tiny with a gfl teacher store"
        )
    if meta.num_classes and meta.num_classes != student.num_classes:
        return (
            f"the teacher store has {meta.num_classes} classes and the student "
            f"{student.num_classes}: precompute the teacher on the student's dataset"
        )
    if channels != student.out_channels:
        return (
            f"the teacher head is {channels} channels wide and the student's "
            f"{student.out_channels}: crosskd feeds student tower features to the teacher head "
            "unadapted; use a student with the teacher's FPN width"
        )
    if tuple(meta.strides) != tuple(student.strides):
        return (
            f"the teacher store has strides {list(meta.strides)} and the student "
            f"{list(student.strides)}: use a student with the teacher's FPN levels"
        )
    convs = len(getattr(student.head, "cls_convs", None) or student.head.classification_head.conv)
    if index > convs:
        return f"--crosskd-index {index} is past the {convs} tower convs: use 0..{convs}"
    return None


def with_stores(
    cfg: MethodConfig, student, stores, online: bool, teachers: Sequence[str] = ()
) -> MethodConfig:
    """Check the pair and record the teacher head to load (model, weights file, fingerprint)."""
    if online:
        raise UserError(
            "crosskd loads only the teacher's head and reads its FPN maps from the store: "
            "drop --online"
        )
    if not stores:
        return cfg
    meta = stores[-1].store.meta
    index = int(cfg.loss_kwargs.get("index", DEFAULT_INDEX.get(_head_of(student.name), 3)))
    problem = pair_problem(student, meta, meta.channels, index)
    if problem:
        raise UserError(problem)
    path = cfg.loss_kwargs.get("teacher_weights") or (meta.attrs.get("weights") or {}).get("path")
    if not path:
        raise UserError(
            f"store {meta.path} records no teacher weights file (a random-init teacher): "
            "pass --crosskd-teacher-weights PATH"
        )
    if not Path(path).is_file():
        raise UserError(
            f"teacher weights {path} (recorded by store {meta.path}) not found: pass "
            "--crosskd-teacher-weights PATH to the file precompute used"
        )
    kw = {**cfg.loss_kwargs, "index": index, "teacher": meta.teacher,
          "kind": _head_of(meta.teacher),
          "teacher_weights": str(path), "teacher_channels": int(meta.channels),
          "teacher_strides": [int(s) for s in meta.strides],
          "num_classes": int(student.num_classes),
          "fingerprint": meta.fingerprints.get("weights_sha256")}  # fmt: skip
    return replace(cfg, loss_kwargs=kw)


def build_crosskd(cfg, levels, student_channels, teacher_channels):
    from dfmsd_cli.distill.losses.crosskd import CrossKDLoss

    kw = cfg.loss_kwargs
    strides = list(kw["teacher_strides"])
    head = load_teacher_head(
        kw["teacher_weights"], kw["teacher"], int(kw["teacher_channels"]),
        int(kw["num_classes"]), len(strides), kw.get("fingerprint"),
    )  # fmt: skip
    return CrossKDLoss(
        head, levels, {s: strides.index(s) for s in levels}, kw["index"], kw["qfl_beta"],
        kw["temperature"], kw["kind"],
    )  # fmt: skip


def build_reg(cfg, levels, student_channels, teacher_channels):
    """The second term reads the first's L_reg (one cross-head pass for both): no module."""
    from torch import nn

    return nn.Module()


def call_cls(mod, feats, teacher, targets, student=None, peers=None):
    """``L_cls`` of the cross-head pass; keeps ``L_reg`` for :func:`call_reg`."""
    maps = [feats[s] for s in student.strides]
    head, anchors = student.head, None
    if mod.kind == "mmfcos":  # the positives' centerness-target sum; else the positives
        norm = student.centerness_norm(maps, targets)
    else:
        norm = student.num_positives(maps, targets)
    if mod.kind == "retina":
        from dfmsd_cli.models.dense import RetinaHeadSplit

        head = RetinaHeadSplit(student.head)
        anchors = dict(zip(student.strides, student.level_anchors(maps), strict=True))
    cls, reg = mod(head, feats, teacher.features, teacher.valid, norm, anchors)
    mod.pending_reg = reg
    return cls


def call_reg(mod, feats, teacher, targets, student=None, peers=None):
    """``L_reg`` of the pass :func:`call_cls` just ran (same step, same view)."""
    main = peers["crosskd"]
    reg, main.pending_reg = main.pending_reg, None
    if reg is None:
        raise RuntimeError("crosskd: loss_reg_kd computed before loss_cls_kd")
    return reg


OPTIONS = (
    MethodOption("crosskd_index", int, None, "crosskd: the tower conv the student's features "
                 "cross into the teacher head after (official GFL: 3; 0: at the FPN maps).",
                 "the crossing point", check=_check_index, target="index", kwarg=True),
    MethodOption("crosskd_teacher_weights", str, None, "crosskd: the teacher checkpoint to take "
                 "the head from (default: the file the store records, weights.path).",
                 "the teacher head's weights", target="teacher_weights", kwarg=True),
)  # fmt: skip

_DEFAULTS = {
    "alpha": 1.0,  # KD-QFL (official loss_cls_kd weight)
    "beta": 1.0,  # KL on the DFL bins (official weight 4 / avg_factor 4)
    "loss_kwargs": {"qfl_beta": 1.0, "temperature": 1.0},
}

register_method(
    MethodSpec(
        "crosskd",
        "L_det + α·KD-QFL + β·(KL on DFL bins | IoU | GIoU) of the student's towers run through "
        "the teacher's head, one stage (CrossKD, CVPR 2024); gfl, mmfcos and retina pairs",
        terms=(
            LossTerm("loss_cls_kd", "crosskd", build_crosskd, "alpha", call=call_cls, student=True),
            LossTerm("loss_reg_kd", "crosskd_reg", build_reg, "beta", call=call_reg, student=True),
        ),  # fmt: skip
        defaults={"one_stage": _DEFAULTS},
        head_defaults={"mmfcos": {"alpha": 0.4, "beta": 0.75}},  # the official FCOS config
        # (RetinaNet's: α = 1 KD-QFL, β = 1 GIoU, i = 3, the defaults)
        store=StoreNeeds(),
        stage_loss="crosskd",
        options=OPTIONS,
        with_stores=with_stores,
    )
)
