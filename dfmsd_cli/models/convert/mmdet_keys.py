"""MMDetection 3.x state-dict keys -> dfmsd (torchvision-layout) keys, with tensor fixes.

Each rule maps one MMDetection key to one dfmsd key and optionally transforms the tensor,
given the shape the target model expects. The rules cover (see
``/work/shared/notes/mmdet-architectures.md`` and the MMDetection sources they cite):

* ResNet/ResNeXt backbones: ``backbone.X`` -> ``backbone.body.X``.
* Swin backbones: ``backbone.patch_embed/stages/normN`` -> torchvision ``swin_t/s`` ``features``
  layout under ``backbone.body``, with MMDetection's unfold-ordered patch-merging weights put
  back in the original Swin order (inverse of ``swin_converter.correct_unfold_*``).
* FPN: ``neck.lateral_convs.i.conv`` -> ``backbone.fpn.inner_blocks.i.0``,
  ``neck.fpn_convs.i.conv`` -> ``backbone.fpn.layer_blocks.i.0`` for the C-levels and
  ``backbone.fpn.extra_blocks.p6/p7`` for the extra convs; a GroupNorm FPN's ``.gn`` goes
  to index 1 of torchvision's conv+norm blocks and to ``extra_blocks.p6_norm/p7_norm``.
* RPN: ``rpn_head.rpn_{conv,cls,reg}`` -> ``rpn.head.{conv.0.0,cls_logits,bbox_pred}``.
* Cascade stages ``roi_head.{bbox,mask}_head.s`` -> ``roi_heads.{box,mask}_heads.s``; the softmax
  classifier's background row moves from last (MMDetection) to first (ours).
* Faster/Mask R-CNN ``roi_head.{bbox,mask}_head`` -> torchvision ``roi_heads.box_head``,
  ``box_predictor``, ``mask_head`` and ``mask_predictor``: 320 class-specific regression rows
  get 4 background rows in front (324); 80 mask logit maps get a background map in front
  when the target has 81.
* RetinaNet ``bbox_head.{cls,reg}_convs.i.conv``, ``retina_cls``, ``retina_reg`` -> torchvision
  ``head.{classification,regression}_head``. MMDetection's default ``scale_major`` anchor order
  (ratio outer, scale inner) equals torchvision's, so no channel permutation is needed.
* FCOS / GFL / RepPoints heads (``bbox_head.*``) -> ``head.*`` with the same inner names (our
  own modules), GroupNorm ``.gn`` -> ``.norm``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor

Transform = Callable[[Tensor, tuple[int, ...]], Tensor]


def _identity(t: Tensor, _shape: tuple[int, ...]) -> Tensor:
    return t


def background_first(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Softmax classifier rows [fg_0..fg_{K-1}, bg] -> [bg, fg_0..fg_{K-1}]."""
    return t.roll(1, dims=0)


def prepend_background(rows: int) -> Transform:
    """Insert ``rows`` zero rows in front when the target has exactly that many more rows
    (class-specific regression 4K -> 4(K+1); mask logits K -> K+1)."""

    def fn(t: Tensor, shape: tuple[int, ...]) -> Tensor:
        if shape and shape[0] == t.shape[0] + rows:
            return torch.cat([t.new_zeros((rows, *t.shape[1:])), t])
        return t

    return fn


def background_per_anchor(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Sigmoid classifier A*K outputs -> A*(K+1) with a never-firing background column first
    per anchor (torchvision RetinaNet keeps K+1 columns; MMDetection has K).

    The added rows have zero weights and a bias of -20 (sigmoid ~ 2e-9), so the background
    column never passes the 0.05 score threshold; dfmsd drops label 0 anyway.
    """
    if not shape or shape[0] == t.shape[0]:
        return t
    a = shape[0] - t.shape[0]
    if a <= 0 or t.shape[0] % a:
        return t
    per = t.reshape(a, t.shape[0] // a, *t.shape[1:])
    fill = -20.0 if t.dim() == 1 else 0.0
    bg = per.new_full((a, 1, *t.shape[1:]), fill)
    return torch.cat([bg, per], dim=1).reshape(shape[0], *t.shape[1:])


def unfold_to_original_reduction(t: Tensor, _shape: tuple[int, ...]) -> Tensor:
    """Inverse of MMDetection's ``correct_unfold_reduction_order`` for patch merging.

    MMDetection stores the merged 4C input channels as ``c * 4 + g`` with the 2x2 neighbours
    ``g`` in unfold order (x0, x2, x1, x3); the original Swin (and torchvision) concatenate
    ``[x0, x1, x2, x3]`` channel blocks: ``g * C + c``.
    """
    out_ch, in_ch = t.shape
    t = t.reshape(out_ch, in_ch // 4, 4).transpose(1, 2)
    return t[:, [0, 2, 1, 3], :].reshape(out_ch, in_ch)


def unfold_to_original_norm(t: Tensor, _shape: tuple[int, ...]) -> Tensor:
    """The same reorder for the patch-merging LayerNorm's 1-d weight and bias."""
    (in_ch,) = t.shape
    t = t.reshape(in_ch // 4, 4).transpose(0, 1)
    return t[[0, 2, 1, 3], :].reshape(in_ch)


Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str], Transform]


