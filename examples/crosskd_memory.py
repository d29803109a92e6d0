"""What CrossKD's teacher costs at training time: its head alone vs the whole teacher.

    python examples/crosskd_memory.py TEACHER.pth [--make gfl_r101 --classes 80]

``--make NAME`` first writes a random-init dfmsd checkpoint of NAME to TEACHER.pth (the
parameter count, not the values, decides the memory). Then, each in a fresh process: the
whole teacher rebuilt and loaded (``build_from_checkpoint``, what an online CrossKD holds) and
the head alone (``load_teacher_head``), and the head with the check of the whole file against
the store's fingerprint (what ``dfmsd distill --method crosskd`` does: it streams every tensor
of the memory-mapped file once), with
parameter bytes and the process's peak RSS (``VmHWM``) after loading.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def _measure(kind: str, path: str, meta: dict) -> dict:
    import torch  # imported before the baseline reading: both kinds pay for it

    from dfmsd_cli.distill.methods.crosskd import load_teacher_head
    from dfmsd_cli.models.checkpoint import build_from_checkpoint

    base = _hwm_mb()
    if kind == "whole":
        model, _ = build_from_checkpoint(path)
    else:
        sha = meta["sha256"] if kind == "head+check" else None  # the store's fingerprint check
        model = load_teacher_head(path, meta["model"], meta["channels"], meta["classes"], 5, sha)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    import gc

    gc.collect()
    return {"param_MB": params / 2**20, "peak_rss_MB": _hwm_mb(), "rss_before_MB": base,
            "rss_after_MB": _status_mb("VmRSS:"),
            "torch": torch.__version__}  # fmt: skip


def _hwm_mb() -> float:
    """This process's peak RSS (``VmHWM``; unlike ``ru_maxrss`` not inherited from the parent
    across fork + exec), MB."""
    return _status_mb("VmHWM:")


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(_measure(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--make")
    ap.add_argument("--classes", type=int, default=80)
    a = ap.parse_args()
    from dfmsd_cli.models import build_model
    from dfmsd_cli.models.checkpoint import read_checkpoint, save_checkpoint

    if a.make:
        save_checkpoint(a.path, build_model(a.make, num_classes=a.classes))
    obj = read_checkpoint(a.path)
    model, k = obj["model"], int(obj["num_classes"])
    from dfmsd_cli.distill.methods.crosskd import streamed_sha256
    from dfmsd_cli.models.checkpoint import _state_dict_of
    from dfmsd_cli.models.registry import get_spec

    sha = streamed_sha256(_state_dict_of(obj, a.path))
    meta = json.dumps({"model": model, "channels": get_spec(model).channels, "classes": k,
                       "sha256": sha})  # fmt: skip
    del obj
    for kind in ("whole", "head", "head+check"):
        out = subprocess.run([sys.executable, __file__, "--child", kind, a.path, meta],
                             capture_output=True, text=True, check=True)  # fmt: skip
        r = json.loads(out.stdout)
        print(f"{model} {kind:10s}: parameters {r['param_MB']:.1f} MB, peak RSS "
              f"{r['peak_rss_MB']:.0f} MB, RSS held after loading {r['rss_after_MB']:.0f} MB "
              f"(after imports {r['rss_before_MB']:.0f} MB)")  # fmt: skip


if __name__ == "__main__":
    main()
