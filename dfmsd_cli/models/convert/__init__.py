"""Import checkpoints from other frameworks (MMDetection) into dfmsd checkpoints."""

from dfmsd_cli.models.convert.mmdet import (
    ConversionReport,
    convert_mmdet,
    convert_state_dict,
    load_mmdet_checkpoint,
)

__all__ = ["ConversionReport", "convert_mmdet", "convert_state_dict", "load_mmdet_checkpoint"]
