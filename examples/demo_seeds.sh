#!/usr/bin/env bash
# The demo over several seeds -> the margin of DFMSD over its baseline student, mean ± std.
#   examples/demo_seeds.sh [SEEDS]      (default "0 1 2"; outputs in dfmsd-demo-s<SEED>/)
# The seeds run one after another with torch's default threads, exactly as `dfmsd demo` runs
# for a user (the result depends on the thread count: floating-point reduction order).
# ~8 minutes per seed on an idle 2-core CPU.
set -euo pipefail
SEEDS=${1:-0 1 2}
for s in $SEEDS; do
  dfmsd demo --seed "$s" --out "dfmsd-demo-s$s" --overwrite > "dfmsd-demo-s$s.log" 2>&1
done
python "$(dirname "$0")/demo_seeds.py" dfmsd-demo-s*/results.json
