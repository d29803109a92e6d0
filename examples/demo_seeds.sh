#!/usr/bin/env bash
# The demo over several seeds -> the margin of DFMSD over its baseline student, mean ± std.
#   examples/demo_seeds.sh [SEEDS]      (default "0 1 2"; outputs in dfmsd-demo-s<SEED>/)
# The seeds run in parallel, one thread each (on 2 cores: ~2x the time of one demo).
set -euo pipefail
SEEDS=${1:-0 1 2}
for s in $SEEDS; do
  OMP_NUM_THREADS=1 dfmsd demo --seed "$s" --out "dfmsd-demo-s$s" --overwrite > "dfmsd-demo-s$s.log" 2>&1 &
done
wait
python "$(dirname "$0")/demo_seeds.py" dfmsd-demo-s*/results.json
