#!/usr/bin/env bash
# The benchmark (issue 19): every distillation method, paired seeds, pretrained students, two
# teacher/student pairs -> OUT/table.md (the paper's Table 2/6 layout, paired Δ vs the student
# alone) and OUT/results.json (every run's numbers and configuration), OUT/delta.png.
#
# Usage:  examples/compare.sh [OUT]                  (default OUT: runs/compare)
# Environment (defaults in brackets):
#   SEEDS="0 1 2 3 4"   training seeds: the reported table's (tuning used 20-22; keep them out)
#   PAIRS="het hom"     het: student retina_tiny <- fcos_tiny (weak), gfl_tiny (strong), the demo's
#                       hom: student gfl_tiny <- gfl_tiny (same head family; logits stored)
#   EPOCHS=5            the budget is 2*EPOCHS epochs of optimizer steps for every run: SAL runs
#                       EPOCHS,EPOCHS; single-stage runs 2*EPOCHS; row dfmsd-paper gives each
#                       SAL stage the single-stage budget (2*EPOCHS,2*EPOCHS: twice the steps)
#   INIT=pretrained     pretrained: --weights examples/pretrained_students/STUDENT.pth
#                       --reinit-heads (backbone + FPN pre-trained, heads fresh from the seed);
#                       scratch: random init (the old demo regime)
#   TRAIN_IMAGES=200 VAL_IMAGES=500 DATA_SEED=0   the benchmark's synthetic dataset
#   ROWS=""             only these rows (space-separated; empty: all), e.g. for a pilot
#   JOBS=2              runs at once, one torch thread each (use 1 on a GPU)
#   SCALE=320,256 ADV_EPS=4 ADV_STEPS=1   geometry; the adversarial view of row dfmsd-adv
#   PRIOR=""            an earlier results.json (e.g. docs/bench_results.json): its finished runs
#                       are not rerun and enter the table (compare_table.py --prior)
# Rows per pair: every registered method (dfmsd_cli/distill/methods/, read at run time: methods
# added later appear by themselves), fgd-warmup (--kd-warmup 100), samkd-no-sld, samkd-grid1,
# gdetkd-no-sgfi, gdetkd-no-ckd, dfmsd-no-sal, dfmsd-no-me, dfmsd-no-sfa, dfmsd-adv, dfmsd-lr (--lr
# 0.0200001 for 0.02: a change of no consequence, the floor of the paired Δ), dfmsd-paper,
# none-paper (the student alone at dfmsd-paper's 2x budget, its fair baseline),
# and (het) the store encodings of issue 18, DFMSD on stores of both teachers precomputed with:
# dfmsd-pca32 --pca 32 (channel projection), dfmsd-uint8 --dtype uint8, dfmsd-bf16kb3 --dtype
# bfloat16 --keepbits 3, and dfmsd-float32 --dtype float32 (lossless: what the float16 default's
# rounding alone does, the floor of store changes; each in OUT/cache-NAME). In the hom pair (one
# teacher) every method runs one stage with gfl_tiny; dfmsd-no-sal, dfmsd-paper and none-paper are not run there. A run
# the pair cannot serve (dfmsd distill exits 2 with a UserError, e.g. a method that needs
# logits of the student's head family) is recorded as skipped with that message, not as a failure.
# Pairing: every run of a seed starts from the same weights (same trunk, same seeded heads) and
# sees the same data order (the sampler is seeded by --seed), so Δ vs `none` is per seed.
# Rerunning resumes: data and stores are reused (precompute resumes), finished runs are kept, a
# killed run continues from its last.pth. Cost and the measured pilot: docs/bench.md.
# Multi-GPU form of every run:  torchrun --nproc_per_node=N $(which dfmsd) distill ...
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-runs/compare}
SEEDS=${SEEDS:-0 1 2 3 4}
PAIRS=${PAIRS:-het hom}
E=${EPOCHS:-5}
E2=$((2 * E))
INIT=${INIT:-pretrained}
SCALE=${SCALE:-320,256}
JOBS=${JOBS:-2}
ROWS=${ROWS:-}
WEAK=fcos_tiny
STRONG=gfl_tiny
TW=${TEACHERS_DIR:-$HERE/demo_teachers}
PRE=${PRETRAINED_DIR:-$HERE/pretrained_students}
DATA=$OUT/data
CACHE=$OUT/cache
ADVCACHE=$OUT/cache-adv
mkdir -p "$OUT"
start=$(date +%s)
log() { echo "[$(date +%H:%M:%S)] $*"; }
want() { [ -z "$ROWS" ] || [[ " $ROWS " == *" $1 "* ]]; }

# 1. data: TRAIN_IMAGES training and VAL_IMAGES validation images (kept when present)
if [ ! -f "$DATA/annotations/instances_val2017.json" ]; then
  dfmsd make-data synthetic --out "$DATA" --num-images "${TRAIN_IMAGES:-200}" \
    --val-images "${VAL_IMAGES:-500}" --seed "${DATA_SEED:-0}" --overwrite > "$OUT/data.log" 2>&1
