#!/usr/bin/env bash
# The main job on its embedded default: set up (idempotent), then broadcast a
# generated image to 8 local daemons and compare with the naive way.
# No Ceph, no Slurm, no root needed (root only for tools/setup.sh's apt step).
#   tools/demo.sh                  # 8 nodes, 256 MiB
#   tools/demo.sh --nodes 4 --size 1G --json
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tools/setup.sh >&2
exec .venv/bin/p2pcast demo "$@"
