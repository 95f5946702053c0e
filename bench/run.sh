#!/usr/bin/env bash
# Run the micro-benchmarks and save the figures to bench/results/micro.json.
#   bench/run.sh                 # all of them (about half a minute)
#   bench/run.sh -k link         # a subset (extra arguments go to pytest)
# Run it on an otherwise idle machine: conftest.py records how busy the
# machine was before and during the run, and the last line here shows it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

tools/setup.sh
mkdir -p bench/results
out=bench/results/micro.json
.venv/bin/python -m pytest bench -p no:cacheprovider --benchmark-enable \
    -o python_files='bench_*.py' \
    --benchmark-columns=min,median,max,rounds \
    --benchmark-sort=fullname \
    --benchmark-json="$out" \
    "$@"
.venv/bin/python - "$out" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["machine_info"]
print(f"bench: {m['cpus_usable']} CPUs; CPU used by others: "
      f"{m.get('cpu_busy_percent_before_run')}% before, "
      f"{m.get('other_cpu_percent_during_run')}% during the run "
      f"(steal {m.get('steal_percent_during_run')}%)")
PY