fi

# 2. stores (re-running precompute resumes, a complete store is kept): the weaker teacher with
#    orig + hflip; the stronger with orig + hflip + the ME view from the weaker's area ratios
#    and its class logits (the hom pair's logit terms); the adversarial view in its own cache
P="--data $DATA --img-scale $SCALE --batch-size 4 --num-workers 0 --seed 0 --views orig,hflip"
# shellcheck disable=SC2086
{
  dfmsd precompute --teacher $WEAK --weights "$TW/$WEAK.pth" --cache "$CACHE" $P
  dfmsd precompute --teacher $STRONG --weights "$TW/$STRONG.pth" --cache "$CACHE" $P \
    --enhance-from $WEAK --store-logits
} > "$OUT/precompute.log" 2>&1 || { echo "FAILED: precompute (see $OUT/precompute.log)"; exit 1; }
if want dfmsd-adv; then
  mkdir -p "$ADVCACHE"
  ln -sfn "$(cd "$CACHE/$WEAK" && pwd)" "$ADVCACHE/$WEAK"
  # shellcheck disable=SC2086
  dfmsd precompute --teacher $STRONG --weights "$TW/$STRONG.pth" --cache "$ADVCACHE" $P \
    --enhance-from $WEAK --adv-eps "${ADV_EPS:-4}" --adv-steps "${ADV_STEPS:-1}" \
    > "$OUT/precompute-adv.log" 2>&1 || { echo "FAILED: adv precompute (see $OUT/precompute-adv.log)"; exit 1; }
fi
enc_opts() {  # the precompute options of an encoding row (issue 18)
  case $1 in
    pca32) echo "--pca 32" ;;
    uint8) echo "--dtype uint8" ;;
    bf16kb3) echo "--dtype bfloat16 --keepbits 3" ;;
    float32) echo "--dtype float32" ;;
  esac
}
ENCODINGS="pca32 uint8 bf16kb3 float32"
for enc in $ENCODINGS; do
  if want "dfmsd-$enc" && [[ " $PAIRS " == *" het "* ]]; then
    # shellcheck disable=SC2086
    {
      dfmsd precompute --teacher $WEAK --weights "$TW/$WEAK.pth" --cache "$OUT/cache-$enc" $P \
        $(enc_opts "$enc")
      dfmsd precompute --teacher $STRONG --weights "$TW/$STRONG.pth" --cache "$OUT/cache-$enc" $P \
        --enhance-from $WEAK --store-logits $(enc_opts "$enc")
    } > "$OUT/precompute-$enc.log" 2>&1 ||
      { echo "FAILED: $enc precompute (see $OUT/precompute-$enc.log)"; exit 1; }
  fi
done
log "data and stores ready"

# 3. the jobs: one line = pair row seed student distill-options
METHODS=$(python - <<'PY'
from dfmsd_cli.distill.methods import get_method, list_methods
for name in list_methods():
    spec = get_method(name)
    print(name, "sal" if spec.sal else "single" if spec.store is not None else "alone")
PY
)
jobs_file="$OUT/jobs.txt"
: > "$jobs_file"
for pair in $PAIRS; do
  case $pair in
    het) S=retina_tiny; SAL_STAGES="--stages $WEAK,$STRONG --epochs $E,$E" ;;
    hom) S=gfl_tiny; SAL_STAGES="--stages $STRONG --epochs $E2" ;;  # one teacher: one stage
    *) echo "unknown pair '$pair': use het and/or hom"; exit 2 ;;
  esac
  ONE="--stages $STRONG --epochs $E2"
  INITOPT=""
  if [ "$INIT" = pretrained ]; then
    [ -f "$PRE/$S.pth" ] || { echo "no $PRE/$S.pth: run examples/make_pretrained_students.sh (or INIT=scratch)"; exit 2; }
    INITOPT="--weights $PRE/$S.pth --reinit-heads"
  fi
  for s in $SEEDS; do
    {
      while read -r m kind; do
        case $kind in
          sal) echo "$m $SAL_STAGES --method $m" ;;
          single) echo "$m $ONE --method $m" ;;
          *) echo "$m --epochs $E2 --method $m" ;;
        esac
      done <<< "$METHODS"
      echo "fgd-warmup $ONE --method fgd --kd-warmup 100"
      echo "samkd-no-sld $ONE --method samkd --no-sld"  # SFD alone (issue 14's ablations)
      echo "samkd-grid1 $ONE --method samkd --samkd-grids 1"  # one window level: global masks
      echo "gdetkd-no-sgfi $ONE --method gdetkd --no-sgfi"  # L_ckd (+ L_cls) alone
      echo "gdetkd-no-ckd $ONE --method gdetkd --no-ckd"  # L_feat (+ L_cls) alone
      echo "dfmsd-no-me $SAL_STAGES --method dfmsd --no-me"
      echo "dfmsd-no-sfa $SAL_STAGES --method dfmsd --no-sfa"
      echo "dfmsd-adv $SAL_STAGES --method dfmsd --adv --cache $ADVCACHE"
      # the benchmark's own floor: DFMSD with the learning rate changed in its 6th digit
      echo "dfmsd-lr $SAL_STAGES --method dfmsd --lr 0.0200001"
      if [ "$pair" = het ]; then
        echo "dfmsd-no-sal --stages $WEAK,$STRONG --epochs $E2 --method dfmsd --no-sal"
        echo "dfmsd-paper --stages $WEAK,$STRONG --epochs $E2,$E2 --method dfmsd"
        echo "none-paper --epochs $((2 * E2)) --method none"  # the alone run at dfmsd-paper's budget
        for enc in $ENCODINGS; do
          echo "dfmsd-$enc $SAL_STAGES --method dfmsd --cache $OUT/cache-$enc"
        done
      fi
    } | while read -r row rest; do
      if want "$row"; then echo "$pair $row $s $S $rest $INITOPT"; fi
    done >> "$jobs_file"
  done
