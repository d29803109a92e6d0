#!/usr/bin/env bash
# Recreate the demo's shipped teachers (examples/demo_teachers/{fcos_tiny,gfl_tiny}.pth).
#
# Recipe (dfmsd_cli/demo/teachers.py TEACHER_RECIPE): a synthetic dataset drawn with seed 1000
# (the demo uses seeds 0, 1, 2, ...: the demo's validation images are never seen by a teacher),
# 500 training images (472 with objects), each teacher trained with `dfmsd train` on the 8-epoch
# schedule (batch 4, lr 0.02, 100 warm-up iterations, gradient clip 35, images resized to fit
# 320x256) stopped after its first 4 epochs (--max-steps 472 = 4 x 118 steps, before the first
# lr decay: our CPU time budget). The weights are packed to float16 (~1.7 MB each), which load
# strictly into the float32 models. Their mAP on the demo's val split: docs/demo.md.
#
# Time: 472 optimizer steps per teacher, ~0.4 CPU-s each (~3-4 min per teacher on an idle
# 2-core machine; both teachers can train in parallel with OMP_NUM_THREADS=1).
# Multi-GPU form of each training: torchrun --nproc_per_node=N $(which dfmsd) train ...
set -euo pipefail
WORK=${WORK:-runs/demo-teachers}
OUT=${OUT:-examples/demo_teachers}
mkdir -p "$WORK" "$OUT"

dfmsd make-data synthetic --out "$WORK/data" --num-images 500 --val-images 100 --seed 1000 --overwrite

for T in fcos_tiny gfl_tiny; do
  dfmsd train --model "$T" --data "$WORK/data" --out "$WORK/$T" \
    --epochs 8 --batch-size 4 --lr 0.02 --warmup-iters 100 --grad-clip 35 \
    --max-steps 472 --img-scale 320,256 --seed 0 --num-workers 0 --overwrite &
done
wait

for T in fcos_tiny gfl_tiny; do
  python -c "from dfmsd_cli.demo.teachers import pack_teacher as p; p('$WORK/$T/model.pth', '$OUT/$T.pth')"
  dfmsd eval "$OUT/$T.pth" --data "$WORK/data" --img-scale 320,256 --num-workers 0 \
    --json "$WORK/$T/eval_packed.json"
done
ls -l "$OUT"
