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
from dfmsd_cli.distill.losses.sfd import SFDLevel, SFDLoss, max_pool_valid
from dfmsd_cli.distill.losses.sld import SLDLoss, feature_difference_weights, logit_kd_map
from dfmsd_cli.distill.losses.windows import (
    window_ids,
    window_masks,
    windowed_channel_mask,
    windowed_channel_stat,
    windowed_spatial_attention,
    windowed_spatial_mask,
)

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
    "SFDLevel",
    "SFDLoss",
    "SLDLoss",
    "channel_attention",
    "dual_masks",
    "feature_difference_weights",
    "finest_levels",
    "foreground_background_masks",
    "generation_loss",
    "logit_kd_map",
    "match_levels",
    "max_pool_valid",
    "pkd_level_loss",
    "raw_statistics",
    "select_fraction",
    "spatial_attention",
    "window_ids",
    "window_masks",
    "windowed_channel_mask",
    "windowed_channel_stat",
    "windowed_spatial_attention",
    "windowed_spatial_mask",
]
