"""MMDetection -> dfmsd parity: same weights, same image, compare FPN levels and detections.

A developer tool, not imported by the package and not run by CI (it needs MMDetection; see
``docs/mmdet_parity.md`` for the install recipe on a machine without mmcv's compiled ops).

For each MMDetection config (name from MMDetection 3.3's own ``configs/``, e.g.
``retinanet_r50_fpn_2x_coco``) and its dfmsd model:

1. build the model with MMDetection itself (``MODELS.build``), with random weights
   (``init_weights()`` under ``--seed``) or a ``--checkpoint``;
2. save it as an MMDetection checkpoint, convert it with ``dfmsd convert mmdet`` (the same
   ``convert_mmdet`` the CLI calls) and load the result strictly as ``--weights`` does;
3. run both on the same real image at each ``--size`` (float32, eval) and report, per FPN
   level, the max absolute and relative difference (max|a-b| / max|a|), and how many of
   MMDetection's final detections (top 100) dfmsd reproduces (same label, IoU >= 0.99,
   |score difference| <= 1e-3).

Examples::

    /work/venvs/mmdet/bin/python tools/mmdet_parity.py retinanet_r50_fpn_2x_coco mmretina_r50
    /work/venvs/mmdet/bin/python tools/mmdet_parity.py --all --size 320,448 --size 224,320 \\
        --markdown /tmp/parity.md

mmcv's compiled ops (``mmcv._ext``) are replaced by :func:`stub_mmcv_ext`: ``nms`` and
``roi_align_forward`` on ``torchvision.ops`` (the only ones these configs call at inference),
``deform_conv_forward`` (RepPoints' deformable convs and DCN backbones) on
``torchvision.ops.deform_conv2d``; every other op raises when called.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
COCO_IMAGES = Path("/work/shared/data/coco2017-subset/val2017")

# MMDetection 3.3 config -> the dfmsd model that reproduces it (dfmsd convert mmdet targets)
PAIRS: dict[str, str] = {
    "retinanet_r50_fpn_2x_coco": "mmretina_r50",
    "retinanet_r101_fpn_2x_coco": "mmretina_r101",
    "retinanet_x101-64x4d_fpn_1x_coco": "mmretina_x101",
    "retinanet_swin-t-p4-w7_fpn_1x_coco": "mmretina_swin_t",
    "fcos_r50-caffe_fpn_gn-head_1x_coco": "mmfcos_r50_caffe",
    "fcos_r101-caffe_fpn_gn-head_ms-640-800-2x_coco": "mmfcos_r101_caffe",
    "fcos_x101-64x4d_fpn_gn-head_ms-640-800-2x_coco": "mmfcos_x101",
    "gfl_r50_fpn_1x_coco": "gfl_r50",
    "gfl_r101_fpn_ms-2x_coco": "gfl_r101",
    "gfl_x101-32x4d_fpn_ms-2x_coco": "gfl_x101_32x4d",
    "faster-rcnn_r50_fpn_1x_coco": "mmfrcnn_r50",
    "mask-rcnn_r50_fpn_1x_coco": "mmmrcnn_r50",
    "mask-rcnn_swin-t-p4-w7_fpn_1x_coco": "mmmrcnn_swin_t",
    "mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco": "mmmrcnn_swin_s",
    "cascade-mask-rcnn_r50_fpn_1x_coco": "cmr_r50",
    "cascade-mask-rcnn_r101_fpn_1x_coco": "cmr_r101",
    "cascade-mask-rcnn_x101-32x4d_fpn_20e_coco": "cmr_x101_32x4d",
    "cascade-mask-rcnn_x101-64x4d_fpn_20e_coco": "cmr_x101",
    "cascade-mask-rcnn_r50-caffe_fpn_1x_coco": "cmr_r50_caffe",
    "cascade-mask-rcnn_r101-caffe_fpn_1x_coco": "cmr_r101_caffe",
    "reppoints-moment_r50_fpn-gn_head-gn_1x_coco": "reppoints_r50",
    "reppoints-moment_r50_fpn_1x_coco": "reppoints_r50_nogn",
    "reppoints-moment_r101_fpn-gn_head-gn_2x_coco": "reppoints_r101",
    "reppoints-moment_r101-dconv-c3-c5_fpn-gn_head-gn_2x_coco": "reppoints_r101_dcn",
    "reppoints-moment_x101-dconv-c3-c5_fpn-gn_head-gn_2x_coco": "reppoints_x101_32x4d_dcn",
}
# dfmsd model options a config needs (``convert_mmdet(options=...)``); none at present
PAIR_OPTIONS: dict[str, dict] = {}


# ------------------------------------------------------------------------ MMDetection side
def stub_mmcv_ext() -> None:
    """Install a ``mmcv._ext`` (mmcv-lite ships none) whose ``nms`` and ``roi_align_forward``
    run ``torchvision.ops``; any other compiled op raises NotImplementedError when called.

    ``mmcv.ops.nms`` calls ``ext.nms(boxes, scores, iou_threshold, offset)`` -> kept indices
    by decreasing score (torchvision's contract; ``offset=1`` is the legacy +1 box width);
    ``mmcv.ops.RoIAlign`` calls ``ext.roi_align_forward(...)`` filling ``output`` in place
    (``pool_mode`` 1 = avg, the only mode these configs use; torchvision's ``roi_align`` is
    the same bilinear average with the same adaptive ``sampling_ratio=0``).
    """
    if "mmcv._ext" in sys.modules:
        return
    ext = types.ModuleType("mmcv._ext")

    def nms(boxes, scores, iou_threshold: float, offset: int = 0):
        if offset:
            boxes = boxes.clone()
            boxes[:, 2:] += offset
        return torchvision.ops.nms(boxes.float(), scores.float(), float(iou_threshold))

    def roi_align_forward(
        inp, rois, output, argmax_y, argmax_x, *, aligned_height, aligned_width,
        spatial_scale, sampling_ratio, pool_mode, aligned,
    ):  # fmt: skip
        if pool_mode != 1:
            raise NotImplementedError("roi_align max pooling is not mapped onto torchvision")
        output.copy_(
            torchvision.ops.roi_align(
                inp, rois, (aligned_height, aligned_width), spatial_scale, sampling_ratio, aligned
            )
        )

    def missing(name: str):
        def fn(*args, **kwargs):
            raise NotImplementedError(f"mmcv._ext.{name} (compiled mmcv op) is not available")

        return fn

    def getattr_(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return missing(name)

    def deform_conv_forward(
        inp, weight, offset, output, columns, ones, *, kW, kH, dW, dH, padW, padH,
        dilationW, dilationH, group, deformable_group, im2col_step,
    ):  # fmt: skip
        # mmcv's (dy, dx) per kernel position, row-major, is torchvision's offset layout;
        # groups and offset groups follow from the weight / offset shapes there
        groups_ok = weight.shape[1] * group == inp.shape[1]
        if not groups_ok or offset.shape[1] != 2 * deformable_group * kH * kW:
            raise ValueError("deform_conv_forward: unexpected group / offset shapes")
        output.copy_(
            torchvision.ops.deform_conv2d(
                inp, offset, weight, stride=(dH, dW), padding=(padH, padW),
                dilation=(dilationH, dilationW),
            )
        )  # fmt: skip

    ext.nms = nms
    ext.deform_conv_forward = deform_conv_forward
    ext.roi_align_forward = roi_align_forward
    ext.__getattr__ = getattr_
    sys.modules["mmcv._ext"] = ext


def mmdet_config(name: str):
    """MMDetection's own config ``name`` (from the installed package's ``.mim/configs``), with
    pretrained-backbone downloads switched off."""
    import mmdet
    from mmengine.config import Config

    root = Path(mmdet.__file__).parent / ".mim" / "configs"
    found = sorted(root.glob(f"*/{name}.py"))
    if not found:
        raise SystemExit(f"no MMDetection config {name} under {root}")
    cfg = Config.fromfile(str(found[0]))
    cfg.model.backbone.init_cfg = None
    return cfg


def build_mmdet(name: str, checkpoint: str | None, seed: int):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    cfg = mmdet_config(name)
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    if checkpoint:
        from mmengine.runner import load_checkpoint

        load_checkpoint(model, checkpoint, map_location="cpu", strict=True)
    else:
        model.init_weights()
    return model.eval(), cfg


# the configs' final classification / regression layers (sigmoid: RetinaNet, FCOS, GFL, RPN;
# softmax: R-CNN box heads, ``fc_cls`` with the background last)
CLS_LAYERS = (
    "retina_cls", "conv_cls", "gfl_cls", "rpn_cls", "fc_cls", "conv_centerness",
    "reppoints_cls_out",
)  # fmt: skip
REG_LAYERS = ("retina_reg", "conv_reg", "gfl_reg", "rpn_reg", "fc_reg")
# RepPoints' point layers: offsets in stride units, drawn at std 1 (boxes about a stride wide)
POINT_LAYERS = ("reppoints_pts_init_out", "reppoints_pts_refine_out")
# DCN backbones' offset convs (``DeformConv2dPack.conv_offset``, zero-initialised: the DCN would
# run as a plain conv), drawn so that the offsets spread about half a pixel
OFFSET_LAYERS = ("conv_offset",)


def calibrate_heads(model, bgr: np.ndarray, passes: int = 4, softmax_std: float = 1.0) -> None:
    """Give a random-init model outputs worth comparing.

    MMDetection's init scores every box alike (classifier std 0.01, prior bias -4.6 or a
    near-uniform softmax: no detection above 0.05, or near-ties that float noise reorders), and
    a random ResNet without trained BatchNorm statistics grows activations so large that the
    box deltas explode and every R-CNN proposal degenerates. On the MMDetection model, before
    conversion (so both sides get the same tensors): measure each final layer's input RMS on
    the image and re-draw it as ``N(0, (t / (rms * sqrt(fan_in)))^2)`` with t = 1 for
    classifiers (bias -2; softmax background 0) and t = 0.1 for regressors (bias 0). Repeated
    ``passes`` times, since later stages see proposals shaped by earlier ones. ``softmax_std``
    replaces t for the R-CNN softmax classifiers (a cascade averages three of them, so t = 1
    leaves few scores above 0.05). Our choice for this tool, not MMDetection's.
    """
    layers = {
        name: mod
        for name, mod in model.named_modules()
        if name.rsplit(".", 1)[-1] in CLS_LAYERS + REG_LAYERS + POINT_LAYERS + OFFSET_LAYERS
        and hasattr(mod, "weight")
    }
    for _ in range(passes):
        sq: dict[str, list[float]] = {n: [0.0, 0.0] for n in layers}

        def hook(acc: list[float]):
            def fn(_mod, args):
                x = args[0].detach().double()
                acc[0] += float((x * x).sum())
                acc[1] += x.numel()

            return fn

        handles = [mod.register_forward_pre_hook(hook(sq[n])) for n, mod in layers.items()]
        try:
            run_mmdet(model, bgr)
        finally:
            for h in handles:
                h.remove()
        for name, mod in layers.items():
            total, count = sq[name]
            if not count:
                continue  # not reached this pass (no proposals yet)
            rms = max((total / count) ** 0.5, 1e-12)
            leaf = name.rsplit(".", 1)[-1]
            target = 1.0 if leaf in CLS_LAYERS + POINT_LAYERS else 0.1
            if leaf in OFFSET_LAYERS:
                target = 0.5
            if leaf == "fc_cls":
                target = softmax_std
            with torch.no_grad():
                mod.weight.normal_(std=target / (rms * mod.weight[0].numel() ** 0.5))
                mod.bias.fill_(-2.0 if leaf in CLS_LAYERS else 0.0)
                if leaf == "fc_cls":
                    mod.bias[-1] = 0.0


def model_classes(mm) -> tuple[str, ...]:
    """The class names an MMDetection model carries, else COCO's (its configs' default)."""
    if getattr(mm, "dataset_meta", None):
        return tuple(mm.dataset_meta["classes"])
    from mmdet.datasets import CocoDataset

    return tuple(CocoDataset.METAINFO["classes"])


def dfmsd_twin(mm, cfg, config: str, model_name: str):
    """``build_dfmsd`` on MMDetection model ``mm``'s own weights, classes and config."""
    with tempfile.TemporaryDirectory() as tmp:
        return build_dfmsd(
            model_name, mm.state_dict(), model_classes(mm), Path(tmp), cfg.pretty_text,
            PAIR_OPTIONS.get(config),
        )  # fmt: skip


