#!/usr/bin/env bash
# Installs everything, then runs the linters and the whole test suite: the unit and contract
# tiers on ETRAIN_TEST_PROCS processes (default 2), the end-to-end tier likewise, except its
# tests marked `alone` (their assertions bound durations, which a neighbour's agents and
# workers would stretch): those run one at a time, last. With arguments, one pytest run of
# just those (e.g. a file, -k EXPR, -m TIER).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
echo "== ruff"
"$PY" -m ruff check .

run_pytest() {
  local rc=0
  "$PY" -m pytest -q -p no:cacheprovider "$@" || rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    rc=1
  fi
  return "$rc"
}

if [ "$#" -gt 0 ]; then
  echo "== pytest $*"
  run_pytest "$@"
  exit $?
fi
rc=0
echo "== pytest: unit and contract tiers"
run_pytest -m "not e2e" -n "${ETRAIN_TEST_PROCS:-2}" || rc=$?
echo "== pytest: end-to-end tier, two at a time"
run_pytest -m "e2e and not alone" -n "${ETRAIN_TEST_PROCS:-2}" --durations=15 || rc=$?
echo "== pytest: end-to-end tier, the tests that bound durations, one at a time"
run_pytest -m "e2e and alone" --durations=15 || rc=$?
exit "$rc"