def _rule(
    pattern: str, target: str | Callable[[re.Match[str]], str], fn: Transform = _identity
) -> Rule:
    repl = target if callable(target) else (lambda m, t=target: m.expand(t))
    return re.compile(pattern), repl, fn


def _swin_stage(m: re.Match[str]) -> str:
    """MMDetection Swin stage i block j -> torchvision ``features.{2i+1}.{j}``."""
    i, j, rest = int(m.group(1)), m.group(2), m.group(3)
    rest = (
        rest.replace("attn.w_msa.", "attn.")
        .replace("ffn.layers.0.0.", "mlp.0.")
        .replace("ffn.layers.1.", "mlp.3.")
    )
    return f"backbone.body.features.{2 * i + 1}.{j}.{rest}"


def build_rules(num_laterals: int) -> list[Rule]:
    """The ordered rule list; ``num_laterals`` = number of FPN lateral convs in the source
    (its ``fpn_convs`` beyond that are the P6/P7 extra convs)."""

    def fpn_conv(m: re.Match[str]) -> str:
        i, leaf = int(m.group(1)), m.group(2)
        if i < num_laterals:
            return f"backbone.fpn.layer_blocks.{i}.0.{leaf}"
        return f"backbone.fpn.extra_blocks.p{6 + i - num_laterals}.{leaf}"

    def fpn_norm(m: re.Match[str]) -> str:
        i, leaf = int(m.group(1)), m.group(2)
        if i < num_laterals:
            return f"backbone.fpn.layer_blocks.{i}.1.{leaf}"
        return f"backbone.fpn.extra_blocks.p{6 + i - num_laterals}_norm.{leaf}"

    rpn = r"rpn_head\.rpn_"
    casc_box = r"roi_head\.bbox_head\.(\d+)\."
    casc_mask = r"roi_head\.mask_head\.(\d+)\."
    return [
        # ---- Swin (before the generic backbone rule)
        _rule(
            r"^backbone\.patch_embed\.projection\.(weight|bias)$", r"backbone.body.features.0.0.\1"
        ),
        _rule(r"^backbone\.patch_embed\.norm\.(weight|bias)$", r"backbone.body.features.0.2.\1"),
        _rule(
            r"^backbone\.stages\.(\d+)\.downsample\.reduction\.weight$",
            lambda m: f"backbone.body.features.{2 * int(m.group(1)) + 2}.reduction.weight",
            unfold_to_original_reduction,
        ),
        _rule(
            r"^backbone\.stages\.(\d+)\.downsample\.norm\.(weight|bias)$",
            lambda m: f"backbone.body.features.{2 * int(m.group(1)) + 2}.norm.{m.group(2)}",
            unfold_to_original_norm,
        ),
        _rule(r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.(.+)$", _swin_stage),
        _rule(r"^backbone\.norm(\d)\.(weight|bias)$", r"backbone.body.norms.\1.\2"),
        # ---- ResNet / ResNeXt
        _rule(r"^backbone\.(.+)$", r"backbone.body.\1"),
        # ---- FPN
        _rule(
            r"^neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)$",
            r"backbone.fpn.inner_blocks.\1.0.\2",
        ),
        _rule(r"^neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)$", fpn_conv),
        # GroupNorm FPN ("gn-neck", RepPoints): torchvision's Conv2dNormActivation index 1,
        # the on-input extra levels' ``p6_norm`` / ``p7_norm``
        _rule(
            r"^neck\.lateral_convs\.(\d+)\.gn\.(weight|bias)$", r"backbone.fpn.inner_blocks.\1.1.\2"
        ),
        _rule(r"^neck\.fpn_convs\.(\d+)\.gn\.(weight|bias)$", fpn_norm),
        # ---- RPN
        _rule(rf"^{rpn}conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1"),
        _rule(rf"^{rpn}cls\.(weight|bias)$", r"rpn.head.cls_logits.\1"),
        _rule(rf"^{rpn}reg\.(weight|bias)$", r"rpn.head.bbox_pred.\1"),
        # ---- Cascade stages
        _rule(rf"^{casc_box}shared_fcs\.0\.(weight|bias)$", r"roi_heads.box_heads.\1.fc6.\2"),
        _rule(rf"^{casc_box}shared_fcs\.1\.(weight|bias)$", r"roi_heads.box_heads.\1.fc7.\2"),
        _rule(
            rf"^{casc_box}fc_cls\.(weight|bias)$",
            r"roi_heads.box_heads.\1.cls_score.\2",
            background_first,
        ),
        _rule(rf"^{casc_box}fc_reg\.(weight|bias)$", r"roi_heads.box_heads.\1.bbox_pred.\2"),
        _rule(
            rf"^{casc_mask}convs\.(\d+)\.conv\.(weight|bias)$",
            r"roi_heads.mask_heads.\1.convs.\2.\3",
        ),
        _rule(
            rf"^{casc_mask}(upsample|conv_logits)\.(weight|bias)$", r"roi_heads.mask_heads.\1.\2.\3"
        ),
        # ---- Faster / Mask R-CNN (single stage, torchvision modules)
        _rule(r"^roi_head\.bbox_head\.shared_fcs\.0\.(weight|bias)$", r"roi_heads.box_head.fc6.\1"),
        _rule(r"^roi_head\.bbox_head\.shared_fcs\.1\.(weight|bias)$", r"roi_heads.box_head.fc7.\1"),
        _rule(
            r"^roi_head\.bbox_head\.fc_cls\.(weight|bias)$",
            r"roi_heads.box_predictor.cls_score.\1",
            background_first,
        ),
        _rule(
            r"^roi_head\.bbox_head\.fc_reg\.(weight|bias)$",
            r"roi_heads.box_predictor.bbox_pred.\1",
            prepend_background(4),
        ),
        _rule(
            r"^roi_head\.mask_head\.convs\.(\d+)\.conv\.(weight|bias)$",
            r"roi_heads.mask_head.\1.0.\2",
        ),
        _rule(
            r"^roi_head\.mask_head\.upsample\.(weight|bias)$",
            r"roi_heads.mask_predictor.conv5_mask.\1",
        ),
        _rule(
            r"^roi_head\.mask_head\.conv_logits\.(weight|bias)$",
            r"roi_heads.mask_predictor.mask_fcn_logits.\1",
            prepend_background(1),
        ),
        # ---- RetinaNet (torchvision head)
        _rule(
            r"^bbox_head\.cls_convs\.(\d+)\.conv\.(weight|bias)$",
            r"head.classification_head.conv.\1.0.\2",
        ),
        _rule(
            r"^bbox_head\.reg_convs\.(\d+)\.conv\.(weight|bias)$",
            r"head.regression_head.conv.\1.0.\2",
        ),
        _rule(
            r"^bbox_head\.retina_cls\.(weight|bias)$",
            r"head.classification_head.cls_logits.\1",
            background_per_anchor,
        ),
        _rule(r"^bbox_head\.retina_reg\.(weight|bias)$", r"head.regression_head.bbox_reg.\1"),
    ]


# head-specific alternatives tried when the first mapping's target key does not exist
# (FCOS/GFL/MMDetection-faithful RetinaNet heads keep MMDetection's inner names under ``head.``)
def fallback_key(key: str) -> str | None:
    m = re.match(r"^bbox_head\.(.+)$", key)
    if not m:
        return None
    rest = re.sub(r"\.conv\.(weight|bias)$", r".conv.\1", m.group(1))
    rest = re.sub(r"\.gn\.(weight|bias)$", r".norm.\1", rest)
    return f"head.{rest}"


# source keys that are derived buffers, never parameters: dropped when the target lacks them
IGNORABLE = re.compile(r"(num_batches_tracked|relative_position_index|attn_mask)$")