def run_mmdet(model, bgr: np.ndarray):
    """(FPN levels, detections {boxes, scores, labels 0-based}) for one HxWx3 uint8 BGR image."""
    from mmdet.structures import DetDataSample

    h, w = bgr.shape[:2]
    sample = DetDataSample(
        metainfo={"img_shape": (h, w), "ori_shape": (h, w), "scale_factor": (1.0, 1.0)}
    )
    data = {"inputs": [torch.from_numpy(bgr.copy()).permute(2, 0, 1)], "data_samples": [sample]}
    data = model.data_preprocessor(data, False)
    with torch.no_grad():
        feats = model.extract_feat(data["inputs"])
        pred = model.predict(data["inputs"], data["data_samples"], rescale=True)[0]
    inst = pred.pred_instances
    dets = {"boxes": inst.bboxes, "scores": inst.scores, "labels": inst.labels}
    return list(feats), dets


# ------------------------------------------------------------------------------ dfmsd side
def build_dfmsd(
    model_name: str,
    mm_state: dict,
    classes: tuple[str, ...],
    workdir: Path,
    cfg_text: str = "",
    options: dict | None = None,
):
    """The user's path: MMDetection .pth -> ``convert_mmdet`` -> file -> strict ``load_weights``.
    The file's meta holds the classes and the config text, as mmengine's Runner writes them."""
    sys.path.insert(0, str(REPO))
    from dfmsd_cli.models import build_model
    from dfmsd_cli.models.checkpoint import load_weights
    from dfmsd_cli.models.convert import convert_mmdet

    src, out = workdir / "mmdet.pth", workdir / "dfmsd.pth"
    meta = {"dataset_meta": {"classes": classes}, "cfg": cfg_text}
    torch.save({"state_dict": mm_state, "meta": meta}, src)
    ckpt, report = convert_mmdet(src, model_name, options=options)
    torch.save(ckpt, out)
    model = build_model(model_name, num_classes=ckpt["num_classes"], **(options or {}))
    load_weights(model, out)
    return model.eval(), report


