"""Training samples joined with their teacher's stored output (augmentation replay + ME inputs).

Item ``k`` of a :class:`DistillDataset` is image ``k // V`` in view ``k % V`` of the COCO dataset
(``V`` = the views shared by the dataset and the store, e.g. orig/hflip), so the engine's
:class:`~dfmsd_cli.engine.sampler.ViewSampler` draws one stored view per image and epoch and the
sample gets exactly that view's teacher features. With ME the sample also carries the
masking-enhancement input, regenerated bit-exactly from the stored parameters
(:func:`dfmsd_cli.data.enhance.regenerate`, checksum-verified) on the *original* orientation, and
the teacher's stored ``me``-view features.

Runs inside DataLoader workers: the store pickles as its path and reopens lazily.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from dfmsd_cli.data.geometry import normalize, pad_batch

_TEACHER_KEYS = ("teacher", "teacher_me", "me_image", "teacher_adv", "adv_image")


class DistillDataset(Dataset):
    """``coco`` samples (views = ``coco.views``) plus ``teacher`` (and ``teacher_me`` /
    ``me_image`` when ``me``) from ``store``; ``store_index[i]`` maps dataset image ``i`` to its
    row in the store (matched by COCO image id). ``store=None`` gives plain samples."""

    def __init__(
        self,
        coco,
        store=None,
        store_index: list[int] | None = None,
        strides: tuple[int, ...] | None = None,
        me: bool = False,
        verify_me: bool = True,
        keep_raw: bool = False,
        adv: bool = False,
    ) -> None:
        self.coco = coco
        self.store = store
        self.store_index = store_index
        self.strides = tuple(strides) if strides else None
        self.me = bool(me and store is not None)
        self.verify_me = verify_me
        self.adv = bool(adv and store is not None)
        self.keep_raw = keep_raw  # --online ME: the raw batch goes to the online teachers
        coco.keep_raw = self.me or self.adv or keep_raw

    @property
    def views(self) -> tuple[str, ...]:
        return self.coco.views

    @property
    def image_ids(self) -> list[int]:
        return self.coco.image_ids

    def __len__(self) -> int:
        return len(self.coco)

    def __getitem__(self, k: int) -> dict[str, Any] | None:
        return self.__getitems__([k])[0]

    def __getitems__(self, ks: list[int]) -> list[dict[str, Any] | None]:
        """Samples ``ks`` (the DataLoader's batched fetch, torch >= 2.1) with the teacher part
        of all of them (drawn view, ``me``, ``adv``) read by ONE
        :meth:`~dfmsd_cli.store.reader.TeacherStore.get_many`: on object storage a batch costs
        one concurrent round trip instead of one per sample; same values as item by item."""
        samples = [self.coco[k] for k in ks]
        if self.store is None:
            if not self.keep_raw:
                for s in samples:
                    if s is not None:
                        s.pop("raw", None)
            return samples
        want = [v for v, on in (("me", self.me), ("adv", self.adv)) if on]
        items: list[tuple[int, str]] = []
        for s in samples:
            if s is not None:  # the dataset may have substituted an image: its own row
                row = self.store_index[s["index"]]
                items += [(row, s["view"])] + [(row, v) for v in want]
        got = iter(self.store.get_many(items, strides=self.strides)) if items else iter(())
        for s in samples:
            if s is None:
                continue
            s["teacher"] = next(got)
            views = {v: next(got) for v in want}
            if views:  # ME and δ were made on the original orientation
                raw = s["raw"] if s["view"] == "orig" else s["raw"].flip(-1)
            if "me" in views:
                from dfmsd_cli.data.enhance import regenerate

                t_me = views["me"]
                enhanced = regenerate(raw, t_me["enhance"], verify=self.verify_me)
                s["me_image"] = normalize(enhanced, self.coco.geometry)
                s["teacher_me"] = t_me
            if "adv" in views:
                from dfmsd_cli.data.adversarial import regenerate as replay_adv

                t_adv = views["adv"]
                a = t_adv["adversarial"]
                x = replay_adv(raw, a["delta"], a["checksum"], verify=self.verify_me)
                s["adv_image"] = normalize(x, self.coco.geometry)
                s["teacher_adv"] = t_adv
            s.pop("raw", None)
        return samples


def collate_distill(samples: list[dict | None], pad_divisor: int = 32) -> dict | None:
    """:func:`dfmsd_cli.data.loader.collate` plus ``teacher``: a
    :class:`~dfmsd_cli.store.batch.TeacherBatch` whose views are batched by
    :func:`~dfmsd_cli.store.batch.collate_teacher` to the student's padded size (the drawn view
    as ``main``; ``me``/``adv`` with their regenerated inputs)."""
    from dfmsd_cli.data.loader import collate
    from dfmsd_cli.store.batch import MAIN, TeacherBatch, collate_teacher

    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    extra = [{k: s.pop(k) for k in _TEACHER_KEYS if k in s} for s in samples]
    batch = collate(samples, pad_divisor)
    if "teacher" not in extra[0]:
        return batch
    hw = tuple(batch["images"].shape[-2:])
    teacher = TeacherBatch({MAIN: collate_teacher([e["teacher"] for e in extra], hw)})
    for view in ("me", "adv"):
        if f"teacher_{view}" not in extra[0]:
            continue
        teacher.views[view] = collate_teacher([e[f"teacher_{view}"] for e in extra], hw)
        x = pad_batch([e[f"{view}_image"] for e in extra], pad_divisor)
        if tuple(x.shape[-2:]) != hw:  # same sizes as the originals by construction
            raise RuntimeError(f"{view} batch {tuple(x.shape)} != image batch {hw}")
        teacher.inputs[view] = x
    batch["teacher"] = teacher
    return batch
