#!/usr/bin/env bash
# The DFMSD paper's heterogeneous pair on COCO (arXiv 2407.13147, Table 6):
# teachers Cascade Mask R-CNN R101 (weaker, 42.9 box AP) and X101-64x4d (stronger, 45.6)
# -> student RetinaNet R50 (MMDetection layout, ImageNet-initialised trunk), 12 + 12 epochs.
#
#   COCO=/data/coco CKPT=/data/mmdet-checkpoints examples/coco_paper_pair.sh
#
# Needs: COCO 2017 in $COCO (annotations/instances_{train,val}2017.json, train2017/, val2017/);
# the two MMDetection checkpoints in $CKPT:
#   cascade_mask_rcnn_r101_fpn_1x_coco_20200203-befdf6ee.pth
#   cascade_mask_rcnn_x101_64x4d_fpn_20e_coco_20200512_161033-bdb5126a.pth
# and the torchvision ImageNet ResNet-50 file in $TORCH_HOME/hub/checkpoints (student init).
#
# Disk (store = float16, blosc-zstd; levels 8,16,32,64 = the strides the student shares with
# the teachers, stride 4 is skipped), projected for train2017 (118,287 images at 1333x800) by
# `examples/coco_projection.py` (docs/store.md, "COCO projection"):
#   cmr_r101, views orig+hflip     : 1.65 TB
#   cmr_x101, views orig+hflip+me  : 2.48 TB          (the pair: 4.13 TB)
#   --dtype uint8: 2.55 TB for the pair; --dtype bfloat16 --keepbits 3: 1.65 TB;
#   --pca 32 (a per-level channel projection; its error is in `dfmsd cache info`): 0.68 TB.
# precompute refuses to start a store projected beyond its disk's free space and names the
# least lossy smaller encoding that fits (--no-space-check starts anyway).
# `dfmsd precompute ... --dry-run` prints the projection for your data before writing anything;
# `dfmsd bench precompute|store|distill` measures time per image/step on your hardware.
# Time: precompute costs one teacher forward per image and view (the store adds <10 %, see
# `dfmsd bench precompute`); distill steps cost about a student-only step (`dfmsd bench distill`).
# We had no GPU: GPU times per step are not measured here; measure them with the bench commands.
#
# Multi-GPU: every command below runs under torchrun unchanged, e.g. with 8 GPUs
#   torchrun --nproc_per_node=8 $(which dfmsd) precompute ...   (disjoint shards of one store)
#   torchrun --nproc_per_node=8 $(which dfmsd) distill ...      (DDP; --batch-size is per GPU)
# Across machines, precompute also takes --shard I/N (each machine writes its part of one store).
set -euo pipefail
COCO=${COCO:?set COCO=/path/to/coco}
CKPT=${CKPT:?set CKPT=/path/to/mmdet/checkpoints}
WORK=${WORK:-runs/coco-dfmsd}
CACHE=${CACHE:-cache}          # or s3://bucket/cache: pip install ".[s3]", docs/object_storage.md
NGPU=${NGPU:-1}
DFMSD="dfmsd"
if [ "$NGPU" -gt 1 ]; then DFMSD="torchrun --nproc_per_node=$NGPU $(which dfmsd)"; fi
mkdir -p "$WORK"

# 1. Convert the MMDetection teachers (strict: every key mapped, or an error naming them).
dfmsd convert mmdet "$CKPT/cascade_mask_rcnn_r101_fpn_1x_coco_20200203-befdf6ee.pth" \
  --model cmr_r101 --out "$WORK"  # writes $WORK/cmr_r101.pth
dfmsd convert mmdet "$CKPT/cascade_mask_rcnn_x101_64x4d_fpn_20e_coco_20200512_161033-bdb5126a.pth" \
  --model cmr_x101 --out "$WORK"  # writes $WORK/cmr_x101.pth

# Optional: check the converted teachers reproduce their published box AP (42.9 / 45.6).
# dfmsd eval "$WORK/cmr_r101.pth" --data "$COCO" --split val2017

# 2. Precompute both teachers once (resumable: re-run the same command after an interruption).
#    The stronger one also stores the masking-enhancement view, chosen from the weaker one's
#    candidate-box area ratios (hence the order).
$DFMSD precompute --teacher cmr_r101 --weights "$WORK/cmr_r101.pth" --data "$COCO" \
  --split train2017 --cache "$CACHE" --levels 8,16,32,64 --views orig,hflip --batch-size 2
$DFMSD precompute --teacher cmr_x101 --weights "$WORK/cmr_x101.pth" --data "$COCO" \
  --split train2017 --cache "$CACHE" --levels 8,16,32,64 --views orig,hflip \
  --enhance-from cmr_r101 --batch-size 2
dfmsd cache verify "$CACHE/cmr_r101/train2017.zarr"
dfmsd cache verify "$CACHE/cmr_x101/train2017.zarr"

# 3. Distill in two stages (SAL: cmr_r101 then cmr_x101; ME and SFA in the last stage).
#    The teachers are never loaded: everything comes from the stores. Batch 16 in total as in
#    MMDetection's 1x schedule (2 per GPU on 8 GPUs), lr 0.01, 12 epochs per stage.
$DFMSD distill --student mmretina_r50 --weights torchvision --stages cmr_r101,cmr_x101 \
  --data "$COCO" --cache "$CACHE" --epochs 12,12 --method dfmsd \
  --batch-size $(( 16 / NGPU )) --lr 0.01 --out "$WORK/dfmsd_retina_r50"

# 4. Evaluate the final student (also evaluated on val2017 after each stage by distill).
dfmsd eval "$WORK/dfmsd_retina_r50/student.pth" --data "$COCO" --split val2017 \
  --json "$WORK/dfmsd_retina_r50/eval_val2017.json"

# The student alone, same recipe, for the comparison (paper: RetinaNet R50 37.4 -> 40.1 with
# DFMSD from Cascade Mask R-CNN R101 -> X101):
# $DFMSD distill --student mmretina_r50 --weights torchvision --method none --data "$COCO" \
#   --epochs 24 --batch-size $(( 16 / NGPU )) --lr 0.01 --out "$WORK/retina_r50_alone"