def run_dfmsd(model, rgb: np.ndarray):
    from dfmsd_cli.data.geometry import IMAGENET_MEAN, IMAGENET_STD

    h, w = rgb.shape[:2]
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float()[None]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
    x = torch.nn.functional.pad(x, (0, pw - w, 0, ph - h))
    with torch.no_grad():
        out = model(x, [(h, w)])
    feats = [out.features[s] for s in sorted(out.features)]
    d = out.detections[0]
    return feats, {"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"] - 1}


# ------------------------------------------------------------------------------ comparison
def level_diffs(ref: list[torch.Tensor], got: list[torch.Tensor]) -> list[dict]:
    if len(ref) != len(got):
        raise SystemExit(f"{len(ref)} MMDetection levels vs {len(got)} dfmsd levels")
    rows = []
    for a, b in zip(ref, got, strict=True):
        if a.shape != b.shape:
            rows.append({"shape": [list(a.shape), list(b.shape)], "max_abs": None, "rel": None})
            continue
        diff = (a - b).abs().max().item()
        peak = a.abs().max().item()
        rows.append({"max_abs": diff, "rel": diff / max(peak, 1e-12), "peak": peak})
    return rows


def det_agreement(ref: dict, got: dict, iou_min: float = 0.99, score_tol: float = 1e-3) -> dict:
    """Greedy one-to-one match of ``ref``'s detections (by decreasing score) to ``got``'s."""
    n = len(ref["scores"])
    matched, used = 0, torch.zeros(len(got["scores"]), dtype=torch.bool)
    if n and len(got["scores"]):
        iou = torchvision.ops.box_iou(ref["boxes"].float(), got["boxes"].float())
        for i in ref["scores"].argsort(descending=True).tolist():
            ok = (
                (got["labels"] == ref["labels"][i])
                & (iou[i] >= iou_min)
                & ((got["scores"] - ref["scores"][i]).abs() <= score_tol)
                & ~used
            )
            if ok.any():
                used[torch.where(ok)[0][0]] = True
                matched += 1
    return {"matched": matched, "mmdet": n, "dfmsd": len(got["scores"])}


