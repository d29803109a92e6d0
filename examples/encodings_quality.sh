#!/usr/bin/env bash
# Does a smaller store encoding change what the student learns? DFMSD (the demo's recipe) on
# the demo's data and teachers, once per store encoding, 3 seeds each -> a table of mAP per
# encoding (mean ± std) next to the store's bytes per image.
#
# Usage: examples/encodings_quality.sh [WORK_DIR] [SEEDS]
#   WORK_DIR  default: enc-quality     SEEDS  default "20 21 22" (no reported table uses them)
#   ENCODINGS default "float16 bfloat16:3 uint8 float16:5" (dtype[:keepbits], or pcaK:
#             float16 with --pca K)
#   JOBS=N    runs at once (default 2, one thread each)
# Cost: one precompute of both teachers per encoding, then 3 distill runs per encoding
# (480 optimizer steps each, ~4-8 CPU-min on this 2-core machine).
set -euo pipefail
W=${1:-enc-quality}
SEEDS=${2:-20 21 22}
ENCODINGS=${ENCODINGS:-float16 bfloat16:3 uint8 float16:5}
JOBS=${JOBS:-2}
HERE=$(cd "$(dirname "$0")" && pwd)
SCALE="--img-scale 320,256"
mkdir -p "$W"
[ -d "$W/data/train2017" ] || dfmsd make-data synthetic --out "$W/data" --num-images 200 \
  --val-images 100 --seed 0 --min-size 160 --max-size 320 > /dev/null
for enc in $ENCODINGS; do
  dtype=${enc%%:*}; keep=""; [ "$enc" != "$dtype" ] && keep="--keepbits ${enc#*:}"
  case $dtype in pca*) keep="--pca ${dtype#pca}"; dtype=float16 ;; esac
  cache="$W/cache-${enc/:/-k}"
  # shellcheck disable=SC2086
  dfmsd precompute --teacher fcos_tiny --weights "$HERE/demo_teachers/fcos_tiny.pth" \
    --data "$W/data" --cache "$cache" $SCALE --views orig,hflip --dtype "$dtype" $keep \
    --batch-size 4 --num-workers 0 > "$cache.fcos.log" 2>&1
  # shellcheck disable=SC2086
  dfmsd precompute --teacher gfl_tiny --weights "$HERE/demo_teachers/gfl_tiny.pth" \
    --data "$W/data" --cache "$cache" $SCALE --views orig,hflip --enhance-from fcos_tiny \
    --dtype "$dtype" $keep --batch-size 4 --num-workers 0 > "$cache.gfl.log" 2>&1
done
run_one() {
  local enc=$1 seed=$2 cache="$W/cache-${1/:/-k}" out="$W/runs/${1/:/-k}/s$2"
  [ -f "$out/summary.json" ] && return 0
  mkdir -p "$(dirname "$out")"
  local mode=--overwrite; [ -f "$out/last.pth" ] && mode=--resume
  OMP_NUM_THREADS=1 dfmsd distill --student retina_tiny --stages fcos_tiny,gfl_tiny \
    --method dfmsd --epochs 5,5 --data "$W/data" --cache "$cache" $SCALE --batch-size 4 \
    --lr 0.02 --warmup-iters 50 --num-workers 0 --seed "$seed" --out "$out" $mode \
    > "$out.log" 2>&1 || echo "FAILED: $enc seed $seed (see $out.log)"
}
export -f run_one; export W SCALE
# seed-major order: a partial run still compares every encoding on the same seeds
for s in $SEEDS; do for enc in $ENCODINGS; do echo "$enc $s"; done; done \
  | xargs -P "$JOBS" -L 1 bash -c 'run_one "$0" "$1"'
python3 - "$W" $ENCODINGS <<'PY'
import json, statistics, sys
from pathlib import Path
w, encs = Path(sys.argv[1]), sys.argv[2:]
print("| encoding | gfl_tiny bytes/image | DFMSD mAP (mean ± std) | seeds |")
print("|---|---|---|---|")
for enc in encs:
    name = enc.replace(":", "-k")
    maps = []
    for run in sorted((w / "runs" / name).glob("s*")):
        files = sorted(run.glob("eval_stage*_val2017.json"))
        if run.is_dir() and files and (run / "student.pth").is_file():
            d = json.loads(files[-1].read_text())
            maps.append(100 * (d.get("bbox") or d.get("metrics", {}).get("bbox"))["mAP"])
    store = w / f"cache-{name}" / "gfl_tiny" / "train2017.zarr"
    size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    n = json.loads((store / "zarr.json").read_text())["attributes"]["dfmsd"]["dataset"]["num_images"]
    mean = statistics.mean(maps) if maps else float("nan")
    std = statistics.stdev(maps) if len(maps) > 1 else float("nan")
    print(f"| {enc} | {size / n / 1024:.1f} KiB | {mean:.1f} ± {std:.1f} | {len(maps)} |")
PY