done
if [ -n "${PRIOR:-}" ]; then  # runs an earlier results.json already holds are not rerun
  python - "$PRIOR" "$jobs_file" <<'PY'
import json, sys
done = {(r["pair"], r["row"], str(r["seed"])) for r in json.load(open(sys.argv[1]))["runs"]
        if r.get("status") in ("done", "skipped")}
lines = open(sys.argv[2]).read().splitlines()
keep = [x for x in lines if tuple(x.split()[:3]) not in done]
open(sys.argv[2], "w").write("".join(x + "\n" for x in keep))
print(f"{len(lines) - len(keep)} runs already in {sys.argv[1]}")
PY
fi
log "$(wc -l < "$jobs_file") runs in $jobs_file ($JOBS at once)"
jobs_list=$(cat "$jobs_file")  # this invocation's list: another one may rewrite jobs.txt

# 4. the runs; a finished run (student.pth + summary.json) is kept; exit 2 = skipped
export CACHE SCALE OUT
run_one() {
  local pair=$1 row=$2 seed=$3 student=$4; shift 4
  local dir="$OUT/$pair/$row/s$seed"
  if [ -f "$dir/summary.json" ] && [ -f "$dir/student.pth" ]; then return 0; fi
  if [ -f "$dir.skipped" ]; then return 0; fi
  mkdir -p "$OUT/$pair/$row"
  local mode=--overwrite
  if [ -f "$dir/last.pth" ]; then mode=--resume; fi  # killed earlier: continue where it stopped
  local rc=0
  # shellcheck disable=SC2086
  local timer=()  # wall and CPU seconds of this sitting, appended (compare_table.py sums them)
  if [ -x /usr/bin/time ]; then
    timer=(/usr/bin/time -a -o "$dir.time.json" -f '{"wall_s": %e, "user_s": %U, "sys_s": %S}')
  fi
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "${timer[@]}" dfmsd distill --student "$student" --data "$OUT/data" \
    --cache "$CACHE" --img-scale "$SCALE" --batch-size 4 --lr 0.02 --warmup-iters 50 \
    --num-workers 0 $mode --seed "$seed" --out "$dir" "$@" > "$dir.log" 2>&1 || rc=$?
  if [ "$rc" = 2 ]; then  # a UserError: this pair cannot serve this method
    grep -m1 '^error:' "$dir.log" > "$dir.skipped" || echo "error: exit 2" > "$dir.skipped"
    echo "skipped: $pair $row seed $seed ($(cat "$dir.skipped"))"
    return 0
  fi
  [ "$rc" = 0 ] || { echo "FAILED: $pair $row seed $seed (see $dir.log)"; return 1; }
  echo "[$(date +%H:%M:%S)] done: $pair $row seed $seed"
}
export -f run_one
status=0
xargs -P "$JOBS" -L 1 bash -c 'run_one "$@"' _ <<< "$jobs_list" || status=$?

# 5. the table, results.json and the figure of the paired Δ
PRIOROPT=()
if [ -n "${PRIOR:-}" ]; then PRIOROPT=(--prior "$PRIOR"); fi
python "$HERE/compare_table.py" "$OUT" --json "$OUT/results.json" --versus dfmsd "${PRIOROPT[@]}" \
  > "$OUT/table.md"
dfmsd viz compare "$OUT/results.json" --figure "$OUT/delta.png" > /dev/null 2>&1 ||
  echo "(no figure: see dfmsd viz compare $OUT/results.json --figure $OUT/delta.png)"
echo "run time: $(( $(date +%s) - start )) s wall ($JOBS at once)" | tee -a "$OUT/table.md"
cat "$OUT/table.md"
exit "$status"
