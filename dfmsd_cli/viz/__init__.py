"""``dfmsd viz``: figures of stores, masks, features, runs, comparisons and detections.

matplotlib with the headless Agg backend (set in :mod:`dfmsd_cli.viz.common`). Modules, one
concept each: ``overlay`` (level maps onto the image, the shared PCA basis), ``source`` (store
records, live teacher records, pixels), ``store_fig``, ``masks_fig``, ``features_fig``,
``run_curves``, ``compare_bars``, ``detections_fig``; ``commands`` reads inputs and saves.
"""

from dfmsd_cli.viz.commands import (
    viz_compare,
    viz_detections,
    viz_features,
    viz_masks,
    viz_run,
    viz_store,
)

__all__ = ["viz_compare", "viz_detections", "viz_features", "viz_masks", "viz_run", "viz_store"]
