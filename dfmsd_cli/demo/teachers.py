"""The demo's two teachers: small checkpoints shipped in ``examples/demo_teachers/``, or trained.

The shipped files were made by ``examples/make_demo_teachers.sh`` with the project's own
``dfmsd train`` on a synthetic dataset drawn with a seed the demo never uses
(``TEACHER_DATA_SEED``), so the demo's validation images are unseen by the teachers. They are
dfmsd checkpoints whose ``state_dict`` is stored in float16 (``pack_teacher``) to keep the
repository small; ``load_weights`` loads them strictly into the float32 model.

When the files are absent (e.g. a wheel install without ``examples/``) or ``--train-teachers``
is given, the demo trains both teachers with the same recipe (``teacher_train_options``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dfmsd_cli.errors import UserError

TEACHER_DATA_SEED = 1000
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "examples" / "demo_teachers"

# The recipe of the shipped teachers (examples/make_demo_teachers.sh runs exactly this).
TEACHER_RECIPE: dict[str, Any] = {
    "images": 500,
    "val_images": 100,
    "epochs": 8,  # the schedule (warm-up, then decay at 8/12 and 11/12 of it) ...
    "max_steps": 472,  # ... stopped after its first 4 epochs (118 steps each), before any decay
    "batch_size": 4,
    "lr": 0.02,
    "warmup_iters": 100,
    "grad_clip": 35.0,
    "img_scale": (320, 256),
    "seed": 0,
}


def shipped_teacher(name: str, teacher_dir: str | Path | None = None) -> Path | None:
    """The shipped checkpoint of teacher ``name`` (``<dir>/<name>.pth``), or None if absent."""
    path = Path(teacher_dir or SHIPPED_DIR) / f"{name}.pth"
    return path if path.is_file() else None


def pack_teacher(src: str | Path, dst: str | Path) -> Path:
    """Copy a dfmsd checkpoint keeping only what inference needs, weights in float16.

    Drops optimizer/training state; floating tensors become float16 (integer buffers kept).
    The result loads strictly with ``load_weights`` (values are cast back on load).
    """
    from dfmsd_cli.models.checkpoint import is_dfmsd_checkpoint, read_checkpoint
    from dfmsd_cli.utils.io import atomic_torch_save

    ckpt = read_checkpoint(src)
    if not is_dfmsd_checkpoint(ckpt):
        raise UserError(f"{src} is not a dfmsd checkpoint: pass the model.pth of a dfmsd train run")
    state = {
        k: (v.half() if torch.is_floating_point(v) else v) for k, v in ckpt["state_dict"].items()
    }
    keep = ("format", "version", "model", "num_classes", "model_options", "categories", "geometry")
    packed = {k: ckpt[k] for k in keep if k in ckpt}
    packed["state_dict"] = state
    packed["packed"] = {"dtype": "float16", "source": Path(src).name}
    atomic_torch_save(packed, dst)
    return Path(dst)


def teacher_train_options(
    name: str,
    data: Path,
    out: Path,
    epochs: int | None = None,
    img_scale: tuple[int, int] | None = None,
    num_workers: int = 0,
    device: str = "auto",
    max_steps: int | None = None,
):
    """``TrainOptions`` of the teacher recipe (``epochs``/``img_scale``/``max_steps`` override
    it; with ``epochs`` given, the recipe's step cap is dropped)."""
    from dfmsd_cli.engine.train import TrainOptions

    r = TEACHER_RECIPE
    return TrainOptions(
        model=name,
        out=out,
        data=data,
        epochs=epochs or r["epochs"],
        batch_size=r["batch_size"],
        lr=r["lr"],
        warmup_iters=r["warmup_iters"],
        grad_clip=r["grad_clip"],
        img_scale=tuple(img_scale or r["img_scale"]),
        seed=r["seed"],
        num_workers=num_workers,
        device=device,
        evaluate=False,
        overwrite=True,
        max_steps=max_steps if (max_steps or epochs) else r["max_steps"],
    )