def load_image(path: Path | None, size: tuple[int, int]) -> np.ndarray:
    """An RGB uint8 image resized (bilinear) to exactly ``size`` = (H, W)."""
    if path is None:
        path = sorted(COCO_IMAGES.glob("*.jpg"))[0]
    img = Image.open(path).convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(img)


def parity(
    config: str,
    model_name: str,
    sizes,
    image,
    checkpoint,
    seed,
    spread: bool = True,
    softmax_std: float = 1.0,
) -> list[dict]:
    stub_mmcv_ext()
    t0 = time.time()
    mm, cfg = build_mmdet(config, checkpoint, seed)
    if spread and not checkpoint:
        bgr = np.ascontiguousarray(load_image(image, sizes[0])[..., ::-1])
        calibrate_heads(mm, bgr, softmax_std=softmax_std)
    dm, report = dfmsd_twin(mm, cfg, config, model_name)
    rows = []
    for size in sizes:
        rgb = load_image(image, size)
        ref_f, ref_d = run_mmdet(mm, np.ascontiguousarray(rgb[..., ::-1]))
        got_f, got_d = run_dfmsd(dm, rgb)
        levels = level_diffs(ref_f, got_f)
        rels = [lv["rel"] for lv in levels]
        rows.append(
            {
                "config": config,
                "model": model_name,
                "size": list(size),
                "mapped": report.mapped,
                "levels": levels,
                "max_rel": None if None in rels else max(rels),
                "detections": det_agreement(ref_d, got_d),
                "seconds": round(time.time() - t0, 1),
            }
        )
    return rows


