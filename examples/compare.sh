#!/usr/bin/env bash
# Every distillation method x 3 seeds on ONE set of teacher stores -> a markdown table in the
# style of the paper's Tables 6 and 10 (mean ± std over seeds, Δ vs the student alone).
#
# Usage:  examples/compare.sh [DEMO_DIR] [SEEDS]
#   DEMO_DIR  a finished `dfmsd demo --out DEMO_DIR` (its data/ and cache/ are reused: the
#             teachers are never run again).  Default: dfmsd-demo
#   SEEDS     default "0 1 2"
# Same recipe for every run (the demo's): batch 4, lr 0.02, 50 warm-up iterations, 320x256,
# the same total epochs (EPOCHS_TOTAL = 6): SAL runs 3+3 over both teachers, single-stage methods
# run 6 epochs with the stronger teacher (gfl_tiny), `none` is the student alone.
# Cost: 27 runs of ~300 optimizer steps (about 0.4-0.9 CPU-s each on a 2-core CPU): ~1.5-2 h.
# Multi-GPU form of every run: torchrun --nproc_per_node=N $(which dfmsd) distill ...
set -euo pipefail
DEMO=${1:-dfmsd-demo}
SEEDS=${2:-0 1 2}
OUT=${OUT:-$DEMO/compare}
STUDENT=${STUDENT:-retina_tiny}
WEAK=${WEAK:-fcos_tiny}
STRONG=${STRONG:-gfl_tiny}
COMMON="--student $STUDENT --data $DEMO/data --cache $DEMO/cache --img-scale 320,256 \
  --batch-size 4 --lr 0.02 --warmup-iters 50 --num-workers 0 --overwrite"
mkdir -p "$OUT"
start=$(date +%s)

run() {  # name, seed, extra args...
  local name=$1 seed=$2; shift 2
  if [ -f "$OUT/$name/s$seed/student.pth" ]; then return; fi  # finished earlier: resume the table
  dfmsd distill $COMMON --seed "$seed" --out "$OUT/$name/s$seed" "$@"
}

for s in $SEEDS; do
  run none        "$s" --method none  --epochs 6
  run mgd         "$s" --method mgd   --stages "$STRONG" --epochs 6
  run pkd         "$s" --method pkd   --stages "$STRONG" --epochs 6
  run fgd         "$s" --method fgd   --stages "$STRONG" --epochs 6
  run dmkd        "$s" --method dmkd  --stages "$STRONG" --epochs 6
  run dfmsd       "$s" --method dfmsd --stages "$WEAK,$STRONG" --epochs 3,3
  run dfmsd-no-sal "$s" --method dfmsd --stages "$WEAK,$STRONG" --epochs 6 --no-sal
  run dfmsd-no-me  "$s" --method dfmsd --stages "$WEAK,$STRONG" --epochs 3,3 --no-me
  run dfmsd-no-sfa "$s" --method dfmsd --stages "$WEAK,$STRONG" --epochs 3,3 --no-sfa
done

python "$(dirname "$0")/compare_table.py" "$OUT" > "$OUT/table.md"
echo "run time: $(( $(date +%s) - start )) s" | tee -a "$OUT/table.md"
cat "$OUT/table.md"
