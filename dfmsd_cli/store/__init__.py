"""The teacher-feature store: ``dfmsd precompute`` writes it, ``dfmsd distill`` reads it.

Read API (see ``reader.py``): ``TeacherStore.open(path)``, ``store.meta``,
``store.get(index, view)``, ``store.check(...)``, ``collate_teacher(samples, batch_hw)``,
``StoreDataset``; the typed batch ``TeacherBatch``/``TeacherView`` (``batch.py``);
``store_path(cache, teacher, split)`` gives ``cache/<teacher>/<split>.zarr``.
Write side: ``precompute.precompute(ann_file, image_dir, PrecomputeOptions(...))``.
Layout and attributes: ``schema.py``.
"""

from dfmsd_cli.store.batch import TeacherBatch, TeacherView, collate_teacher
from dfmsd_cli.store.dataset import StoreDataset
from dfmsd_cli.store.reader import StoreMeta, TeacherStore
from dfmsd_cli.store.schema import store_path

__all__ = [
    "StoreDataset",
    "StoreMeta",
    "TeacherBatch",
    "TeacherStore",
    "TeacherView",
    "collate_teacher",
    "store_path",
]
