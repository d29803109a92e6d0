"""Feature-distillation losses on FPN maps ``{stride: (B, C, H, W)}`` (see docs/method.md)."""

from dfmsd_cli.distill.losses.amd import AMD_DEFAULTS, AMDLevel, AMDLoss, attention_spatial_mask
from dfmsd_cli.distill.losses.common import (
    MASK_RULES,
    GenerationBlock,
    SEBlock,
    channel_attention,
    generation_loss,
    match_levels,
    raw_statistics,
    select_fraction,
    spatial_attention,
)
from dfmsd_cli.distill.losses.dual_masking import DualMaskingLevel, DualMaskingLoss, dual_masks
from dfmsd_cli.distill.losses.fgd import FGDLevel, FGDLoss, foreground_background_masks
from dfmsd_cli.distill.losses.fkd import FKD_DEFAULTS, FKDLevel, FKDLoss, RelationBlock, fkd_masks
from dfmsd_cli.distill.losses.mgd import MGDLevel, MGDLoss
from dfmsd_cli.distill.losses.sfa import SFALevel, SFALoss, finest_levels, pkd_level_loss

__all__ = [
    "AMD_DEFAULTS",
    "AMDLevel",
    "AMDLoss",
    "FKD_DEFAULTS",
    "FKDLevel",
    "FKDLoss",
    "RelationBlock",
    "attention_spatial_mask",
    "fkd_masks",
    "MASK_RULES",
    "DualMaskingLevel",
    "DualMaskingLoss",
    "FGDLevel",
    "FGDLoss",
    "GenerationBlock",
    "MGDLevel",
    "MGDLoss",
    "SEBlock",
    "SFALevel",
    "SFALoss",
    "channel_attention",
    "dual_masks",
    "finest_levels",
    "foreground_background_masks",
    "generation_loss",
    "match_levels",
    "pkd_level_loss",
    "raw_statistics",
    "select_fraction",
    "spatial_attention",
]
