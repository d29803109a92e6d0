#!/usr/bin/env bash
# Every distillation method x 3 seeds on ONE set of teacher stores -> a markdown table in the
# style of the paper's Tables 6 and 10 (mean ± std over seeds, Δ vs the student alone).
#
# Usage:  examples/compare.sh [DEMO_DIR] [SEEDS]
#   DEMO_DIR  a finished `dfmsd demo --out DEMO_DIR` (its data/ and cache/ are reused: the
#             teachers are never run again).  Default: dfmsd-demo
#   SEEDS     default "0 1 2"
#   JOBS=N    runs at once (default: 2, one thread each; use 1 on a GPU)
#   EPOCHS=E  epochs per SAL stage (default 5: the demo's 5,5); single-stage runs get 2E
#   SCALE=W,H the demo's --img-scale (default 320,256)
#   ADV_EPS=E ADV_STEPS=K  the adversarial view of the `dfmsd-adv` row (default 4 grey levels,
#             1 step = FGSM): the stronger teacher is precomputed once more, with --adv-eps, into
#             DEMO/cache-adv (the weaker teacher's store is linked, not recomputed)
# Same recipe for every run (the demo's): batch 4, lr 0.02, 50 warm-up iterations, 320x256,
# the same total epochs (10): SAL runs 5+5 over both teachers, single-stage methods run 10
# epochs with the stronger teacher (gfl_tiny), `none` is the student alone.
# Rows `fgd-warmup` (FGD with --kd-warmup 100) and `dfmsd-adv` (DFMSD + L_adv) are issue 12's.
# Cost: one run per registered method (9 with amd, fkd, samkd) + 5 ablation rows, x 3 seeds
# = 42 runs of 480 optimizer steps (0.45-0.85 CPU-s each on this 2-core CPU); the 33 runs
# before amd/fkd/samkd took ~90 min.
# Rerunning resumes: finished runs are kept. Multi-GPU form of every run:
#   torchrun --nproc_per_node=N $(which dfmsd) distill ...
set -euo pipefail
DEMO=${1:-dfmsd-demo}
SEEDS=${2:-0 1 2}
OUT=${OUT:-$DEMO/compare}
JOBS=${JOBS:-2}
STUDENT=${STUDENT:-retina_tiny}
WEAK=${WEAK:-fcos_tiny}
STRONG=${STRONG:-gfl_tiny}
E=${EPOCHS:-5}
E2=$((2 * E))
export COMMON="--student $STUDENT --data $DEMO/data --cache $DEMO/cache --img-scale ${SCALE:-320,256} \
  --batch-size 4 --lr 0.02 --warmup-iters 50 --num-workers 0"
export OUT
mkdir -p "$OUT"
start=$(date +%s)

# the adversarial view: the stronger teacher's store again, with the 'adv' view added
ADVCACHE=$DEMO/cache-adv
mkdir -p "$ADVCACHE"
ln -sfn "$(cd "$DEMO/cache/$WEAK" && pwd)" "$ADVCACHE/$WEAK"
read -r TW TSEED < <(python - "$DEMO/cache/$STRONG/train2017.zarr/zarr.json" <<'PY'
import json, sys
a = json.load(open(sys.argv[1]))["attributes"]["dfmsd"]
print(a["weights"]["path"], (a.get("enhance") or {}).get("seed", 0))
PY
)
dfmsd precompute --teacher "$STRONG" --weights "$TW" --data "$DEMO/data" --cache "$ADVCACHE" \
  --views orig,hflip --enhance-from "$WEAK" --seed "$TSEED" --img-scale "${SCALE:-320,256}" \
  --batch-size 4 --num-workers 0 --adv-eps "${ADV_EPS:-4}" --adv-steps "${ADV_STEPS:-1}" \
  > "$OUT/precompute-adv.log" 2>&1 || { echo "FAILED: adv precompute (see $OUT/precompute-adv.log)"; exit 1; }

# every registered method (dfmsd_cli/distill/methods/): SAL methods over both teachers, E
# epochs each; single-stage methods with the stronger one, 2E; a method without a store alone
METHODS=$(python - <<'PY'
from dfmsd_cli.distill.methods import get_method, list_methods
for name in list_methods():
    spec = get_method(name)
    print(name, "sal" if spec.sal else "single" if spec.store is not None else "alone")
PY
)
jobs_file="$OUT/jobs.txt"
: > "$jobs_file"
for s in $SEEDS; do
  while read -r m kind; do
    case $kind in
      sal) echo "$m $s --method $m --stages $WEAK,$STRONG --epochs $E,$E" ;;
      single) echo "$m $s --method $m --stages $STRONG --epochs $E2" ;;
      *) echo "$m $s --method $m --epochs $E2" ;;
    esac
  done <<< "$METHODS" >> "$jobs_file"
  # the ablation rows
  cat >> "$jobs_file" <<EOF
fgd-warmup $s --method fgd --stages $STRONG --epochs $E2 --kd-warmup 100
dfmsd-no-sal $s --method dfmsd --stages $WEAK,$STRONG --epochs $E2 --no-sal
dfmsd-no-me $s --method dfmsd --stages $WEAK,$STRONG --epochs $E,$E --no-me
dfmsd-no-sfa $s --method dfmsd --stages $WEAK,$STRONG --epochs $E,$E --no-sfa
dfmsd-adv $s --method dfmsd --stages $WEAK,$STRONG --epochs $E,$E --adv --cache $ADVCACHE
EOF
done

# one line = one run: name, seed, distill options; a finished run (student.pth) is skipped
run_one() {
  local name=$1 seed=$2; shift 2
  local dir="$OUT/$name/s$seed"
  if [ -f "$dir/student.pth" ]; then return 0; fi
  mkdir -p "$OUT/$name"
  local mode=--overwrite
  if [ -f "$dir/last.pth" ]; then mode=--resume; fi  # killed earlier: continue where it stopped
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} dfmsd distill $COMMON $mode --seed "$seed" --out "$dir" "$@" \
    > "$dir.log" 2>&1 || { echo "FAILED: $name seed $seed (see $dir.log)"; return 1; }
  echo "done: $name seed $seed"
}
export -f run_one
status=0
xargs -P "$JOBS" -L 1 bash -c 'run_one "$@"' _ < "$jobs_file" || status=$?

python "$(dirname "$0")/compare_table.py" "$OUT" > "$OUT/table.md"
echo "run time: $(( $(date +%s) - start )) s ($JOBS at once)" | tee -a "$OUT/table.md"
cat "$OUT/table.md"
exit "$status"