# hand-placed ground truth for the loss comparison, as fractions of (W, H, W, H), and labels
def markdown(rows: list[dict]) -> str:
    out = [
        "| MMDetection config | dfmsd model | input | max rel. FPN diff (per level) "
        "| detections matched |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        per = ", ".join("shape!" if lv["rel"] is None else f"{lv['rel']:.1e}" for lv in r["levels"])
        d = r["detections"]
        out.append(
            f"| `{r['config']}` | `{r['model']}` | {r['size'][0]}×{r['size'][1]} "
            f"| {r['max_rel']:.1e} ({per}) | {d['matched']}/{d['mmdet']} (dfmsd {d['dfmsd']}) |"
            if r["max_rel"] is not None
            else f"| `{r['config']}` | `{r['model']}` | {r['size']} | shape mismatch ({per}) "
            f"| {d['matched']}/{d['mmdet']} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", help="MMDetection config name (no .py)")
    ap.add_argument("model", nargs="?", help="dfmsd model (default: from the built-in pairs)")
    ap.add_argument("--all", action="store_true", help="every built-in config/model pair")
    ap.add_argument("--checkpoint", help="MMDetection .pth (default: random init, --seed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-spread",
        action="store_true",
        help="keep MMDetection's random init of the final layers (few or no detections)",
    )
    ap.add_argument("--image", type=Path, help="image file (default: first COCO subset image)")
    ap.add_argument("--size", action="append", help="H,W input size (repeatable; default 320,448)")
    ap.add_argument(
        "--softmax-std", type=float, default=1.0, help="calibrated logit std of fc_cls layers"
    )
    ap.add_argument(
        "--losses", action="store_true", help="compare training losses instead (dense heads)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="append one JSON line per (model, size)")
    ap.add_argument("--markdown", type=Path, help="write the table as markdown")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in s.split(",")) for s in (args.size or ["320,448"])]
    if args.all:
        pairs = list(PAIRS.items())
    elif args.config:
        pairs = [(args.config, args.model or PAIRS.get(args.config))]
        if pairs[0][1] is None:
            raise SystemExit(f"no built-in dfmsd model for {args.config}: pass it as MODEL")
    else:
        raise SystemExit("pass CONFIG [MODEL] or --all")
    if args.losses:
        from mmdet_loss_parity import loss_parity  # tools/ is the script's folder

        for config, model_name in pairs:
            for size in sizes:
                row = loss_parity(config, model_name, size, args.image, args.seed)
                print(json.dumps(row), flush=True)
                if args.json:
                    with args.json.open("a") as f:
                        f.write(json.dumps(row) + "\n")
        return
    rows = []
    for config, model_name in pairs:
        try:
            new = parity(
                config, model_name, sizes, args.image, args.checkpoint, args.seed,
                not args.no_spread,
                args.softmax_std,
            )  # fmt: skip
        except Exception as exc:  # keep going over --all; the row says what failed
            new = [{"config": config, "model": model_name, "error": f"{type(exc).__name__}: {exc}"}]
        for r in new:
            print(json.dumps(r), flush=True)
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps(r) + "\n")
        rows += [r for r in new if "error" not in r]
    if args.markdown:
        args.markdown.write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
