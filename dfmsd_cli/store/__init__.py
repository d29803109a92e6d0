"""The teacher-feature store: ``dfmsd precompute`` writes it, ``dfmsd distill`` reads it.

Read API (see ``reader.py``): ``TeacherStore.open(path)``, ``store.meta``,
``store.get(index, view)``, ``store.check(...)``, ``collate_teacher(samples, batch_hw)``,
``StoreDataset``; the typed batch ``TeacherBatch``/``TeacherView`` (``batch.py``);
``store_path(cache, teacher, split)`` gives ``cache/<teacher>/<split>.zarr``.
Write side: ``precompute.precompute(ann_file, image_dir, PrecomputeOptions(...))``.
Layout and attributes: ``schema.py``.
"""

import warnings

from dfmsd_cli.store.batch import TeacherBatch, TeacherView, collate_teacher
from dfmsd_cli.store.dataset import StoreDataset
from dfmsd_cli.store.reader import StoreMeta, TeacherStore
from dfmsd_cli.store.schema import store_path

# zarr warns on opening every array of a --codec pcodec store that numcodecs codecs are not in
# the zarr v3 specification: true (other zarr implementations may not read those arrays) and
# said once in docs/store.md, not once per array
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")

__all__ = [
    "StoreDataset",
    "StoreMeta",
    "TeacherBatch",
    "TeacherStore",
    "TeacherView",
    "collate_teacher",
    "store_path",
]
