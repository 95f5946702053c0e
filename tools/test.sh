#!/usr/bin/env bash
# THE test command: set up (idempotent), then lint, format check, type check
# and the test suite. Extra arguments go to pytest:
#   tools/test.sh -k manifest -x
# Every step runs even if an earlier one failed, so one run shows all
# problems; the exit status is non-zero if any step failed. pytest runs last
# so its summary line closes the output.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

tools/setup.sh

VENV_BIN=$PWD/.venv/bin
export PATH=$VENV_BIN:$PATH

failed=()
step() {
    local name=$1
    shift
    printf '\n==> %s\n' "$name"
    if "$@"; then
        printf '%s: ok\n' "$name"
    else
        printf '%s: FAILED (exit %d)\n' "$name" "$?"
        failed+=("$name")
    fi
}

step "ruff check" ruff check .
step "ruff format --check" ruff format --check .
step "mypy" mypy
if ((${#failed[@]})); then
    printf '\ntest.sh: failed before pytest: %s\n' "$(IFS=,; echo "${failed[*]}")"
fi

printf '\n==> pytest\n'
rc=0
python -m pytest "$@" || rc=$?
if ((rc != 0)); then
    failed+=("pytest")
fi
if ((${#failed[@]})); then
    exit $((rc != 0 ? rc : 1))
fi
